"""The prior stage: MSE on the predicted clean (normalised) CLIP image embedding; the text
conditioning is replaced by the empty prompt's 10% of the time (for classifier-free guidance).

CLIP is frozen: the image and text embeddings are computed inside the step from CLIP's params.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion
from unclip_jax.models import prior as prior_lib
from unclip_jax.models.prior import PriorConfig, PriorTransformer
from unclip_jax.stages.base import Stage
from unclip_jax.stages.conditioning import CLIPConditionedStage


class PriorStage(CLIPConditionedStage, Stage):
    name = "prior"

    def __init__(self, config, workdir=None):
        Stage.__init__(self, config)
        self.cfg = PriorConfig.from_dict(config.model.to_dict())
        self.diffusion = GaussianDiffusion(DiffusionConfig.from_dict(config.diffusion.to_dict()))
        if self.diffusion.config.prediction != "x0":
            raise ValueError("the prior predicts the clean embedding: diffusion.prediction='x0'")
        self._setup_clip(config, workdir, self.cfg.embedding_dim, "embedding_dim")
        if self.cfg.num_text_tokens != self.L:
            raise ValueError(f"the prior's num_text_tokens {self.cfg.num_text_tokens} differs "
                             f"from CLIP's context length {self.L}")

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

    def post_init(self, params, batches):
        """The embedding statistics from the image embeddings of a few batches: clip_mean /
        clip_std ('meanstd', Karlo's), or clip_norm, their mean L2 norm ('scale' / 'l2': the
        scale the prior's samples are handed to the decoder at)."""
        mode = self.cfg.embedding_norm
        if mode not in ("meanstd", "scale", "l2"):
            return params
        frozen = self.frozen()[1]
        enc = jax.jit(lambda f, b: self.conditioning(f, b)[0])
        embs = []
        for _ in range(int(self.config.get("stats_batches", 8))):
            batch, _ = next(batches)
            embs.append(np.asarray(enc(frozen, {k: jnp.asarray(v) for k, v in batch.items()})))
        e = np.concatenate(embs)
        if mode != "meanstd":
            norm = float(np.mean(np.linalg.norm(e.astype(np.float64), axis=-1)))
            return prior_lib.set_embedding_stats(jax.device_get(params), norm=norm)
        return prior_lib.set_embedding_stats(jax.device_get(params), e.mean(0),
                                             e.std(0) + 1e-6)

    def loss(self, params, batch, rng, frozen):
        image, text, hidden = self.conditioning(frozen, batch)
        b = image.shape[0]
        k_drop, k_t, k_noise, k_dropout = jax.random.split(rng, 4)
        text, hidden, mask = self.drop_text(frozen, k_drop, float(self.config.cond_drop.text),
                                            text, hidden, batch["text_mask"])
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


def make_stage(config, workdir=None):
    return PriorStage(config, workdir)
