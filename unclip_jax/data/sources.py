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


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), 0x5EED]))


def image_text_batches(data_cfg, *, image_size: int, batch_size: int, seed: int, start_step: int,
                       process_index: int = 0, process_count: int = 1
                       ) -> Iterator[tuple[dict[str, Any], int]]:
    """Batches dict(image uint8 [B,S,S,3], caption list[str]) with the count of skipped examples.

    `batch_size` is per process. For the shapes source the *global* batch of a step is drawn
    from (seed, step) and each process takes its rows, so the data do not depend on how many
    processes share it (a 2-host run sees the batches of a 1-host run).
    """
    source = data_cfg.source
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")
    if source == "shapes":
        d = shapes_arrays(int(data_cfg.num_examples), int(data_cfg.get("seed", 0)), image_size,
                          cache_dir=data_cfg.get("cache_dir") or None)
        n = len(d["image"])
        rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
        step = start_step
        while True:
            rng = _step_rng(seed, step)
            idx = rng.integers(n, size=batch_size * process_count)[rows]
            pick = rng.random(batch_size * process_count)[rows]
            caps = [d["captions"][i][int(u * len(d["captions"][i]))] for i, u in zip(idx, pick)]
            yield {"image": d["image"][idx], "caption": caps}, 0
            step += 1
    yield from _tfdata_batches(data_cfg, image_size=image_size, batch_size=batch_size, seed=seed,
                               start_step=start_step, process_index=process_index,
                               process_count=process_count)


def _tfdata_batches(data_cfg, *, image_size, batch_size, seed, start_step, process_index,
                    process_count):
    """Real image–caption data through tf.data (TensorFlow kept off accelerators). Each process
    reads its own shards; a resumed run skips the batches already seen (same seed, same order)."""
    from unclip_jax.data import pipelines

    kw = dict(image_size=image_size, process_index=process_index, process_count=process_count,
              seed=seed)
    if not data_cfg.path:
        raise ValueError(f"data.source={data_cfg.source!r} needs data.path")
    if data_cfg.source == "webdataset":
        ds = pipelines.webdataset_pairs(data_cfg.path, **kw)
    else:
        ds = pipelines.folder_pairs(data_cfg.path, **kw)
    ds = pipelines.batched(ds, batch_size * process_count, process_count=process_count,
                           shuffle_buffer=int(data_cfg.get("shuffle_buffer", 10000)), seed=seed)
    for b in pipelines.as_numpy_iterator(ds.skip(start_step)):
        caps = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in b["caption"]]
        yield {"image": b["image"], "caption": caps}, int(np.sum(b["skipped"]))
