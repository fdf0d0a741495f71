"""The decoder stage: the eps MSE (+ the VLB term when the variance is learned); the CLIP image
embedding is replaced by the learned null embedding 10% of the time and the caption by the empty
prompt 50% of the time (the paper's recipe, for classifier-free guidance)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import (
    DiffusionConfig, GaussianDiffusion, Sampler, StageSampling, loss_options)
from unclip_jax.images import to_model_range
from unclip_jax.models import decoder as decoder_lib
from unclip_jax.models.decoder import Decoder, DecoderConfig
from unclip_jax.stages.conditioning import CLIPConditionedStage, drop, tokenize_captions
from unclip_jax.train.stage import Stage
from unclip_jax.workdir import StageRecord


class DecoderStage(CLIPConditionedStage, Stage):
    name = "decoder"

    def __init__(self, config, workdir=None):
        Stage.__init__(self, config)
        self.cfg = DecoderConfig.from_dict(config.model.to_dict())
        self.diffusion = GaussianDiffusion(DiffusionConfig.from_dict(config.diffusion.to_dict()))
        self._setup_clip(config, workdir, self.cfg.clip_embed_dim, "clip_embed_dim")
        self.size = int(self.cfg.unet.sample_size)
        self._denoise = decoder_lib.denoiser(self.cfg)
        self._loss_kw = loss_options(config.loss)
        s = config.get("sampling") or {}
        self.sampling = StageSampling(self.diffusion.config, 1.0, method=s.get("method", "ddpm"),
                                      eta=float(s.get("eta", 0.0)), guidance=s.get("guidance"))

    def model(self):
        return Decoder(self.cfg)

    def record(self) -> StageRecord:
        return StageRecord("decoder", self.cfg.to_dict(), self.sampling, paths=self.paths(),
                           train=self.config_json())

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
        keys = jax.random.split(rng, 5)  # image drop, text drop; then timestep, noise, dropout
        text, hidden, mask = self.drop_text(frozen, keys[1], float(self.config.cond_drop.text),
                                            text, hidden, batch["text_mask"])
        cond = dict(image_embed=image_emb, text_embed=text, text_hidden=hidden, text_mask=mask,
                    null_image=drop(keys[0], float(self.config.cond_drop.image), b))
        x0 = to_model_range(batch["image"], self.size)
        loss, aux = self.diffusion.training_loss(self._denoise, params, x0, cond, keys[2:],
                                                 **self._loss_kw)
        return jnp.mean(loss), {k: jnp.mean(v) for k, v in aux.items()}

    def preview_batch(self, n: int = 8) -> dict:
        """The first n examples of the data (seed 12345), what the training preview decodes:
        image, input_ids, text_mask (arrays) and caption (the strings)."""
        from unclip_jax.data.sources import image_text_batches

        if getattr(self, "_look", None) is None or len(self._look["image"]) != n:
            raw, _ = next(image_text_batches(
                self.config.data, image_size=int(self.config.data.image_size), batch_size=n,
                seed=12345, start_step=0))
            ids, mask = tokenize_captions(self.tokenizer, raw["caption"], self.L)
            self._look = {"image": jnp.asarray(raw["image"]), "input_ids": jnp.asarray(ids),
                          "text_mask": jnp.asarray(mask), "caption": list(raw["caption"])}
        return self._look

    def sample_images(self, params, frozen, rng, n: int = 8, steps: int = 25):
        """Decoder samples for the first n images of the data (their CLIP embeddings and
        captions), sampled as the pipeline samples this decoder: its recorded method, eta and
        guidance, the unconditional branch being the null image embedding with the empty prompt.
        Latents from fold_in(rng, 0), the sampler's noise from fold_in(rng, 1)."""
        if getattr(self, "_preview_sampler", None) is None:
            self._preview_sampler = Sampler.for_stage(self._denoise, self.sampling, steps)
        b = self.preview_batch(n)
        image, text, hidden = self.conditioning(frozen, b)
        null_text, null_hidden = self.clip.encode_text(frozen["text"], frozen["null_ids"])
        guidance = 8.0 if self.sampling.guidance is None else float(self.sampling.guidance)
        null = None
        if guidance > 1.0:
            null = dict(text_embed=jnp.broadcast_to(null_text, text.shape),
                        text_hidden=jnp.broadcast_to(null_hidden, hidden.shape),
                        text_mask=jnp.broadcast_to(frozen["null_mask"], b["text_mask"].shape))
        cond, uncond = decoder_lib.guided_cond(
            image, dict(text_embed=text, text_hidden=hidden, text_mask=b["text_mask"]), null)
        x = jax.random.normal(jax.random.fold_in(rng, 0), (n, self.size, self.size, 3))
        out = self._preview_sampler(params, x, cond, uncond, rng=jax.random.fold_in(rng, 1),
                                    guidance_scale=guidance)
        return np.asarray(jnp.clip(out * 0.5 + 0.5, 0, 1))


def make_stage(config, workdir=None):
    return DecoderStage(config, workdir)
