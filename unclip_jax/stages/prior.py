"""The prior stage: MSE on the predicted clean (normalised) CLIP image embedding; the text
conditioning is replaced by the empty prompt's 10% of the time (for classifier-free guidance).

CLIP is frozen: the image and text embeddings are computed inside the step from CLIP's params.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data.sources import image_text_batches
from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion
from unclip_jax.models import prior as prior_lib
from unclip_jax.models.prior import PriorConfig, PriorTransformer
from unclip_jax.stages.base import Stage
from unclip_jax.stages.conditioning import (
    clip_pixels, drop, load_frozen_clip, select_rows, tokenize_captions)


class PriorStage(Stage):
    name = "prior"

    def __init__(self, config, workdir=None):
        super().__init__(config)
        self.cfg = PriorConfig.from_dict(config.model.to_dict())
        self.diffusion = GaussianDiffusion(DiffusionConfig.from_dict(config.diffusion.to_dict()))
        if self.diffusion.config.prediction != "x0":
            raise ValueError("the prior predicts the clean embedding: diffusion.prediction='x0'")
        clip_dir = config.clip_dir or (os.path.join(workdir, "clip") if workdir else "")
        self.clip = load_frozen_clip(clip_dir)
        if self.clip.embed_dim != self.cfg.embedding_dim:
            raise ValueError(f"the prior's embedding_dim {self.cfg.embedding_dim} differs from "
                             f"CLIP's projection_dim {self.clip.embed_dim}")
        from unclip_jax.data.tokenizer import load_tokenizer

        tok_path = config.get("tokenizer") or self.clip.tokenizer_path
        if not tok_path:
            raise ValueError("no tokenizer: set config.tokenizer")
        self.tokenizer = load_tokenizer(tok_path)
        self.L = self.cfg.num_text_tokens
        self.null_ids, self.null_mask = tokenize_captions(self.tokenizer, [""], self.L)

    def model(self):
        return PriorTransformer(self.cfg)

    def model_config(self) -> dict[str, Any]:
        return {"prior": self.cfg.to_dict(), "diffusion": self.diffusion.config.to_dict(),
                "clip_x0": self.cfg.clip_x0}

    def init_variables(self, rng, batch):
        b, D = batch["input_ids"].shape[0], self.cfg.embedding_dim
        return self.model().init(rng, jnp.zeros((b, D)), jnp.zeros((b,), jnp.int32),
                                 jnp.zeros((b, self.cfg.text_embed_dim)),
                                 jnp.zeros((b, self.L, self.clip.text_config.hidden_size)),
                                 jnp.ones((b, self.L), bool))

    def trainable(self, params):
        return prior_lib.trainable_mask(params)

    def frozen(self):
        boxed = self.clip.boxed_abstract()
        params = {"text": self.clip.text_params, "vision": self.clip.vision_params}
        boxed["null_ids"] = jax.ShapeDtypeStruct(self.null_ids.shape, jnp.int32)
        boxed["null_mask"] = jax.ShapeDtypeStruct(self.null_mask.shape, jnp.bool_)
        params["null_ids"], params["null_mask"] = self.null_ids, self.null_mask
        return boxed, params

    def _embeddings(self, frozen, batch):
        clip = self.clip
        pixels = clip_pixels(batch["image"], clip.vision_config.image_size)
        image = clip.encode_image(frozen["vision"], pixels)
        text, hidden = clip.encode_text(frozen["text"], batch["input_ids"])
        return jax.lax.stop_gradient((image, text, hidden))

    def post_init(self, params, batches):
        """clip_mean / clip_std from the image embeddings of a few batches (Karlo's statistics)."""
        if self.cfg.embedding_norm != "meanstd":
            return params
        frozen = self.frozen()[1]
        enc = jax.jit(lambda f, b: self._embeddings(f, b)[0])
        embs = []
        for _ in range(int(self.config.get("stats_batches", 8))):
            batch, _ = next(batches)
            embs.append(np.asarray(enc(frozen, {k: jnp.asarray(v) for k, v in batch.items()})))
        e = np.concatenate(embs)
        return prior_lib.set_embedding_stats(jax.device_get(params), e.mean(0),
                                             e.std(0) + 1e-6)

    def loss(self, params, batch, rng, frozen):
        image, text, hidden = self._embeddings(frozen, batch)
        mask = batch["text_mask"]
        b = image.shape[0]
        k_drop, k_t, k_noise, k_dropout = jax.random.split(rng, 4)
        null_text, null_hidden = self.clip.encode_text(frozen["text"], frozen["null_ids"])
        dropped = drop(k_drop, float(self.config.cond_drop.text), b)
        text = select_rows(dropped, text, jax.lax.stop_gradient(null_text))
        hidden = select_rows(dropped, hidden, jax.lax.stop_gradient(null_hidden))
        mask = select_rows(dropped, mask, frozen["null_mask"])
        x0 = prior_lib.normalize_embedding(image, self.cfg, params)
        t = jax.random.randint(k_t, (b,), 0, self.diffusion.num_steps)
        noise = jax.random.normal(k_noise, x0.shape)
        x_t = self.diffusion.q_sample(x0, t, noise)
        pred = self.model().apply({"params": params}, x_t, t, text, hidden, mask, train=True,
                                  rngs={"dropout": k_dropout})
        loss, aux = self.diffusion.loss(pred, x0, noise, t)
        cos = jnp.sum(pred * x0, -1) / (jnp.linalg.norm(pred, axis=-1)
                                        * jnp.linalg.norm(x0, axis=-1) + 1e-8)
        return jnp.mean(loss), {"cosine_to_target": jnp.mean(cos)}

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
    return PriorStage(config, workdir)
