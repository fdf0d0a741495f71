"""Embeddings sets: precomputed CLIP embeddings with the text encoder's hidden states, the
prior's training source (`data.source=clip_embeddings`): no images and no CLIP in the step.

The layout (clip-retrieval's, extended) is described in :mod:`unclip_jax.data.clip_embeddings`.
Here: :func:`write_embeddings` (one shard) and :func:`write_embeddings_info` /
:func:`read_embeddings_info` (how the set was made, the empty prompt's encoding);
:func:`check_embeddings` refuses a set made with another CLIP before training starts;
:func:`embedding_batches` yields the prior's training batches (numpy, deterministic in
(seed, step, process), resumable at any step).
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from unclip_jax.data import fs
from unclip_jax.data.clip_embeddings import list_embedding_shards, load_npy

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Writing a set (with the text encoder's hidden states) and recording how it was made
# ---------------------------------------------------------------------------------------------

#: The file at a set's root recording how it was made (see :func:`write_embeddings_info`).
INFO_FILE = "embeddings.json"
#: Beside it: the empty prompt's encoding (``text_embed``, ``text_hidden``, ``text_mask``).
NULL_FILE = "null.npz"
INFO_FORMAT = 1
_REEMBED = ("re-embed the set with this CLIP (embedding_sets.write_embeddings / "
            "write_embeddings_info), or point data.path at a set made with it")


def _shard_path(root: str, kind: str, i: int, ext: str = "npy") -> str:
    """``root/{dir}/{dir}_{i}.{ext}`` with ``kind`` one of img_emb, text_emb, text_hidden,
    text_mask, metadata."""
    return os.path.join(root, kind, f"{kind}_{i}.{ext}")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _float_array(x, name: str, ndim: int) -> np.ndarray:
    """``x`` as float16 (kept) or float32 (everything else), checked to be ``ndim``-D."""
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    return a if a.dtype == np.float16 else a.astype(np.float32)


def _bool_array(x, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.dtype != np.bool_:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got values other than 0 and 1")
        a = a.astype(bool)
    return a


def write_embeddings(root, shard_index: int, *, image_embed, text_embed, text_hidden=None,
                     text_mask=None, captions: Sequence[str] | None = None) -> dict[str, str]:
    """Write shard ``shard_index`` of an embeddings set under ``root`` (local or ``gs://``).

    Args:
      image_embed: ``[N, E]`` CLIP image embeddings.
      text_embed: ``[N, E]`` pooled, projected, unnormalised CLIP text embeddings (row r belongs
        to image row r).
      text_hidden: optional ``[N, L, D]`` text-encoder last hidden states; ``text_mask`` (``[N, L]``
        bool or 0/1) must come with it.
      captions: optional ``N`` strings, written as ``metadata/metadata_{i}.parquet`` (column
        ``caption``, the clip-retrieval layout) when pyarrow is installed, else as
        ``metadata/metadata_{i}.json`` (``{"caption": [...]}``); both are read back by
        :func:`clip_embedding_pairs` (``caption_column="caption"``).

    Float arrays are stored as float16 when given as float16, else float32.  The image shard is
    written last (each file atomically when local), so readers, which list the image shards,
    never see a half-written shard.  Returns ``{kind: path}`` of the files written.
    """
    root = os.fspath(root)
    i = int(shard_index)
    if i < 0:
        raise ValueError(f"shard_index must be >= 0, got {shard_index}")
    img = _float_array(image_embed, "image_embed", 2)
    txt = _float_array(text_embed, "text_embed", 2)
    n, e = img.shape
    if txt.shape != (n, e):
        raise ValueError(f"text_embed {txt.shape} must match image_embed {img.shape} ([N, E])")
    arrays = {"text_emb": txt}
    if (text_hidden is None) != (text_mask is None):
        raise ValueError("text_hidden and text_mask go together: give both or neither")
    if text_hidden is not None:
        hid = _float_array(text_hidden, "text_hidden", 3)
        mask = _bool_array(text_mask, "text_mask", 2)
        if hid.shape[0] != n or mask.shape != hid.shape[:2]:
            raise ValueError(f"text_hidden {hid.shape} and text_mask {mask.shape} must be "
                             f"[N, L, D] and [N, L] with N = {n} (the image_embed rows)")
        arrays.update(text_hidden=hid, text_mask=mask)
    written = {}
    for kind, a in arrays.items():
        fs.makedirs(os.path.join(root, kind))
        written[kind] = _shard_path(root, kind, i)
        fs.write_bytes(written[kind], _npy_bytes(a))
    if captions is not None:
        captions = [str(c) for c in captions]
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} embedding rows")
        fs.makedirs(os.path.join(root, "metadata"))
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            written["metadata"] = _shard_path(root, "metadata", i, "json")
            fs.write_bytes(written["metadata"], json.dumps({"caption": captions}).encode())
        else:
            written["metadata"] = _shard_path(root, "metadata", i, "parquet")
            buf = io.BytesIO()
            pq.write_table(pa.table({"caption": captions}), buf)
            fs.write_bytes(written["metadata"], buf.getvalue())
    fs.makedirs(os.path.join(root, "img_emb"))
    written["img_emb"] = _shard_path(root, "img_emb", i)
    fs.write_bytes(written["img_emb"], _npy_bytes(img))
    return written


def _json_value(x):
    """``x`` as plain JSON data (numpy scalars and arrays, tuples -> lists); raises TypeError for
    anything JSON cannot hold."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")
    return json.loads(json.dumps(x, default=default))


