"""Precomputed CLIP embeddings, for training the prior without touching images or CLIP.

Layout (clip-retrieval's, extended backward-compatibly), shards ``i`` = 0, 1, ... under a root:

* ``img_emb/img_emb_{i}.npy``   float16/float32 ``[N_i, E]`` CLIP image embeddings;
* ``text_emb/text_emb_{i}.npy`` float16/float32 ``[N_i, E]`` pooled, projected (unnormalised)
  CLIP text embeddings, rows matched with the image rows by index;
* optionally ``metadata/metadata_{i}.parquet`` (clip-retrieval; column ``caption``; reading it
  needs pyarrow) -- :func:`~unclip_jax.data.embedding_sets.write_embeddings` writes it when pyarrow is installed and otherwise
  ``metadata/metadata_{i}.json`` (``{"caption": [...]}``), which the readers accept too;

and, added here (plain clip-retrieval output has neither):

* ``text_hidden/text_hidden_{i}.npy`` float16/float32 ``[N_i, L, D]`` the text encoder's last
  hidden states, with ``text_mask/text_mask_{i}.npy`` bool ``[N_i, L]`` (True: a real token);
* ``embeddings.json`` at the root: how the set was made (:func:`~unclip_jax.data.embedding_sets.write_embeddings_info`: the CLIP
  ``model``, ``embed_dim``, ``text_len``, ``text_width``), with ``null.npz`` beside it holding the
  empty prompt's encoding (``text_embed`` [E], ``text_hidden`` [L, D], ``text_mask`` [L]) for
  classifier-free text dropout.

This module reads clip-retrieval sets through tf.data (:func:`clip_embedding_pairs`, image/text
embeddings only). Writing a set, recording how it was made, checking it against a CLIP and the
prior's training batches live in :mod:`unclip_jax.data.embedding_sets`.

Rows with a non-finite value are skipped and counted like undecodable images (see
:mod:`unclip_jax.data.pipelines`)."""
from __future__ import annotations

import io
import json
import logging
import os
import re

import numpy as np

from unclip_jax.data import fs
from unclip_jax.data.pipelines import SKIPPED_KEY, deterministic_options, process_part

log = logging.getLogger(__name__)

_FINITE_CHUNK = 4096  # embedding rows per read


def list_embedding_shards(root) -> list[tuple[int, str, str, str]]:
    """``(i, img_emb_i.npy, text_emb_i.npy, metadata_i)`` for every image shard of a
    clip-retrieval output folder, sorted by ``i``; the metadata path is the ``.parquet`` (or else
    the ``.json``, see the module docstring), '' if neither exists.  Raises if a text shard is
    missing."""
    root = os.fspath(root)
    found = {}
    for path in fs.glob_files(os.path.join(root, "img_emb", "img_emb_*.npy")):
        m = re.fullmatch(r"img_emb_(\d+)\.npy", os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    if not found:
        raise FileNotFoundError(f"no img_emb/img_emb_*.npy under {root!r}")
    out = []
    for i in sorted(found):
        text = os.path.join(root, "text_emb", f"text_emb_{i}.npy")
        if not fs.exists(text):
            raise FileNotFoundError(f"{found[i]} has no matching {text}")
        metas = [os.path.join(root, "metadata", f"metadata_{i}.{ext}")
                 for ext in ("parquet", "json")]
        out.append((i, found[i], text, next((m for m in metas if fs.exists(m)), "")))
    return out


def load_npy(path: str) -> np.ndarray:
    if fs.is_remote(path):
        return np.load(io.BytesIO(fs.read_bytes(path)))
    return np.load(path, mmap_mode="r")


def _read_captions(meta_path: str, column: str, n: int) -> list[str]:
    if meta_path.endswith(".json"):  # written by write_embeddings without pyarrow
        table = json.loads(fs.read_bytes(meta_path).decode("utf-8"))
        if column not in table:
            raise KeyError(f"{meta_path} has no column {column!r} (it has {sorted(table)})")
        captions = ["" if c is None else str(c) for c in table[column]]
        if len(captions) != n:
            raise ValueError(f"{meta_path} has {len(captions)} rows, the embeddings {n}")
        return captions
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading clip-retrieval captions needs pyarrow "
                          "(`pip install pyarrow`); the .npy embeddings alone do not") from e
    if not meta_path:
        raise FileNotFoundError("caption_column given but the shard has no metadata parquet")
    with fs.open_file(meta_path) as f:
        table = pq.read_table(f, columns=[column])
    captions = ["" if c is None else str(c) for c in table.column(column).to_pylist()]
    if len(captions) != n:
        raise ValueError(f"{meta_path} has {len(captions)} rows, the embeddings {n}")
    return captions


