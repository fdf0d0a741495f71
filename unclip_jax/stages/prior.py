"""The prior stage: MSE on the predicted clean (normalised) CLIP image embedding; the text
conditioning is replaced by the empty prompt's 10% of the time (for classifier-free guidance).

CLIP is frozen. With an image source the image and text embeddings are computed inside the step
from CLIP's params; with `data.source=clip_embeddings` the prior trains from a precomputed
embeddings set alone (`data.clip_embeddings`; written e.g. by
`stages.conditioning.precompute_embeddings`): no images and no CLIP in the step. A set made by
another CLIP than the run's (other widths, or another recorded model) is refused.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion, StageSampling
from unclip_jax.models import prior as prior_lib
from unclip_jax.models.prior import PriorConfig, PriorTransformer
from unclip_jax.stages.conditioning import CLIPConditionedStage
from unclip_jax.train.stage import Stage
from unclip_jax.workdir import StageRecord, has_checkpoints, load_frozen_clip

EMBEDDINGS = "clip_embeddings"


class PriorStage(CLIPConditionedStage, Stage):
    name = "prior"

    def __init__(self, config, workdir=None):
        Stage.__init__(self, config)
        self.cfg = PriorConfig.from_dict(config.model.to_dict())
        self.diffusion = GaussianDiffusion(DiffusionConfig.from_dict(config.diffusion.to_dict()))
        if self.diffusion.config.prediction != "x0":
            raise ValueError("the prior predicts the clean embedding: diffusion.prediction='x0'")
        self.from_embeddings = config.data.source == EMBEDDINGS
        if self.from_embeddings:
            self._setup_embeddings(config, workdir)
        else:
            self._setup_clip(config, workdir, self.cfg.embedding_dim, "embedding_dim")
            self.text_width = self.clip.text_config.hidden_size
        if self.cfg.num_text_tokens != self.L:
            raise ValueError(f"the prior's num_text_tokens {self.cfg.num_text_tokens} differs "
                             f"from CLIP's context length {self.L}")
        self._denoise = prior_lib.denoiser(self.cfg)

    def _setup_embeddings(self, config, workdir):
        """Read the embeddings set's record; check it against the run's CLIP where one is known
        (config.clip_dir, or a trained WORKDIR/clip)."""
        from unclip_jax.data import embedding_sets as E

        root = config.data.path
        if not root:
            raise ValueError("data.source=clip_embeddings needs data.path (the embeddings set)")
        clip_dir = config.clip_dir or (os.path.join(workdir, "clip") if workdir else "")
        clip = None
        if config.clip_dir or (clip_dir and has_checkpoints(clip_dir)):
            clip = load_frozen_clip(clip_dir)
        self.clip_dir = clip_dir if clip is not None else ""
        info = E.check_embeddings(root, embed_dim=self.cfg.embedding_dim,
                                  text_len=self.cfg.num_text_tokens,
                                  model=None if clip is None else clip.description())
        if not info:
            raise ValueError(f"the embeddings set at {root} records no embeddings.json (how it "
                             "was made, the empty prompt's encoding): write it with "
                             "data.embedding_sets.write_embeddings_info, or re-embed")
        info = E.read_embeddings_info(root)
        self.L, self.text_width = int(info["text_len"]), int(info["text_width"])
        self.null = {k: np.asarray(v) for k, v in info["null"].items()}
        self.tokenizer_path = config.get("tokenizer") or (clip.tokenizer_path if clip else "")

    def model(self):
        return PriorTransformer(self.cfg)

    def record(self) -> StageRecord:
        # the pipeline samples the prior with DDPM (Karlo's), clipping x0 at the model's range,
        # at the config's guidance scale (sampling.guidance; none: the pipeline's default, 4)
        g = (self.config.get("sampling") or {}).get("guidance")
        sampling = StageSampling(self.diffusion.config, self.cfg.clip_x0, method="ddpm",
                                 guidance=None if g is None else float(g))
        data = {"source": str(self.config.data.source)}
        return StageRecord("prior", self.cfg.to_dict(), sampling, data=data, paths=self.paths(),
                           train=self.config_json())

    def init_variables(self, rng, batch):
        b, D = batch["text_mask"].shape[0], self.cfg.embedding_dim
        return self.model().init(rng, jnp.zeros((b, D)), jnp.zeros((b,), jnp.int32),
                                 jnp.zeros((b, self.cfg.text_embed_dim)),
                                 jnp.zeros((b, self.L, self.text_width)),
                                 jnp.ones((b, self.L), bool))

    def trainable(self, params):
        return prior_lib.trainable_mask(params)

    # -- the conditioning: computed by CLIP in the step, or read from the embeddings set --------
    def frozen(self):
        if not self.from_embeddings:
            return super().frozen()
        boxed = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.null.items()}
        return boxed, dict(self.null)

    def null_encoding(self, frozen):
        if not self.from_embeddings:
            return super().null_encoding(frozen)
        return frozen["text_embed"], frozen["text_hidden"], frozen["text_mask"]

    def embeddings(self, frozen, batch):
        """(image embedding [B, E], text embedding [B, E], hidden states [B, L, D], mask [B, L])."""
        if self.from_embeddings:
            return (batch["image_embed"], batch["text_embed"], batch["text_hidden"],
                    batch["text_mask"])
        image, text, hidden = self.conditioning(frozen, batch)
        return image, text, hidden, batch["text_mask"]

    def dummy_batch(self, batch_size):
        if not self.from_embeddings:
            return super().dummy_batch(batch_size)
        E = self.cfg.embedding_dim
        return {"image_embed": np.zeros((batch_size, E), np.float32),
                "text_embed": np.zeros((batch_size, E), np.float32),
                "text_hidden": np.zeros((batch_size, self.L, self.text_width), np.float32),
                "text_mask": np.ones((batch_size, self.L), bool)}

    def batches(self, *, batch_size, seed, start_step, process_index, process_count):
        if not self.from_embeddings:
            yield from super().batches(batch_size=batch_size, seed=seed, start_step=start_step,
                                       process_index=process_index, process_count=process_count)
            return
        from unclip_jax.data.embedding_sets import embedding_batches

        yield from embedding_batches(self.config.data, batch_size=batch_size, seed=seed,
                                     start_step=start_step, process_index=process_index,
                                     process_count=process_count)

    def post_init(self, params, batches):
        """The embedding statistics from the image embeddings of a few batches: clip_mean /
        clip_std ('meanstd', Karlo's), or clip_norm, their mean L2 norm ('scale' / 'l2': the
        scale the prior's samples are handed to the decoder at)."""
        mode = self.cfg.embedding_norm
        if mode not in ("meanstd", "scale", "l2"):
            return params
        embs = []
        for _ in range(int(self.config.get("stats_batches", 8))):
            batch, _ = next(batches)
            embs.append(np.asarray(batch["image_embed"]) if self.from_embeddings
                        else self.clip.embed_images(batch["image"]))
        e = np.concatenate(embs)
        if mode != "meanstd":
            norm = float(np.mean(np.linalg.norm(e.astype(np.float64), axis=-1)))
            return prior_lib.set_embedding_stats(jax.device_get(params), norm=norm)
        return prior_lib.set_embedding_stats(jax.device_get(params), e.mean(0),
                                             e.std(0) + 1e-6)

    def loss(self, params, batch, rng, frozen):
        image, text, hidden, mask = self.embeddings(frozen, batch)
        keys = jax.random.split(rng, 4)  # text dropout; then timestep, noise, dropout
        text, hidden, mask = self.drop_text(frozen, keys[0], float(self.config.cond_drop.text),
                                            text, hidden, mask)
        x0 = prior_lib.normalize_embedding(image, self.cfg, params)
        cond = dict(text_embed=text, text_hidden=hidden, text_mask=mask)
        loss, _, pred = self.diffusion.training_loss(self._denoise, params, x0, cond, keys[1:],
                                                     with_output=True)
        cos = jnp.sum(pred * x0, -1) / (jnp.linalg.norm(pred, axis=-1)
                                        * jnp.linalg.norm(x0, axis=-1) + 1e-8)
        return jnp.mean(loss), {"cosine_to_target": jnp.mean(cos)}


def make_stage(config, workdir=None):
    return PriorStage(config, workdir)
