"""CLIP as a frozen input of the prior and decoder stages: loading, pixels, encoding, tokens.

Not a stage: the prior and the decoder read a *trained* CLIP — our CLIP stage's directory or a
transformers CLIPModel directory — through this module.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.clip import (
    CLIPConfig, CLIPTextModelWithProjection, CLIPVisionModelWithProjection)

# OpenAI CLIP's pixel normalisation
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def clip_pixels(images_uint8: jax.Array, size: int) -> jax.Array:
    """uint8 [B, H, W, 3] -> CLIP's normalised float pixels [B, size, size, 3] (antialiased resize)."""
    x = images_uint8.astype(jnp.float32) / 255.0
    if x.shape[1] != size or x.shape[2] != size:
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic", antialias=True)
    return (x - CLIP_MEAN) / CLIP_STD


def to_model_range(images_uint8: jax.Array, size: int | None = None) -> jax.Array:
    """uint8 images -> float in [-1, 1], resized (antialiased) to `size` if given."""
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    if size is not None and (x.shape[1] != size or x.shape[2] != size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic", antialias=True)
        x = jnp.clip(x, -1.0, 1.0)
    return x


@dataclasses.dataclass
class FrozenCLIP:
    """A trained CLIP split into its towers: configs, params and the tokenizer's location."""

    config: CLIPConfig
    text_params: Any
    vision_params: Any
    tokenizer_path: str | None

    @property
    def text_config(self):
        return self.config.text.replace(projection_dim=self.config.projection_dim)

    @property
    def vision_config(self):
        return self.config.vision.replace(projection_dim=self.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.config.text.max_position_embeddings)

    @property
    def embed_dim(self) -> int:
        return int(self.config.projection_dim)

    def encode_text(self, text_params, input_ids):
        """-> (text_embeds [B, E] unnormalised, last_hidden_state [B, L, D]); causal mask only."""
        out = CLIPTextModelWithProjection(self.text_config).apply({"params": text_params},
                                                                  input_ids)
        return out["text_embeds"], out["last_hidden_state"]

    def encode_image(self, vision_params, pixels):
        out = CLIPVisionModelWithProjection(self.vision_config).apply({"params": vision_params},
                                                                      pixels)
        return out["image_embeds"]

    def boxed_abstract(self):
        """Boxed abstract params {'text', 'vision'} (logical names for sharding)."""
        t, v = self.text_config, self.vision_config
        bt = jax.eval_shape(CLIPTextModelWithProjection(t).init, jax.random.key(0),
                            jnp.zeros((1, t.max_position_embeddings), jnp.int32))["params"]
        bv = jax.eval_shape(CLIPVisionModelWithProjection(v).init, jax.random.key(0),
                            jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32))["params"]
        return {"text": bt, "vision": bv}


def load_frozen_clip(path: str) -> FrozenCLIP:
    """A CLIP from our CLIP stage's directory (its EMA params) or a transformers CLIPModel dir."""
    from unclip_jax.train.checkpoint import CONFIG_FILE, load_trained

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no CLIP at {path}: train it first with "
                                f"`unclip-jax train --config configs/clip.py ...`")
    ours = os.path.join(path, CONFIG_FILE)
    if os.path.exists(ours) and os.path.isdir(os.path.join(path, "checkpoints")):
        cfg, params, _ = load_trained(path)
        if cfg.get("stage") != "clip":
            raise ValueError(f"{path} holds a {cfg.get('stage')!r} stage, not CLIP")
        config = CLIPConfig.from_dict(cfg["model"])
        tok = cfg.get("train", {}).get("tokenizer") or None
    else:
        from unclip_jax.convert.hf_clip import load_hf_clip

        _, config, params = load_hf_clip(path, kind="clip")
        tok = path if os.path.exists(os.path.join(path, "tokenizer_config.json")) else None
    text = {"text_model": params["text_model"], "text_projection": params["text_projection"]}
    vision = {"vision_model": params["vision_model"],
              "visual_projection": params["visual_projection"]}
    return FrozenCLIP(config, text, vision, tok)


