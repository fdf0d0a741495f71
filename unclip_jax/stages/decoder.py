"""The decoder stage: the eps MSE (+ the VLB term when the variance is learned); the CLIP image
embedding is replaced by the learned null embedding 10% of the time and the caption by the empty
prompt 50% of the time (the paper's recipe, for classifier-free guidance)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion
from unclip_jax.models.decoder import Decoder, DecoderConfig
from unclip_jax.stages.base import Stage
from unclip_jax.stages.conditioning import CLIPConditionedStage, drop, to_model_range


class DecoderStage(CLIPConditionedStage, Stage):
    name = "decoder"

    def __init__(self, config, workdir=None):
        Stage.__init__(self, config)
        self.cfg = DecoderConfig.from_dict(config.model.to_dict())
        self.diffusion = GaussianDiffusion(DiffusionConfig.from_dict(config.diffusion.to_dict()))
        self._setup_clip(config, workdir, self.cfg.clip_embed_dim, "clip_embed_dim")
        self.size = int(self.cfg.unet.sample_size)

    def model(self):
        return Decoder(self.cfg)

    def model_config(self) -> dict[str, Any]:
        return {"decoder": self.cfg.to_dict(), "diffusion": self.diffusion.config.to_dict()}

    def init_variables(self, rng, batch):
        b, E = batch["input_ids"].shape[0], self.cfg.clip_embed_dim
        c = self.cfg.unet
        return self.model().init(
            rng, jnp.zeros((b, self.size, self.size, c.in_channels)), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b, E)), jnp.zeros((b, E)),
            jnp.zeros((b, self.L, self.clip.text_config.hidden_size)), jnp.ones((b, self.L), bool))

    def loss(self, params, batch, rng, frozen):
        image_emb, text, hidden = self.conditioning(frozen, batch)
        b = image_emb.shape[0]
        k_img, k_txt, k_t, k_noise, k_dropout = jax.random.split(rng, 5)
        text, hidden, mask = self.drop_text(frozen, k_txt, float(self.config.cond_drop.text),
                                            text, hidden, batch["text_mask"])
        null_image = drop(k_img, float(self.config.cond_drop.image), b)
        x0 = to_model_range(batch["image"], self.size)
        t = jax.random.randint(k_t, (b,), 0, self.diffusion.num_steps)
        noise = jax.random.normal(k_noise, x0.shape)
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = self.model().apply({"params": params}, x_t, t, image_emb, text, hidden, mask,
                                 null_image=null_image, train=True, rngs={"dropout": k_dropout})
        loss, aux = self.diffusion.loss(out, x0, noise, t, loss_type=self.config.loss.type,
                                        vlb_weight=float(self.config.loss.vlb_weight),
                                        p2_gamma=float(self.config.loss.p2_gamma),
                                        min_snr_gamma=float(self.config.loss.get(
                                            "min_snr_gamma", 0.0)),
                                        snr_floor=float(self.config.loss.get("snr_floor", 0.0)))
        return jnp.mean(loss), {k: jnp.mean(v) for k, v in aux.items()}

    def sample_images(self, params, frozen, rng, n: int = 8, steps: int = 25):
        """Decoder samples for the first n images of the data (their CLIP embeddings and
        captions), guided at 3, next to nothing else: a quick look at training progress."""
        from unclip_jax.diffusion import Sampler, SamplingConfig

        if not hasattr(self, "_look"):
            batch, _ = next(self.batches(batch_size=n, seed=12345, start_step=0,
                                         process_index=0, process_count=1))
            self._look = {k: jnp.asarray(v) for k, v in batch.items()}
            model = self.model()
            self._look_fn = lambda p, x, t, c: model.apply(
                {"params": p}, x, t, c["image"], c["text"], c["hidden"], c["mask"],
                null_image=c["null"])
            self._look_sampler = Sampler(self._look_fn, self.diffusion,
                                         SamplingConfig(steps=steps))
        b = self._look
        image, text, hidden = self.conditioning(frozen, b)
        cond = dict(image=image, text=text, hidden=hidden, mask=b["text_mask"],
                    null=jnp.zeros((n,), bool))
        uncond = dict(cond, null=jnp.ones((n,), bool))
        x = jax.random.normal(rng, (n, self.size, self.size, 3))
        out = self._look_sampler(params, x, cond, uncond, rng=rng, guidance_scale=3.0)
        return np.asarray(jnp.clip(out * 0.5 + 0.5, 0, 1))


def make_stage(config, workdir=None):
    return DecoderStage(config, workdir)
