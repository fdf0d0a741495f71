"""tf.data input pipelines for real data: image-caption pairs and precomputed CLIP embeddings.

Sources
-------
* :func:`webdataset_pairs` -- the webdataset layout `img2dataset` writes: tar shards
  (``00000.tar``, ``00001.tar``, ...) whose members are grouped by key, e.g. ``000000001.jpg``,
  ``000000001.txt`` (the caption), ``000000001.json``.  The ``*_stats.json`` / ``*.parquet``
  files beside the shards are ignored.
* :func:`folder_pairs` -- a folder (searched recursively) of images (jpg, png, webp, ...), each
  with a caption file of the same stem: ``cat.jpg`` + ``cat.txt``.
* :func:`unclip_jax.data.clip_embeddings.clip_embedding_pairs` -- the `clip-retrieval` layout, for training the prior
  without touching images: ``img_emb/img_emb_{i}.npy`` and ``text_emb/text_emb_{i}.npy``
  (float16/float32 ``[N_i, D]``, rows matched by index), optionally the captions from
  ``metadata/metadata_{i}.parquet`` (needs ``pyarrow``; the ``.npy`` arrays alone need nothing).

Image-caption sources yield dicts ``image`` uint8 ``[S, S, 3]`` (decoded with Pillow, alpha
composited on white, centre-cropped to a square and resized to ``image_size``), ``caption``
tf.string (whitespace-stripped), ``key`` tf.string, ``valid`` bool and ``skipped`` int32.

Skipped examples
----------------
An undecodable image, a missing image or caption member, or an empty/whitespace caption (for the
embeddings: a row with a non-finite value) never raises: the example is *invalid*.  With
``drop_invalid=True`` (the default) invalid examples are removed from the stream and **counted on
the examples that remain**: every kept example carries ``skipped`` = the number of invalid
examples dropped next to it (the invalid examples after a kept one are charged to it; those
before the first kept example of a pass go to that first one).  So

    sum of ``skipped`` over one pass of the data == number of invalid examples in that pass

exactly (as long as the pass holds at least one valid example), and because the count travels
inside the examples it survives shuffling, batching, ``repeat`` and the tf.data iterator
checkpoint, and becomes part of the global batch: the trainer reports
``batch["skipped"].sum()`` as its "skipped examples" metric (summed over hosts for free once the
batch is a global array, see :func:`to_global_arrays`).  With ``drop_invalid=False`` every
example is kept, with ``valid`` telling which are usable (invalid images are zeros) and
``skipped`` = 1 for the invalid ones -- for callers that prefer masking to filtering.

Several hosts
-------------
Every source takes ``process_index`` / ``process_count`` (pass ``jax.process_index()`` and
``jax.process_count()``): shard files (folder: images) ``i::process_count`` go to process ``i``,
so hosts read disjoint parts whose union is everything.  :func:`batched` makes per-host batches
of ``global_batch_size // process_count`` and :func:`to_global_arrays` joins them into global
``jax.Array`` batches.  (For TFDS-built data use ``tfds.even_splits("train", process_count)``,
see :mod:`unclip_jax.data.tfds_builders`.)

TensorFlow is imported lazily and is told to see no GPU, so it never takes accelerator memory.
Paths may be local or anything ``tf.io.gfile`` reads (``gs://...``): the file helpers are in
:mod:`unclip_jax.data.fs`.

Example::

    from unclip_jax.data import pipelines as P
    ds = P.webdataset_pairs("/data/laion/{00000..00099}.tar", image_size=64,
                            process_index=jax.process_index(), process_count=jax.process_count())
    ds = P.batched(ds, global_batch_size=256, process_count=jax.process_count(), seed=0)
    for batch in P.as_numpy_iterator(ds):
        tokens = tokenizer(batch["caption"])                 # strings stay on the host
        arrays = P.to_global_arrays({"image": batch["image"], "tokens": tokens,
                                     "skipped": batch["skipped"]}, data_sharding)
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from unclip_jax.data import fs
from unclip_jax.data.fs import list_shards  # re-exported: part of this module's API

log = logging.getLogger(__name__)

#: File extensions read as images (webdataset member extensions and folder files, lower case).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
#: Name of the per-example count of dropped invalid examples (see the module docstring).
SKIPPED_KEY = "skipped"


# ---------------------------------------------------------------------------------------------
# tf.data options and per-process parts (files themselves: unclip_jax.data.fs)
# ---------------------------------------------------------------------------------------------


def deterministic_options():
    """``tf.data.Options`` with ``deterministic = True`` (the same seed gives the same order)."""
    opts = fs.tensorflow().data.Options()
    opts.deterministic = True
    return opts


def process_part(items: Sequence, process_index: int, process_count: int, what: str) -> list:
    """Items ``process_index::process_count`` (this process's share of ``what``: shards, images);
    raises ``ValueError`` if some process would get none."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    part = list(items[process_index::process_count])
    if not part:
        raise ValueError(f"{len(items)} {what} cannot be split over {process_count} processes: "
                         f"process {process_index} would read nothing (use more, smaller shards)")
    return part


# ---------------------------------------------------------------------------------------------
# Decoding (pure Python + Pillow; shared with the TFDS builders)
# ---------------------------------------------------------------------------------------------


def decode_caption(data: bytes | str | None) -> str:
    """The caption as stripped text ('' when missing, empty or only whitespace)."""
    if data is None:
        return ""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    return data.strip()


def decode_image(data: bytes | None, image_size: int) -> np.ndarray | None:
    """Decode image bytes to uint8 ``[S, S, 3]``: alpha composited on white, centre-cropped to a
    square and resized (bicubic) to ``image_size``.  ``None`` when the bytes do not decode."""
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (image_size, image_size))  # decode at a reduced scale >= target
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            else:
                im = im.convert("RGB")
            w, h = im.size
            if w < 1 or h < 1:
                return None
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.resize((image_size, image_size), Image.BICUBIC,
                           box=(left, top, left + side, top + side))
            arr = np.asarray(im, dtype=np.uint8)
    except Exception:  # noqa: BLE001 -- any failure of any codec means "undecodable"
        return None
    if arr.shape != (image_size, image_size, 3):
        return None
    return arr


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first '.' of the basename, rest = field."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def iter_webdataset_samples(path: str, caption_ext: str = "txt") -> Iterator[dict]:
    """Raw samples of one webdataset tar shard, in order: dicts ``key`` (str), ``image`` (bytes
    or None), ``caption`` (bytes or None), ``json`` (bytes or None).  Members of a sample are
    consecutive; a truncated or corrupt shard ends early with a warning, never an exception."""
    current: dict | None = None

    def add(sample, ext, data):
        if ext in IMAGE_EXTENSIONS:
            if sample["image"] is None:
                sample["image"] = data
        elif ext == caption_ext:
            sample["caption"] = data
        elif ext == "json":
            sample["json"] = data

    try:
        with fs.open_file(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member_name(member.name)
                if not key or key.startswith(".") or not ext:
                    continue
                wanted = ext in IMAGE_EXTENSIONS or ext in (caption_ext, "json")
                data = tar.extractfile(member).read() if wanted else None
                if current is None or current["key"] != key:
                    if current is not None:
                        yield current
                    current = {"key": key, "image": None, "caption": None, "json": None}
                if wanted:
                    add(current, ext, data)
    except (tarfile.TarError, EOFError, OSError) as e:
        log.warning("webdataset shard %s is corrupt or truncated (%s); reading stops there",
                    path, e)
    if current is not None:
        yield current


def decode_pair(image_bytes: bytes | None, caption: bytes | str | None,
                image_size: int) -> tuple[np.ndarray, str, bool]:
    """``(image, caption, valid)`` of one example; an invalid example has a zero image."""
    text = decode_caption(caption)
    image = decode_image(image_bytes, image_size) if text else None
    if image is None:
        return np.zeros((image_size, image_size, 3), np.uint8), text, False
    return image, text, True


def list_image_folder(root: str, caption_ext: str = "txt") -> list[tuple[str, str]]:
    """Sorted ``(image_path, caption_path)`` pairs of a folder, searched recursively; the caption
    path is '' where the image has no caption file (such an example is invalid)."""
    root = os.fspath(root)
    pairs = []
    for dirpath, _, filenames in fs.walk(root):
        names = set(filenames)
        for name in filenames:
            stem, dot, ext = name.rpartition(".")
            if dot and ext.lower() in IMAGE_EXTENSIONS:
                cap = f"{stem}.{caption_ext}"
                pairs.append((os.path.join(dirpath, name),
                              os.path.join(dirpath, cap) if cap in names else ""))
    if not pairs:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    return sorted(pairs)


def load_folder_example(image_path: str, caption_path: str,
                        image_size: int) -> tuple[np.ndarray, str, bool]:
    """Read and decode one folder example (unreadable files make it invalid)."""
    try:
        caption = fs.read_bytes(caption_path) if caption_path else None
        data = fs.read_bytes(image_path) if decode_caption(caption) else None
    except Exception:  # noqa: BLE001 -- vanished or unreadable file
        caption, data = None, None
    return decode_pair(data, caption, image_size)


# ---------------------------------------------------------------------------------------------
# Dropping invalid examples while counting them
# ---------------------------------------------------------------------------------------------


def _drop_invalid_counting(ds):
    """Remove examples whose ``valid`` is False; every kept example gets ``skipped`` (int32), the
    number of removed examples charged to it (see the module docstring).

    A ``scan`` holds back the latest valid example and charges the invalid ones that follow it;
    a sentinel appended to the (finite) stream flushes the last one, so nothing is lost at the end.
    """
    tf = fs.tensorflow()
    spec = ds.element_spec
    blank = {k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()}
    body = ds.map(lambda ex: {**ex, "_end": tf.constant(False)})
    sentinel = tf.data.Dataset.from_tensors({**blank, "_end": tf.constant(True)})
    stream = body.concatenate(sentinel)

    def step(state, ex):
        have, held, count = state
        end = ex["_end"]
        valid = tf.logical_and(ex["valid"], tf.logical_not(end))
        emit = tf.logical_and(have, tf.logical_or(valid, end))
        out = {**held, SKIPPED_KEY: count, "_emit": emit}
        new_held = {k: tf.where(valid, ex[k], held[k]) for k in held}
        dropped = tf.cast(tf.logical_not(tf.logical_or(valid, end)), tf.int32)
        new_count = tf.where(valid, tf.where(have, 0, count), count + dropped)
        return (tf.logical_or(have, valid), new_held, new_count), out

    init = (tf.constant(False), blank, tf.constant(0, tf.int32))
    kept = stream.scan(init, step).filter(lambda ex: ex["_emit"])
    return kept.map(lambda ex: {k: v for k, v in ex.items() if k != "_emit"})


def _finish(ds, drop_invalid: bool):
    tf = fs.tensorflow()
    if drop_invalid:
        ds = _drop_invalid_counting(ds)
    else:
        ds = ds.map(lambda ex: {**ex, SKIPPED_KEY: 1 - tf.cast(ex["valid"], tf.int32)})
    return ds.with_options(deterministic_options())


# ---------------------------------------------------------------------------------------------
# Image-caption sources
# ---------------------------------------------------------------------------------------------


def _py_bytes(x) -> bytes:
    """A scalar string argument of ``tf.numpy_function`` as ``bytes`` (NUL bytes kept)."""
    if isinstance(x, np.ndarray):
        x = x.item()
    return bytes(x)


def _decode_map(image_size: int):
    """A tf.data map: raw (image bytes, caption bytes) -> image, caption, valid (Pillow, in
    parallel threads; Pillow releases the GIL while it decodes)."""
    tf = fs.tensorflow()

    def py_decode(image_bytes, caption):
        image, text, valid = decode_pair(_py_bytes(image_bytes), _py_bytes(caption), image_size)
        return image, text.encode("utf-8"), np.bool_(valid)

    def fn(ex):
        ok = ex["complete"]
        image, caption, valid = tf.numpy_function(
            py_decode, [ex["image_bytes"], ex["caption"]], [tf.uint8, tf.string, tf.bool],
            stateful=False)
        image.set_shape((image_size, image_size, 3))
        caption.set_shape(())
        valid.set_shape(())
        return {"image": image, "caption": caption, "key": ex["key"],
                "valid": tf.logical_and(ok, valid)}

    return fn


def webdataset_pairs(pattern_or_files, *, image_size: int, process_index: int = 0,
                     process_count: int = 1, shuffle_files: bool = True, seed: int = 0,
                     drop_invalid: bool = True, caption_ext: str = "txt", cycle_length: int = 4):
    """Image-caption pairs from webdataset tar shards (the layout `img2dataset` writes).

    Args:
      pattern_or_files: a directory of ``*.tar``, a glob (``/d/*.tar``), a range
        (``/d/{00000..00099}.tar``) or a list of shard paths.
      image_size: side of the square output images.
      process_index, process_count: this host reads shards ``process_index::process_count`` of
        the sorted shard list.
      shuffle_files: visit this host's shards in an order shuffled by ``seed`` (reshuffled every
        pass when the dataset is repeated); ``cycle_length`` shards are read interleaved.
      drop_invalid: remove invalid examples, counting them in ``skipped`` (module docstring).
      caption_ext: the member extension holding the caption.

    Returns:
      A finite ``tf.data.Dataset`` of dicts ``image`` uint8 [S,S,3], ``caption`` string,
      ``key`` string (``shard.tar/member key``), ``valid`` bool, ``skipped`` int32.
    """
    tf = fs.tensorflow()
    files = process_part(list_shards(pattern_or_files), process_index, process_count, "shards")

    def gen(path):
        path = os.fsdecode(path)
        shard = os.path.basename(path)
        for s in iter_webdataset_samples(path, caption_ext=caption_ext):
            yield {"key": f"{shard}/{s['key']}", "image_bytes": s["image"] or b"",
                   "caption": s["caption"] or b"",
                   "complete": s["image"] is not None and s["caption"] is not None}

    sig = {"key": tf.TensorSpec((), tf.string), "image_bytes": tf.TensorSpec((), tf.string),
           "caption": tf.TensorSpec((), tf.string), "complete": tf.TensorSpec((), tf.bool)}
    fds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files and len(files) > 1:
        fds = fds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    raw = fds.interleave(
        lambda p: tf.data.Dataset.from_generator(gen, output_signature=sig, args=(p,)),
        cycle_length=max(1, min(cycle_length, len(files))), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = raw.map(_decode_map(image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(ds, drop_invalid)


def folder_pairs(root, *, image_size: int, process_index: int = 0, process_count: int = 1,
                 shuffle_files: bool = True, seed: int = 0, drop_invalid: bool = True,
                 caption_ext: str = "txt"):
    """Image-caption pairs from a folder (searched recursively) of images, each with a caption
    file of the same stem (``a/cat.png`` + ``a/cat.txt``).  An image without a caption file is
    invalid.  Images ``process_index::process_count`` of the sorted list go to this process;
    ``shuffle_files`` shuffles them by ``seed`` (every pass).  Same output as
    :func:`webdataset_pairs` (``key`` = the path relative to ``root``)."""
    tf = fs.tensorflow()
    root = os.fspath(root)
    pairs = process_part(list_image_folder(root, caption_ext), process_index, process_count,
                          "images")
    images = [p for p, _ in pairs]
    captions = [c for _, c in pairs]
    keys = [os.path.relpath(p, root) if not fs.is_remote(root) else p[len(root):].lstrip("/")
            for p in images]
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "caption": captions, "key": keys})
    if shuffle_files and len(pairs) > 1:
        ds = ds.shuffle(len(pairs), seed=seed, reshuffle_each_iteration=True)

    def py_load(image_path, caption_path):
        image, text, valid = load_folder_example(os.fsdecode(_py_bytes(image_path)),
                                                 os.fsdecode(_py_bytes(caption_path)), image_size)
        return image, text.encode("utf-8"), np.bool_(valid)

    def load(ex):
        image, caption, valid = tf.numpy_function(
            py_load, [ex["image"], ex["caption"]], [tf.uint8, tf.string, tf.bool], stateful=False)
        image.set_shape((image_size, image_size, 3))
        caption.set_shape(())
        valid.set_shape(())
        return {"image": image, "caption": caption, "key": ex["key"], "valid": valid}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(ds, drop_invalid)


# ---------------------------------------------------------------------------------------------
# Batching and global arrays
# ---------------------------------------------------------------------------------------------


def batched(ds, global_batch_size: int, *, process_count: int = 1, shuffle_buffer: int = 2048,
            seed: int = 0, repeat: bool = True, drop_remainder: bool = True, prefetch: int = 2):
    """Per-host batches of ``global_batch_size // process_count`` examples.

    Examples are shuffled with a buffer of ``shuffle_buffer`` (0 or None: no shuffling) seeded by
    ``seed`` -- the same seed gives the same batches -- and reshuffled every pass; ``repeat``
    makes the stream endless (the sources re-shuffle their files each pass too).  Raises
    ``ValueError`` if the global batch does not divide over the processes.
    """
    tf = fs.tensorflow()
    if global_batch_size < 1 or process_count < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    per_host = global_batch_size // process_count
    if shuffle_buffer:
        ds = ds.shuffle(int(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(per_host, drop_remainder=drop_remainder)
    if prefetch:
        ds = ds.prefetch(prefetch)
    return ds.with_options(deterministic_options())


def as_numpy_iterator(ds) -> Iterator[dict]:
    """Iterate a tf.data dataset as dicts of numpy arrays (strings as ``bytes`` objects)."""
    return ds.as_numpy_iterator()


def to_global_arrays(batch: dict, sharding) -> dict:
    """Join per-host batches into global ``jax.Array`` s laid out by ``sharding`` (a
    ``NamedSharding`` whose spec shards the leading, batch axis), with
    ``jax.make_array_from_process_local_data`` -- with one process this just places the batch.

    Numeric and boolean arrays are converted; string/object fields (captions, keys) cannot be
    device arrays and are left out -- tokenize captions on the host first.
    """
    import jax

    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            continue
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def skipped_count(batch: dict) -> int:
    """The number of invalid examples charged to ``batch`` (its "skipped examples" metric)."""
    value = batch.get(SKIPPED_KEY)
    return 0 if value is None else int(np.asarray(value).sum())


def write_webdataset_shard(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> str:
    """Write a webdataset tar shard: ``samples`` are ``(key, {ext: bytes})`` (e.g.
    ``("000000001", {"jpg": ..., "txt": b"a cat", "json": ...})``).  For tests and small
    exports; `img2dataset` writes the same layout."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                if isinstance(data, str):
                    data = data.encode("utf-8")
                elif isinstance(data, (dict, list)):
                    data = json.dumps(data).encode("utf-8")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


__all__ = [
    "IMAGE_EXTENSIONS", "SKIPPED_KEY", "webdataset_pairs", "folder_pairs",
    "batched", "to_global_arrays", "as_numpy_iterator", "skipped_count",
    "list_shards", "list_image_folder", "iter_webdataset_samples",
    "decode_image", "decode_caption", "decode_pair", "load_folder_example",
    "write_webdataset_shard", "deterministic_options", "process_part",
]
