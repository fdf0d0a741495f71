"""Filesystem helpers shared by the data pipelines: local paths, or anything ``tf.io.gfile``
reads and writes (``gs://...``, any path with ``://``).

Local paths go through the standard library; remote ones through ``tf.io.gfile``.  TensorFlow is
imported lazily (only for remote paths) by :func:`tensorflow`, which also hides every GPU from
it so it never takes accelerator memory -- every data module gets TensorFlow from there.

Shard lists (:func:`list_shards`) accept a directory, a glob, a webdataset-style numeric range
(``/d/{00000..00099}.tar``, see :func:`brace_expand`) or an explicit list.
"""

from __future__ import annotations

import functools
import glob as _glob
import logging
import os
import re
from typing import Iterator, Sequence

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def tensorflow():
    """Import TensorFlow and hide every GPU from it (once); returns the ``tensorflow`` module."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised: nothing we can change any more
        log.debug("TensorFlow devices already initialised; leaving them as they are")
    return tf


def is_remote(path) -> bool:
    """Whether ``path`` names a remote file (``scheme://...``, read with ``tf.io.gfile``)."""
    return "://" in str(path)


def open_file(path, mode: str = "rb"):
    """Open a local or remote file (binary ``'rb'`` by default; ``'wb'`` to write)."""
    path = os.fspath(path)
    if is_remote(path):
        return tensorflow().io.gfile.GFile(path, mode)
    return open(path, mode)


def read_bytes(path) -> bytes:
    """The whole content of a local or remote file."""
    with open_file(path) as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path``.  Local files are written to ``path + '.tmp'`` first and then
    renamed, so a reader never sees a half-written file; remote ones are written in place."""
    path = os.fspath(path)
    if is_remote(path):
        with open_file(path, "wb") as f:
            f.write(data)
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def exists(path) -> bool:
    path = os.fspath(path)
    return tensorflow().io.gfile.exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    path = os.fspath(path)
    return tensorflow().io.gfile.isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path) -> None:
    """Create ``path`` and its parents (no error if it exists)."""
    path = os.fspath(path)
    if is_remote(path):
        tensorflow().io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def walk(root) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` for local or remote roots: ``(dirpath, dirnames, filenames)``."""
    root = os.fspath(root)
    return tensorflow().io.gfile.walk(root) if is_remote(root) else os.walk(root)


def glob_files(pattern) -> list[str]:
    """Sorted paths matching a glob pattern (``*``, ``?``, ``[...]``)."""
    pattern = os.fspath(pattern)
    if is_remote(pattern):
        return sorted(tensorflow().io.gfile.glob(pattern))
    return sorted(_glob.glob(pattern))


def brace_expand(pattern: str) -> list[str]:
    """Expand webdataset-style numeric ranges: ``a/{00000..00009}.tar`` -> 10 names (a leading
    zero in the lower bound sets the zero-padded width; several ranges multiply)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(brace_expand(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def list_shards(pattern_or_files: str | os.PathLike | Sequence[str],
                ext: str = ".tar") -> list[str]:
    """Sorted shard files from a list, a directory (every ``*{ext}`` in it), a glob pattern or a
    ``{00000..00099}`` range.  Raises ``FileNotFoundError`` if nothing matches."""
    if isinstance(pattern_or_files, (str, os.PathLike)):
        pattern = os.fspath(pattern_or_files)
        if isdir(pattern):
            files = glob_files(os.path.join(pattern, "*" + ext))
        else:
            files = []
            for p in brace_expand(pattern):
                files.extend(glob_files(p) if any(c in p for c in "*?[") else
                             ([p] if exists(p) else []))
        files = sorted(set(files))
    else:
        files = [os.fspath(f) for f in pattern_or_files]
    if not files:
        raise FileNotFoundError(f"no shard files match {pattern_or_files!r}")
    return files


__all__ = ["tensorflow", "is_remote", "open_file", "read_bytes", "write_bytes", "exists",
           "isdir", "makedirs", "walk", "glob_files", "brace_expand", "list_shards"]
