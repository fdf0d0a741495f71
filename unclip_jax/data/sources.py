"""Host-side batch streams for the trainer: image–caption pairs and CLIP-embedding pairs.

Every stream is deterministic in (seed, step, process) and can start at any step, so a resumed
run sees exactly the batches an uninterrupted run would have seen. Each batch comes with the number
of examples skipped while making it (undecodable images, empty captions).

Sources (config `data.source`):
  shapes           the procedural shapes world (the embedded default), pre-rendered once and cached
  webdataset       img2dataset tar shards (data.path: a glob, a {a..b} range or a directory)
  folder           a folder of images with same-stem .txt captions (data.path)
  tfds             either of the two above, prepared once as a TFDS dataset
                   (unclip_jax.data.tfds_builders) and read from there: data.path the source,
                   data.tfds_builder 'webdataset' | 'folder' ('' : webdataset if data.path
                   names .tar shards, else folder), data.tfds_dir the TFDS data_dir ('' :
                   data.cache_dir/tfds, or TFDS's default ~/tensorflow_datasets without a
                   cache_dir), data.tfds_name the builder config name ('' : made from the
                   source path and the image size). The first use prepares it (process 0; the
                   others wait for it); later uses read the prepared split. The examples skipped
                   while preparing are counted once, in the builder's metadata (logged), so the
                   batches carry 0. A changed source is not noticed: use a new tfds_name.
  clip_embeddings  precomputed CLIP embeddings (data.path; unclip_jax.data.clip_embeddings): no
                   images -- the prior's source, read by embedding_sets.embedding_batches
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

SOURCES = ("shapes", "webdataset", "folder", "tfds", "clip_embeddings")
#: Sources of images with captions, which image_text_batches reads.
IMAGE_SOURCES = ("shapes", "webdataset", "folder", "tfds")


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
    if source == "clip_embeddings":
        raise ValueError(
            "data.source='clip_embeddings' carries no images: precomputed CLIP embeddings are the "
            "diffusion prior's training source (unclip_jax.data.clip_embeddings."
            f"embedding_batches); this stage needs images and captions: one of {IMAGE_SOURCES}")
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
    if source == "tfds":
        yield from _tfds_batches(data_cfg, image_size=image_size, batch_size=batch_size,
                                 seed=seed, start_step=start_step, process_index=process_index,
                                 process_count=process_count)
        return
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
    yield from _numpy_batches(ds, data_cfg, batch_size=batch_size, seed=seed,
                              start_step=start_step, process_count=process_count)


def _numpy_batches(ds, data_cfg, *, batch_size, seed, start_step, process_count):
    """Shuffle, repeat and batch a per-process tf.data stream of pairs; skip the `start_step`
    batches a resumed run has already seen; yield (dict(image, caption list[str]), skipped)."""
    from unclip_jax.data import pipelines

    ds = pipelines.batched(ds, batch_size * process_count, process_count=process_count,
                           shuffle_buffer=int(data_cfg.get("shuffle_buffer", 10000)), seed=seed)
    for b in pipelines.as_numpy_iterator(ds.skip(start_step)):
        caps = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in b["caption"]]
        yield {"image": b["image"], "caption": caps}, int(np.sum(b["skipped"]))


def tfds_builder_for(data_cfg, image_size: int):
    """The (maybe not yet prepared) TFDS builder of `data.source='tfds'` (see the module
    docstring for data.tfds_builder / tfds_dir / tfds_name)."""
    from unclip_jax.data import fs, tfds_builders

    if not data_cfg.path:
        raise ValueError("data.source='tfds' needs data.path (the webdataset shards or image "
                         "folder to prepare)")
    path = os.fspath(data_cfg.path)
    kind = data_cfg.get("tfds_builder", "") or ""
    if not kind:
        try:
            fs.list_shards(path)
            kind = "webdataset"
        except FileNotFoundError:
            kind = "folder"
    if kind not in ("webdataset", "folder"):
        raise ValueError(f"data.tfds_builder={kind!r}: expected 'webdataset' or 'folder'")
    data_dir = data_cfg.get("tfds_dir", "") or ""
    if not data_dir and data_cfg.get("cache_dir", ""):
        data_dir = os.path.join(data_cfg.cache_dir, "tfds")
    name = data_cfg.get("tfds_name", "") or ""
    if not name:  # one prepared dataset per source path and image size
        full = path if fs.is_remote(path) else os.path.abspath(path)
        base = os.path.basename(os.path.normpath(path.rstrip("/"))) or "source"
        base = "".join(c if c.isalnum() or c in "_-" else "_" for c in base)
        name = f"{base}_{image_size}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    return tfds_builders.get_builder(kind, path, data_dir=data_dir or None, name=name,
                                     image_size=image_size)


def _tfds_batches(data_cfg, *, image_size, batch_size, seed, start_step, process_index,
                  process_count):
    """`data.source='tfds'`: prepare the TFDS dataset on first use (process 0; the others wait
    for it, at most data.tfds_wait_s seconds), then batches of this process's
    tfds.even_splits part, resumed by skipping the batches already seen."""
    from unclip_jax.data import tfds_builders

    builder = tfds_builder_for(data_cfg, image_size)
    if not builder.is_prepared():
        if process_index == 0:
            log.info("preparing TFDS dataset %s/%s from %s in %s", builder.name,
                     builder.builder_config.name, data_cfg.path, builder.data_dir)
            builder.download_and_prepare()
        else:
            deadline = time.monotonic() + float(data_cfg.get("tfds_wait_s", 3600))
            while not builder.is_prepared():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"process {process_index}: TFDS dataset "
                                       f"{builder.builder_config.name} in {builder.data_dir} was "
                                       "not prepared by process 0 in time")
                time.sleep(5)
                builder = tfds_builder_for(data_cfg, image_size)
        builder = tfds_builder_for(data_cfg, image_size)  # reload the prepared dataset's info
    log.info("TFDS dataset %s/%s: %s examples (%s source examples skipped while preparing)",
             builder.name, builder.builder_config.name, builder.info.splits["train"].num_examples,
             builder.info.metadata.get("skipped_examples"))
    ds = tfds_builders.as_pairs_dataset(builder, process_index=process_index,
                                        process_count=process_count, seed=seed)
    yield from _numpy_batches(ds, data_cfg, batch_size=batch_size, seed=seed,
                              start_step=start_step, process_count=process_count)