def _opt_int(info: Mapping, key: str):
    v = info.get(key)
    return None if v is None else int(v)


def write_embeddings_info(root, info: Mapping[str, Any]) -> str:
    """Record how the set under ``root`` was made: ``root/embeddings.json`` + ``root/null.npz``.

    ``info`` must hold
      ``model``: a dict naming the CLIP (free-form JSON data, e.g. its config dict and the path
        of its weights) -- :func:`check_embeddings` compares it with the caller's;
      ``embed_dim``: E;
      ``text_len``, ``text_width``: L and D of the hidden states (both None: the set has none);
      ``null``: the empty prompt's encoding, dict of arrays ``text_embed`` [E] and, with hidden
        states, ``text_hidden`` [L, D] and ``text_mask`` [L] (stored as float32 / bool in
        ``null.npz``);
    and may hold anything else JSON can (e.g. ``count``, ``normalized: False``).
    Returns the path of ``embeddings.json``.
    """
    root = os.fspath(root)
    missing = [k for k in ("model", "embed_dim", "text_len", "text_width", "null") if k not in info]
    if missing:
        raise ValueError(f"embeddings info needs {missing} (see write_embeddings_info)")
    if not isinstance(info["model"], Mapping):
        raise ValueError(f"info['model'] must be a dict naming the CLIP, got {info['model']!r}")
    e, length, width = int(info["embed_dim"]), _opt_int(info, "text_len"), _opt_int(info,
                                                                                   "text_width")
    if (length is None) != (width is None):
        raise ValueError("text_len and text_width go together: give both (the set has hidden "
                         "states) or neither (None)")
    null = info["null"]
    null_arrays = {"text_embed": np.asarray(null["text_embed"], np.float32)}
    if null_arrays["text_embed"].shape != (e,):
        raise ValueError(f"null text_embed must be [{e}], got {null_arrays['text_embed'].shape}")
    if length is not None:
        if "text_hidden" not in null or "text_mask" not in null:
            raise ValueError("a set with hidden states needs the null prompt's text_hidden and "
                             "text_mask")
        null_arrays["text_hidden"] = np.asarray(null["text_hidden"], np.float32)
        null_arrays["text_mask"] = _bool_array(null["text_mask"], "null text_mask", 1)
        if null_arrays["text_hidden"].shape != (length, width) or \
                null_arrays["text_mask"].shape != (length,):
            raise ValueError(f"null text_hidden {null_arrays['text_hidden'].shape} / text_mask "
                             f"{null_arrays['text_mask'].shape} must be [{length}, {width}] / "
                             f"[{length}]")
    record = {k: v for k, v in info.items() if k != "null"}
    record.update(embed_dim=e, text_len=length, text_width=width, null=NULL_FILE,
                  format=INFO_FORMAT)
    record = _json_value(record)
    fs.makedirs(root)
    buf = io.BytesIO()
    np.savez(buf, **null_arrays)
    fs.write_bytes(os.path.join(root, NULL_FILE), buf.getvalue())
    path = os.path.join(root, INFO_FILE)
    fs.write_bytes(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return path


def read_embeddings_info(root) -> dict[str, Any]:
    """The record of :func:`write_embeddings_info`, with ``null`` as a dict of numpy arrays
    (``text_embed`` float32 [E], and ``text_hidden`` float32 [L, D], ``text_mask`` bool [L] for a
    set with hidden states).  Raises ``FileNotFoundError`` for a set without ``embeddings.json``
    (e.g. plain clip-retrieval output)."""
    root = os.fspath(root)
    path = os.path.join(root, INFO_FILE)
    if not fs.exists(path):
        raise FileNotFoundError(f"{root!r} has no {INFO_FILE} (a plain clip-retrieval set?): it "
                                "does not record its CLIP nor the empty prompt's encoding")
    info = json.loads(fs.read_bytes(path).decode("utf-8"))
    with np.load(io.BytesIO(fs.read_bytes(os.path.join(root, info.get("null") or NULL_FILE))),
                 allow_pickle=False) as z:
        info["null"] = {k: z[k] for k in z.files}
    return info


# ---------------------------------------------------------------------------------------------
# Checking a set against the CLIP a run uses
# ---------------------------------------------------------------------------------------------


def _npy_shape(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header (reads nothing else)."""
    if not fs.is_remote(path):
        a = np.load(path, mmap_mode="r")
        return a.shape, a.dtype
    with fs.open_file(path) as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is not None:
            shape, _, dtype = read(f)
            return shape, dtype
    a = load_npy(path)
    return a.shape, a.dtype


def _embedding_shards(root: str) -> list[dict[str, Any]]:
    """Every shard of a set: dicts ``i``, ``img_emb``, ``text_emb``, ``text_hidden`` and
    ``text_mask`` (paths; '' where the shard has none)."""
    out = []
    for i, img, txt, _ in list_embedding_shards(root):
        d = {"i": i, "img_emb": img, "text_emb": txt}
        for kind in ("text_hidden", "text_mask"):
            p = _shard_path(root, kind, i)
            d[kind] = p if fs.exists(p) else ""
        out.append(d)
    return out


def _no_hidden_message(root: str, shards: Sequence[Mapping]) -> str:
    lacking = [s["i"] for s in shards if not (s["text_hidden"] and s["text_mask"])]
    return (f"CLIP embeddings at {root!r} have no text hidden states "
            f"(text_hidden/text_hidden_{{i}}.npy + text_mask/text_mask_{{i}}.npy missing for "
            f"shard(s) {lacking[:8]}{'...' if len(lacking) > 8 else ''}): plain clip-retrieval "
            "output carries only the pooled embeddings, but the prior also needs the text "
            f"encoder's last hidden states [L, D] and their mask; {_REEMBED}")


def _shard_shapes(root: str, shards: Sequence[Mapping], hidden: bool) -> dict[str, Any]:
    """Check the shards agree with each other; returns ``E``, ``L``, ``D`` (None without hidden
    states) and the row counts ``n``."""
    dims, ns = {}, []
    for s in shards:
        ishape, _ = _npy_shape(s["img_emb"])
        tshape, _ = _npy_shape(s["text_emb"])
        if len(ishape) != 2:
            raise ValueError(f"{root!r} shard {s['i']}: img_emb has shape {ishape}, not [N, E]")
        n, e = ishape
        if tshape != (n, e):
            raise ValueError(f"{root!r} shard {s['i']}: text_emb {tshape} differs from img_emb "
                             f"{(n, e)}")
        got = {"E": e}
        if hidden:
            hshape, _ = _npy_shape(s["text_hidden"])
            mshape, mdtype = _npy_shape(s["text_mask"])
            if len(hshape) != 3 or hshape[0] != n or mshape != hshape[:2] or mdtype != np.bool_:
                raise ValueError(f"{root!r} shard {s['i']}: text_hidden {hshape} / text_mask "
                                 f"{mshape} {mdtype} are not [{n}, L, D] / bool [{n}, L]")
            got.update(L=hshape[1], D=hshape[2])
        for k, v in got.items():
            if dims.setdefault(k, v) != v:
                raise ValueError(f"{root!r}: shard {s['i']} has {k} = {v}, earlier shards "
                                 f"{dims[k]}")
        ns.append(n)
    return {"E": dims["E"], "L": dims.get("L"), "D": dims.get("D"), "n": ns}


def check_embeddings(root, *, embed_dim: int, text_len: int | None = None,
                     text_width: int | None = None, model: Mapping | None = None
                     ) -> dict[str, Any]:
    """Refuse (``ValueError``) an embeddings set that does not fit the CLIP a run uses.

    ``embed_dim`` is E; ``text_len`` / ``text_width`` (L, D) are given by a caller that needs the
    hidden states (the prior) and are then required of the set; ``model`` (a dict, compared with
    the recorded ``model`` after a JSON round trip) is checked when given.  A set with
    ``embeddings.json`` must record the same widths (and model); a set without it (plain
    clip-retrieval output) is checked on its shard widths only and refused when hidden states
    are needed and it has none.  The shards are always checked to have the widths expected.
    Returns the set's info (:func:`read_embeddings_info`), ``{}`` if it has none.
    """
    root = os.fspath(root)
    need_hidden = text_len is not None or text_width is not None
    shards = _embedding_shards(root)
    has_info = fs.exists(os.path.join(root, INFO_FILE))
    info = read_embeddings_info(root) if has_info else {}
    want = {"embed_dim": int(embed_dim), "text_len": text_len, "text_width": text_width}
    if has_info:
        made_with = f" (made with model {json.dumps(info.get('model'), sort_keys=True)})"
        if need_hidden and info.get("text_len") is None:
            raise ValueError(_no_hidden_message(root, shards) + " -- its "
                             f"{INFO_FILE} records text_len = text_width = None")
        for key, expected in want.items():
            if expected is not None and info.get(key) != int(expected):
                raise ValueError(
                    f"CLIP embeddings at {root!r} record {key}={info.get(key)}{made_with}, but "
                    f"this run's CLIP has {key}={int(expected)}: {_REEMBED}")
        if model is not None:
            expected_model = _json_value(dict(model))
            recorded = info.get("model")
            if expected_model != recorded:
                rec = recorded if isinstance(recorded, dict) else {}
                differ = sorted(k for k in set(rec) | set(expected_model)
                                if rec.get(k, "<missing>") != expected_model.get(k, "<missing>"))
                raise ValueError(
                    f"CLIP embeddings at {root!r} were made with another CLIP: the set records "
                    f"model {json.dumps(recorded, sort_keys=True)}, this run expects model "
                    f"{json.dumps(expected_model, sort_keys=True)} (they differ in {differ}): "
                    f"{_REEMBED}")
    elif model is not None:
        log.warning("CLIP embeddings at %r have no %s: which CLIP made them cannot be checked "
                    "(only their widths are)", root, INFO_FILE)
    if need_hidden and not all(s["text_hidden"] and s["text_mask"] for s in shards):
        raise ValueError(_no_hidden_message(root, shards))
    got = _shard_shapes(root, shards, need_hidden)
    for key, dim, expected in (("embed_dim", "E", embed_dim), ("text_len", "L", text_len),
                               ("text_width", "D", text_width)):
        if expected is not None and got[dim] != int(expected):
            origin = (f"although its {INFO_FILE} records {key}={info.get(key)}: the set is "
                      "inconsistent" if has_info else f"it has no {INFO_FILE}")
            raise ValueError(f"CLIP embeddings at {root!r} have {key}={got[dim]} in their shards "
                             f"({origin}), but this run's CLIP has {key}={int(expected)}: "
                             f"{_REEMBED}")
    return info


# ---------------------------------------------------------------------------------------------
# The prior's training batches
# ---------------------------------------------------------------------------------------------

_MAX_REDRAWS = 1000  # draws for one batch position before the set is declared unusable
_BATCH_KEYS = ("image_embed", "text_embed", "text_hidden", "text_mask")
_FILE_OF = {"image_embed": "img_emb", "text_embed": "text_emb", "text_hidden": "text_hidden",
            "text_mask": "text_mask"}


def _cfg(cfg, key: str, default=None):
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _rows_rng(seed: int, step: int, position: int | None = None) -> np.random.Generator:
    """The draws of step ``step`` (``position`` None: the global batch's rows; else the redraws
    of that position of the global batch, after a non-finite row)."""
    words = [int(seed), int(step), 0xE3BED]
    if position is not None:
        words.append(int(position) + 1)
    return np.random.default_rng(np.random.SeedSequence(words))


def embedding_batches(data_cfg, *, batch_size: int, seed: int, start_step: int,
                      process_index: int = 0, process_count: int = 1
                      ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Endless training batches for the prior from an embeddings set (``data_cfg.path``).

    Yields ``(batch, skipped)``: ``batch`` is a dict of numpy arrays ``image_embed`` float32
    [B, E], ``text_embed`` float32 [B, E], ``text_hidden`` float32 [B, L, D] and ``text_mask``
    bool [B, L], with ``B = batch_size`` rows *per process*; ``skipped`` is the number of rows
    drawn for this process's part of the batch and replaced because they held a non-finite value.

    The global batch of step ``s`` (``batch_size * process_count`` rows, drawn uniformly with
    replacement from all rows of all shards) is a function of ``(seed, s)`` only, and process
    ``p`` takes rows ``p*B:(p+1)*B`` of it -- so the stream can start at any ``start_step`` (a
    resumed run sees the batches an uninterrupted one would) and does not depend on how many
    processes share the global batch.  A drawn row with a non-finite value is replaced by a
    redraw from ``(seed, s, position)``, and counted. ``data_cfg.order="sequential"`` reads
    the rows in their stored order instead (step ``s`` takes global rows ``s*G .. s*G+G-1``,
    wrapping around; for a set shuffled when it was made).

    Shards are memory-mapped (local) or read into memory (remote), float16 is widened to
    float32.  The set must have the hidden states (``text_hidden``/``text_mask`` shards); call
    :func:`check_embeddings` first to check it was made with the run's CLIP.  ``data_cfg.source``,
    if set, must be ``"clip_embeddings"``.
    """
    source = _cfg(data_cfg, "source")
    if source not in (None, "", "clip_embeddings"):
        raise ValueError(f"embedding_batches reads data.source='clip_embeddings', not {source!r}")
    root = _cfg(data_cfg, "path")
    if not root:
        raise ValueError("data.source='clip_embeddings' needs data.path (the embeddings set)")
    root = os.fspath(root)
    if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad batch_size={batch_size} / process_index={process_index} / "
                         f"process_count={process_count}")
    shards = _embedding_shards(root)
    if not all(s["text_hidden"] and s["text_mask"] for s in shards):
        raise ValueError(_no_hidden_message(root, shards))
    dims = _shard_shapes(root, shards, hidden=True)
    offsets = np.concatenate([[0], np.cumsum(dims["n"])]).astype(np.int64)
    n = int(offsets[-1])
    if n == 0:
        raise ValueError(f"the embeddings set at {root!r} has no rows")
    arrays = [{k: load_npy(s[_FILE_OF[k]]) for k in _BATCH_KEYS} for s in shards]
    e, length, width = dims["E"], dims["L"], dims["D"]
    layout = {"image_embed": ((e,), np.float32), "text_embed": ((e,), np.float32),
              "text_hidden": ((length, width), np.float32), "text_mask": ((length,), np.bool_)}

    def gather(idx: np.ndarray) -> dict[str, np.ndarray]:
        shard = np.searchsorted(offsets, idx, side="right") - 1
        local = idx - offsets[shard]
        out = {k: np.empty((len(idx),) + shape, dtype) for k, (shape, dtype) in layout.items()}
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            rows = local[sel]
            for k in _BATCH_KEYS:
                out[k][sel] = arrays[s][k][rows]
        return out

    def finite(b: dict[str, np.ndarray]) -> np.ndarray:
        ok = np.ones(len(b["image_embed"]), bool)
        for k in ("image_embed", "text_embed", "text_hidden"):
            ok &= np.isfinite(b[k].reshape(len(ok), -1)).all(axis=1)
        return ok

    global_batch = batch_size * process_count
    first = process_index * batch_size
    order = _cfg(data_cfg, "order") or "random"
    if order not in ("random", "sequential"):
        raise ValueError(f"data.order must be 'random' or 'sequential', got {order!r}")
    step = int(start_step)
    while True:
        if order == "sequential":
            idx = (step * global_batch + first + np.arange(batch_size, dtype=np.int64)) % n
        else:
            idx = _rows_rng(seed, step).integers(n, size=global_batch)[first:first + batch_size]
        batch = gather(idx)
        skipped = 0
        for j in np.flatnonzero(~finite(batch)):
            rng = _rows_rng(seed, step, first + int(j))
            for _ in range(_MAX_REDRAWS):
                skipped += 1
                row = gather(rng.integers(n, size=1))
                if finite(row)[0]:
                    break
            else:
                raise ValueError(f"the embeddings set at {root!r}: {_MAX_REDRAWS} rows drawn in "
                                 "a row all held non-finite values (is the set corrupt?)")
            for k in _BATCH_KEYS:
                batch[k][j] = row[k][0]
        yield batch, skipped
        step += 1


__all__ = ["write_embeddings", "write_embeddings_info", "read_embeddings_info",
           "check_embeddings", "embedding_batches", "INFO_FILE", "NULL_FILE"]
