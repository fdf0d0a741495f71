"""Host-side batch streams for the trainer: image–caption pairs and CLIP-embedding pairs.

Every stream is deterministic in (seed, step, process) and can start at any step, so a resumed
run sees exactly the batches an uninterrupted run would have seen. Each batch comes with the number
of examples skipped while making it (undecodable images, empty captions).

Sources (config `data.source`):
  shapes      the procedural shapes world (the embedded default), pre-rendered once and cached
  webdataset  img2dataset tar shards (data.path: a glob or directory)
  folder      a folder of images with same-stem .txt captions
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np

SOURCES = ("shapes", "webdataset", "folder")


def shapes_arrays(n: int, seed: int, image_size: int, split: str = "train",
                  cache_dir: str | None = None) -> dict[str, Any]:
    """`n` examples of a shapes-world split at `image_size`: image uint8 [n,S,S,3], caption
    (canonical) [n], captions (lists), scene (JSON) [n]; cached as .npz in `cache_dir`."""
    from unclip_jax.data import shapes
    from unclip_jax.data.shapes_tfds import as_numpy

    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"shapes_{split}_{n}_{seed}_{image_size}.npz")
        if os.path.exists(path):
            z = np.load(path, allow_pickle=False)
            return {"image": z["image"], "caption": z["caption"], "scene": z["scene"],
                    "captions": json.loads(str(z["captions"]))}
    d = as_numpy(split, n, seed=seed, image_size=64)
    if image_size != 64:
        d["image"] = np.stack([shapes.resize(im, image_size) for im in d["image"]])
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, image=d["image"], caption=d["caption"], scene=d["scene"],
                 captions=np.array(json.dumps(d["captions"])))
        os.replace(tmp, path)
    return d


def _step_rng(seed: int, step: int, process_index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), int(process_index),
                                                         0x5EED]))


def image_text_batches(data_cfg, *, image_size: int, batch_size: int, seed: int, start_step: int,
                       process_index: int = 0, process_count: int = 1
                       ) -> Iterator[tuple[dict[str, Any], int]]:
    """Batches dict(image uint8 [B,S,S,3], caption list[str]) with the count of skipped examples."""
    source = data_cfg.source
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")
    if source == "shapes":
        d = shapes_arrays(int(data_cfg.num_examples), int(data_cfg.get("seed", 0)), image_size,
                          cache_dir=data_cfg.get("cache_dir") or None)
        n = len(d["image"])
        step = start_step
        while True:
            rng = _step_rng(seed, step, process_index)
            idx = rng.integers(n, size=batch_size)
            caps = [d["captions"][i][int(rng.integers(len(d["captions"][i])))] for i in idx]
            yield {"image": d["image"][idx], "caption": caps}, 0
            step += 1
    yield from _tfdata_batches(data_cfg, image_size=image_size, batch_size=batch_size, seed=seed,
                               start_step=start_step, process_index=process_index,
                               process_count=process_count)


def _tfdata_batches(data_cfg, *, image_size, batch_size, seed, start_step, process_index,
                    process_count):
    """Real image–caption data through tf.data (TensorFlow kept off accelerators)."""
    from unclip_jax.data import pipelines

    kw = dict(image_size=image_size, process_index=process_index, process_count=process_count,
              seed=seed)
    if data_cfg.source == "webdataset":
        ds = pipelines.webdataset_pairs(data_cfg.path, **kw)
    else:
        ds = pipelines.folder_pairs(data_cfg.path, **kw)
    yield from pipelines.resumable_batches(ds, batch_size, seed=seed, start_step=start_step,
                                           shuffle_buffer=int(data_cfg.get("shuffle_buffer", 10000)))
