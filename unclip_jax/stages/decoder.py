"""The decoder stage: the eps MSE (+ the VLB term when the variance is learned); the CLIP image
embedding is replaced by the learned null embedding 10% of the time and the caption by the empty
prompt 50% of the time (the paper's recipe, for classifier-free guidance)."""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data.sources import image_text_batches
from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion
from unclip_jax.models.unet import Decoder, DecoderConfig
from unclip_jax.stages.base import Stage
from unclip_jax.stages.conditioning import (
    clip_pixels, drop, load_frozen_clip, select_rows, to_model_range, tokenize_captions)


class DecoderStage(Stage):
    name = "decoder"

    def __init__(self, config, workdir=None):
        super().__init__(config)
        self.cfg = DecoderConfig.from_dict(config.model.to_dict())
        self.diffusion = GaussianDiffusion(DiffusionConfig.from_dict(config.diffusion.to_dict()))
        clip_dir = config.clip_dir or (os.path.join(workdir, "clip") if workdir else "")
        self.clip = load_frozen_clip(clip_dir)
        if self.clip.embed_dim != self.cfg.clip_embed_dim:
            raise ValueError(f"the decoder's clip_embed_dim {self.cfg.clip_embed_dim} differs "
                             f"from CLIP's projection_dim {self.clip.embed_dim}")
        from unclip_jax.data.tokenizer import load_tokenizer

        tok_path = config.get("tokenizer") or self.clip.tokenizer_path
        if not tok_path:
            raise ValueError("no tokenizer: set config.tokenizer")
        self.tokenizer = load_tokenizer(tok_path)
        self.L = self.clip.context_length
        self.null_ids, self.null_mask = tokenize_captions(self.tokenizer, [""], self.L)
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

    def frozen(self):
        boxed = self.clip.boxed_abstract()
        params = {"text": self.clip.text_params, "vision": self.clip.vision_params,
                  "null_ids": self.null_ids, "null_mask": self.null_mask}
        boxed["null_ids"] = jax.ShapeDtypeStruct(self.null_ids.shape, jnp.int32)
        boxed["null_mask"] = jax.ShapeDtypeStruct(self.null_mask.shape, jnp.bool_)
        return boxed, params

    def conditioning(self, frozen, batch):
        """CLIP image embedding, text embedding, text hidden states (frozen, no gradient)."""
        clip = self.clip
        image = clip.encode_image(frozen["vision"],
                                  clip_pixels(batch["image"], clip.vision_config.image_size))
        text, hidden = clip.encode_text(frozen["text"], batch["input_ids"])
        return jax.lax.stop_gradient((image, text, hidden))

    def loss(self, params, batch, rng, frozen):
        image_emb, text, hidden = self.conditioning(frozen, batch)
        mask = batch["text_mask"]
        b = image_emb.shape[0]
        k_img, k_txt, k_t, k_noise, k_dropout = jax.random.split(rng, 5)
        null_text, null_hidden = self.clip.encode_text(frozen["text"], frozen["null_ids"])
        no_text = drop(k_txt, float(self.config.cond_drop.text), b)
        text = select_rows(no_text, text, jax.lax.stop_gradient(null_text))
        hidden = select_rows(no_text, hidden, jax.lax.stop_gradient(null_hidden))
        mask = select_rows(no_text, mask, frozen["null_mask"])
        null_image = drop(k_img, float(self.config.cond_drop.image), b)
        x0 = to_model_range(batch["image"], self.size)
        t = jax.random.randint(k_t, (b,), 0, self.diffusion.num_steps)
        noise = jax.random.normal(k_noise, x0.shape)
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = self.model().apply({"params": params}, x_t, t, image_emb, text, hidden, mask,
                                 null_image=null_image, train=True, rngs={"dropout": k_dropout})
        loss, aux = self.diffusion.loss(out, x0, noise, t, loss_type=self.config.loss.type,
                                        vlb_weight=float(self.config.loss.vlb_weight),
                                        p2_gamma=float(self.config.loss.p2_gamma))
        return jnp.mean(loss), {k: jnp.mean(v) for k, v in aux.items()}

    def dummy_batch(self, batch_size):
        s = int(self.config.data.image_size)
        return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
                "input_ids": np.zeros((batch_size, self.L), np.int32),
                "text_mask": np.ones((batch_size, self.L), bool)}

    def batches(self, *, batch_size, seed, start_step, process_index, process_count):
        for raw, skipped in image_text_batches(
                self.config.data, image_size=int(self.config.data.image_size),
                batch_size=batch_size, seed=seed, start_step=start_step,
                process_index=process_index, process_count=process_count):
            ids, mask = tokenize_captions(self.tokenizer, raw["caption"], self.L)
            yield {"image": raw["image"], "input_ids": ids, "text_mask": mask}, skipped


def make_stage(config, workdir=None):
    return DecoderStage(config, workdir)
