"""The prior stage: MSE on the predicted clean (normalised) CLIP image embedding; the text
conditioning is replaced by the empty prompt's 10% of the time (for classifier-free guidance).

CLIP is frozen: the image and text embeddings are computed inside the step from CLIP's params.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion, StageSampling
from unclip_jax.models import prior as prior_lib
from unclip_jax.models.prior import PriorConfig, PriorTransformer
from unclip_jax.stages.conditioning import CLIPConditionedStage
from unclip_jax.train.stage import Stage
from unclip_jax.workdir import StageRecord


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
        self._denoise = prior_lib.denoiser(self.cfg)

    def model(self):
        return PriorTransformer(self.cfg)

    def record(self) -> StageRecord:
        # the pipeline samples the prior with DDPM (Karlo's), clipping x0 at the model's range
        sampling = StageSampling(self.diffusion.config, self.cfg.clip_x0, method="ddpm")
        return StageRecord("prior", self.cfg.to_dict(), sampling, paths=self.paths(),
                           train=self.config_json())

    def init_variables(self, rng, batch):
        b, D = batch["input_ids"].shape[0], self.cfg.embedding_dim
        return self.model().init(rng, jnp.zeros((b, D)), jnp.zeros((b,), jnp.int32),
                                 jnp.zeros((b, self.cfg.text_embed_dim)),
                                 jnp.zeros((b, self.L, self.clip.text_config.hidden_size)),
                                 jnp.ones((b, self.L), bool))

    def trainable(self, params):
        return prior_lib.trainable_mask(params)

    def post_init(self, params, batches):
        """clip_mean / clip_std from the image embeddings of a few batches (Karlo's statistics)."""
        if self.cfg.embedding_norm != "meanstd":
            return params
        embs = []
        for _ in range(int(self.config.get("stats_batches", 8))):
            batch, _ = next(batches)
            embs.append(self.clip.embed_images(batch["image"]))
        e = np.concatenate(embs)
        return prior_lib.set_embedding_stats(jax.device_get(params), e.mean(0),
                                             e.std(0) + 1e-6)

    def loss(self, params, batch, rng, frozen):
        image, text, hidden = self.conditioning(frozen, batch)
        keys = jax.random.split(rng, 4)  # text dropout; then timestep, noise, dropout
        text, hidden, mask = self.drop_text(frozen, keys[0], float(self.config.cond_drop.text),
                                            text, hidden, batch["text_mask"])
        x0 = prior_lib.normalize_embedding(image, self.cfg, params)
        cond = dict(text_embed=text, text_hidden=hidden, text_mask=mask)
        loss, _, pred = self.diffusion.training_loss(self._denoise, params, x0, cond, keys[1:],
                                                     with_output=True)
        cos = jnp.sum(pred * x0, -1) / (jnp.linalg.norm(pred, axis=-1)
                                        * jnp.linalg.norm(x0, axis=-1) + 1e-8)
        return jnp.mean(loss), {"cosine_to_target": jnp.mean(cos)}


def make_stage(config, workdir=None):
    return PriorStage(config, workdir)