def clip_embedding_pairs(root, *, process_index: int = 0, process_count: int = 1,
                         shuffle_files: bool = True, seed: int = 0, drop_invalid: bool = True,
                         caption_column: str | None = None):
    """Paired CLIP image/text embeddings from a clip-retrieval output folder.

    Shards ``i`` (``img_emb/img_emb_{i}.npy`` with ``text_emb/text_emb_{i}.npy``, rows matched by
    index) ``process_index::process_count`` of the sorted list go to this process.  Arrays are
    memory-mapped and read in chunks; float16 is widened to float32.  A row with a non-finite
    value in either embedding is invalid (dropped and counted in ``skipped``).

    ``caption_column`` (e.g. ``"caption"``) also yields ``caption`` from
    ``metadata/metadata_{i}.parquet`` -- this needs ``pyarrow``; without it only the arrays are
    read.  Output dicts: ``image_embed``/``text_embed`` float32 [D], ``key`` string
    (``"{i}/{row}"``), ``valid`` bool, ``skipped`` int32 (and ``caption``).
    """
    tf = fs.tensorflow()
    shards = process_part(list_embedding_shards(root), process_index, process_count, "shards")
    first_img = load_npy(shards[0][1])
    first_txt = load_npy(shards[0][2])
    if first_img.ndim != 2 or first_txt.ndim != 2:
        raise ValueError("clip-retrieval embeddings must be 2-D [N, D] arrays")
    d_img, d_txt = first_img.shape[1], first_txt.shape[1]
    del first_img, first_txt
    by_index = {i: (img, txt, meta) for i, img, txt, meta in shards}

    def chunks(order):
        """All chunks of one pass: dicts of rows plus their ``valid`` mask."""
        for i in order:
            i = int(i)
            img_path, txt_path, meta_path = by_index[i]
            img, txt = load_npy(img_path), load_npy(txt_path)
            if img.shape[0] != txt.shape[0] or img.shape[1] != d_img or txt.shape[1] != d_txt:
                raise ValueError(f"shard {i}: img_emb {img.shape} and text_emb {txt.shape} differ")
            caps = (_read_captions(meta_path, caption_column, img.shape[0])
                    if caption_column else None)
            for start in range(0, img.shape[0], _FINITE_CHUNK):
                a = np.array(img[start:start + _FINITE_CHUNK], np.float32)  # copies: the
                b = np.array(txt[start:start + _FINITE_CHUNK], np.float32)  # mmaps are read-only
                valid = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
                chunk = {"image_embed": a, "text_embed": b, "valid": valid,
                         "key": np.array([f"{i}/{r}".encode() for r in
                                          range(start, start + len(a))], dtype=object)}
                if caps is not None:
                    chunk["caption"] = np.array(
                        [c.strip().encode("utf-8") for c in caps[start:start + len(a)]],
                        dtype=object)
                yield chunk

    def gen(order):
        # The counting rule of _drop_invalid_counting, vectorised per chunk: the invalid rows
        # after a kept row are charged to it, those before the first kept row of the pass to
        # that row; one kept chunk is held back so the rows after it can still be charged.
        held, pending = None, 0
        for chunk in chunks(order):
            valid = chunk["valid"]
            if not drop_invalid:
                invalid = ~valid
                chunk["image_embed"][invalid] = 0.0
                chunk["text_embed"][invalid] = 0.0
                yield {**chunk, SKIPPED_KEY: invalid.astype(np.int32)}
                continue
            kept = np.flatnonzero(valid)
            if kept.size == 0:
                if held is None:
                    pending += len(valid)
                else:
                    held[SKIPPED_KEY][-1] += len(valid)
                continue
            skipped = (np.append(kept[1:], len(valid)) - kept - 1).astype(np.int32)
            if held is None:
                skipped[0] += pending + kept[0]
            else:
                held[SKIPPED_KEY][-1] += kept[0]
                yield held
            held = chunk if kept.size == len(valid) else {k: v[kept] for k, v in chunk.items()}
            held[SKIPPED_KEY] = skipped
        if held is not None:
            yield held

    sig = {"image_embed": tf.TensorSpec((None, d_img), tf.float32),
           "text_embed": tf.TensorSpec((None, d_txt), tf.float32),
           "valid": tf.TensorSpec((None,), tf.bool), "key": tf.TensorSpec((None,), tf.string),
           SKIPPED_KEY: tf.TensorSpec((None,), tf.int32)}
    if caption_column:
        sig["caption"] = tf.TensorSpec((None,), tf.string)
    ids = np.array([s[0] for s in shards], np.int64)
    if shuffle_files and len(shards) > 1:  # one permuted order per pass
        orders = tf.data.Dataset.from_tensor_slices(ids).shuffle(
            len(ids), seed=seed, reshuffle_each_iteration=True).batch(len(ids))
    else:
        orders = tf.data.Dataset.from_tensors(ids)
    ds = orders.flat_map(
        lambda order: tf.data.Dataset.from_generator(gen, output_signature=sig, args=(order,)))
    return ds.unbatch().with_options(deterministic_options())


__all__ = ["list_embedding_shards", "clip_embedding_pairs", "load_npy"]