def tokenize_captions(tokenizer, captions: Sequence[str], context_length: int):
    """Captions -> (input_ids int32 [B, L], mask bool [B, L]); silent truncation (training)."""
    import warnings

    from unclip_jax.data.tokenizer import tokenize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = tokenize(tokenizer, list(captions), context_length)
    return ids, mask.astype(bool)


def drop(rng, p: float, n: int) -> jax.Array:
    """[n] bool, True with probability p."""
    return jax.random.uniform(rng, (n,)) < p


def select_rows(mask_rows, a, b):
    """Row-wise where: mask [B] picks a's rows, else b's (b broadcast over the batch)."""
    m = mask_rows.reshape((-1,) + (1,) * (a.ndim - 1))
    return jnp.where(m, jnp.broadcast_to(b, a.shape), a)


def unbox(tree):
    return nn.unbox(tree)


class CLIPConditionedStage:
    """Mixin of the stages that see frozen CLIP: the prior and the decoder.

    Loads CLIP (config.clip_dir, default WORKDIR/clip) and its tokenizer, tokenises captions,
    gives the trainer CLIP's params (+ the empty prompt's tokens) as frozen inputs, and computes
    the CLIP embeddings of a batch inside the step.
    """

    name = "stage"

    def _setup_clip(self, config, workdir, embed_dim: int, what: str):
        from unclip_jax.data.tokenizer import load_tokenizer

        clip_dir = config.clip_dir or (os.path.join(workdir, "clip") if workdir else "")
        self.clip = load_frozen_clip(clip_dir)
        if self.clip.embed_dim != embed_dim:
            raise ValueError(f"the {self.name}'s {what} {embed_dim} differs from CLIP's "
                             f"projection_dim {self.clip.embed_dim}")
        tok_path = config.get("tokenizer") or self.clip.tokenizer_path
        if not tok_path:
            raise ValueError("no tokenizer: set config.tokenizer")
        self.tokenizer = load_tokenizer(tok_path)
        self.L = self.clip.context_length
        self.null_ids, self.null_mask = tokenize_captions(self.tokenizer, [""], self.L)

    def frozen(self):
        boxed = self.clip.boxed_abstract()
        boxed["null_ids"] = jax.ShapeDtypeStruct(self.null_ids.shape, jnp.int32)
        boxed["null_mask"] = jax.ShapeDtypeStruct(self.null_mask.shape, jnp.bool_)
        params = {"text": self.clip.text_params, "vision": self.clip.vision_params,
                  "null_ids": self.null_ids, "null_mask": self.null_mask}
        return boxed, params

    def conditioning(self, frozen, batch):
        """(CLIP image embedding, text embedding, text hidden states), no gradient."""
        clip = self.clip
        image = clip.encode_image(frozen["vision"],
                                  clip_pixels(batch["image"], clip.vision_config.image_size))
        text, hidden = clip.encode_text(frozen["text"], batch["input_ids"])
        return jax.lax.stop_gradient((image, text, hidden))

    def drop_text(self, frozen, rng, p: float, text, hidden, mask):
        """Replace each row's text by the empty prompt's with probability p."""
        null_text, null_hidden = self.clip.encode_text(frozen["text"], frozen["null_ids"])
        dropped = drop(rng, p, text.shape[0])
        return (select_rows(dropped, text, jax.lax.stop_gradient(null_text)),
                select_rows(dropped, hidden, jax.lax.stop_gradient(null_hidden)),
                select_rows(dropped, mask, frozen["null_mask"]))

    def dummy_batch(self, batch_size):
        s = int(self.config.data.image_size)
        return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
                "input_ids": np.zeros((batch_size, self.L), np.int32),
                "text_mask": np.ones((batch_size, self.L), bool)}

    def batches(self, *, batch_size, seed, start_step, process_index, process_count):
        from unclip_jax.data.sources import image_text_batches

        for raw, skipped in image_text_batches(
                self.config.data, image_size=int(self.config.data.image_size),
                batch_size=batch_size, seed=seed, start_step=start_step,
                process_index=process_index, process_count=process_count):
            ids, mask = tokenize_captions(self.tokenizer, raw["caption"], self.L)
            yield {"image": raw["image"], "input_ids": ids, "text_mask": mask}, skipped
