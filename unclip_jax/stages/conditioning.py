"""CLIP as a frozen input of the prior and decoder stages: tokens, conditioning dropout, the
frozen params handed to the trainer, and the embeddings of a batch computed inside the step.

Not a stage: the prior and the decoder read a *trained* CLIP — our CLIP stage's directory or a
transformers CLIPModel directory — through `unclip_jax.workdir.load_frozen_clip`.
"""
from __future__ import annotations

import os
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.workdir import load_frozen_clip


#: per tokenizer: (context length, caption) -> (ids [L] int32, mask [L] bool); a training run
#: sees the same captions again and again (the shapes world has a few thousand), and
#: tokenizing a batch was most of a step's host work (docs/PERFORMANCE.md)
_TOKEN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
TOKEN_CACHE_MAX = 200_000  # captions kept per tokenizer; later new ones are tokenized uncached


def tokenize_captions(tokenizer, captions: Sequence[str], context_length: int):
    """Captions -> (input_ids int32 [B, L], mask bool [B, L]); silent truncation (training).
    Rows are cached per tokenizer and caption (each row depends on its caption alone: right
    padding to L, truncation at L)."""
    from unclip_jax.data.tokenizer import tokenize

    captions = [str(c) for c in captions]
    L = int(context_length)
    try:
        cache = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weakly referenceable: no cache
        cache = None
    if cache is None or not captions:
        ids, mask = tokenize(tokenizer, captions, L, warn=False)
        return ids, mask.astype(bool)
    missing = list(dict.fromkeys(c for c in captions if (L, c) not in cache))
    fresh = {}
    if missing:
        ids, mask = tokenize(tokenizer, missing, L, warn=False)
        for c, i, m in zip(missing, ids, mask.astype(bool)):
            fresh[(L, c)] = (i.copy(), m.copy())
            if len(cache) < TOKEN_CACHE_MAX:
                cache[(L, c)] = fresh[(L, c)]
    rows = [cache.get((L, c)) or fresh[(L, c)] for c in captions]
    return (np.stack([r[0] for r in rows]).astype(np.int32, copy=False),
            np.stack([r[1] for r in rows]))


def drop(rng, p: float, n: int) -> jax.Array:
    """[n] bool, True with probability p."""
    return jax.random.uniform(rng, (n,)) < p


def select_rows(mask_rows, a, b):
    """Row-wise where: mask [B] picks a's rows, else b's (b broadcast over the batch)."""
    m = mask_rows.reshape((-1,) + (1,) * (a.ndim - 1))
    return jnp.where(m, jnp.broadcast_to(b, a.shape), a)


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
        self.clip_dir = clip_dir
        self.clip = load_frozen_clip(clip_dir)
        if self.clip.embed_dim != embed_dim:
            raise ValueError(f"the {self.name}'s {what} {embed_dim} differs from CLIP's "
                             f"projection_dim {self.clip.embed_dim}")
        tok_path = config.get("tokenizer") or self.clip.tokenizer_path
        if not tok_path:
            raise ValueError("no tokenizer: set config.tokenizer")
        self.tokenizer_path = tok_path
        self.tokenizer = load_tokenizer(tok_path)
        self.L = self.clip.context_length
        self.null_ids, self.null_mask = tokenize_captions(self.tokenizer, [""], self.L)

    def paths(self) -> dict:
        """The CLIP and tokenizer this stage trains against (for its record)."""
        return {"clip_dir": self.clip_dir, "tokenizer": self.tokenizer_path}

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
        image = clip.encode_images_uint8(frozen["vision"], batch["image"])
        text, hidden = clip.encode_text(frozen["text"], batch["input_ids"])
        return jax.lax.stop_gradient((image, text, hidden))

    def null_encoding(self, frozen):
        """The empty prompt's (text embedding [1, E], hidden states [1, L, D], mask [1, L])."""
        null_text, null_hidden = self.clip.encode_text(frozen["text"], frozen["null_ids"])
        return jax.lax.stop_gradient(null_text), jax.lax.stop_gradient(null_hidden), \
            frozen["null_mask"]

    def drop_text(self, frozen, rng, p: float, text, hidden, mask):
        """Replace each row's text by the empty prompt's with probability p."""
        null_text, null_hidden, null_mask = self.null_encoding(frozen)
        dropped = drop(rng, p, text.shape[0])
        return (select_rows(dropped, text, null_text), select_rows(dropped, hidden, null_hidden),
                select_rows(dropped, mask, null_mask))

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


def precompute_embeddings(clip, tokenizer, batches, root: str, *, shard: int = 0) -> dict:
    """Write the CLIP embeddings of image-caption batches ((dict(image uint8, caption), skipped)
    pairs, e.g. `data.sources.image_text_batches`) as one shard of an embeddings set at `root`
    (`data.clip_embeddings` layout, with text hidden states and the empty prompt's encoding),
    for a prior that trains with `data.source=clip_embeddings`. Returns the set's info."""
    from unclip_jax.data import embedding_sets as E

    tp = clip.text_params
    enc_text = jax.jit(clip.encode_text)
    L = clip.context_length
    cols = {"image_embed": [], "text_embed": [], "text_hidden": [], "text_mask": []}
    captions = []
    for raw, _ in batches:
        ids, mask = tokenize_captions(tokenizer, raw["caption"], L)
        text, hidden = enc_text(tp, jnp.asarray(ids))
        cols["image_embed"].append(clip.embed_images(raw["image"]))
        cols["text_embed"].append(np.asarray(text))
        cols["text_hidden"].append(np.asarray(hidden))
        cols["text_mask"].append(mask)
        captions += list(raw["caption"])
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    E.write_embeddings(root, shard, captions=captions, **arrays)
    null_ids, null_mask = tokenize_captions(tokenizer, [""], L)
    null_text, null_hidden = enc_text(tp, jnp.asarray(null_ids))
    info = {"model": clip.description(), "embed_dim": clip.embed_dim, "text_len": L,
            "text_width": int(arrays["text_hidden"].shape[-1]),
            "null": {"text_embed": np.asarray(null_text)[0],
                     "text_hidden": np.asarray(null_hidden)[0], "text_mask": null_mask[0]}}
    E.write_embeddings_info(root, info)
    return info

