"""Compile once per machine: JAX's persistent compilation cache, on by default.

The `unclip-jax` command line and `UnCLIPPipeline` call :func:`enable_compilation_cache`, so a
second process on the same machine loads the compiled samplers from disk instead of compiling
them again (XLA keys each entry by the program, the jax/jaxlib version, the backend and the
flags, so a changed program or a different machine compiles afresh).

Where the cache lives (the first that applies):

1. a directory JAX was already told about — ``JAX_COMPILATION_CACHE_DIR`` or
   ``jax.config.update("jax_compilation_cache_dir", ...)`` — is kept as it is (unclip_jax then
   changes no cache setting at all);
2. ``$UNCLIP_JAX_CACHE_DIR``;
3. ``$XDG_CACHE_HOME/unclip_jax/xla``, else ``~/.cache/unclip_jax/xla``.

Turning it off: ``UNCLIP_JAX_COMPILATION_CACHE=0`` (or false / no / off) in the environment,
``unclip-jax --no-compile-cache ...`` on the command line, or :func:`disable_compilation_cache`
from Python. These stop unclip_jax from turning a cache on; a cache configured through JAX
itself (point 1) is JAX's and stays (``JAX_ENABLE_COMPILATION_CACHE=false`` turns that off).

A directory that cannot be created or written warns once and the process goes on compiling
without a persistent cache. The cache grows without bound (JAX's default); deleting the
directory at any time is safe. Only point it at a directory nobody untrusted can write to:
JAX runs what it loads from there.
"""
from __future__ import annotations

import os
import tempfile
import warnings

#: the cache directory (overrides the XDG / ~/.cache default)
DIR_ENV = "UNCLIP_JAX_CACHE_DIR"
#: "0" / "false" / "no" / "off" turns unclip_jax's cache off
SWITCH_ENV = "UNCLIP_JAX_COMPILATION_CACHE"
#: programs that compiled faster than this are not written. JAX's default (1 s) skips most of
#: what a sample compiles on CPU: with the `small` pipeline 48 of 55 programs (casts, random
#: draws, resizes) take under 1 s each, 5.3 s together, in every process — while all 55 entries
#: take 0.7 MiB and reading one back is a small file read. Which programs pass a time threshold
#: also changes with the machine's load. 0 caches them all (docs/PERFORMANCE.md, "Start-up").
MIN_COMPILE_TIME_SECS = 0.0

_OFF = ("0", "false", "no", "off")
_state = {"disabled": False, "warned": False}


def default_cache_dir() -> str:
    """``$UNCLIP_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/unclip_jax/xla``, else
    ``~/.cache/unclip_jax/xla``."""
    if os.environ.get(DIR_ENV):
        return os.path.expanduser(os.environ[DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unclip_jax", "xla")


def disabled() -> bool:
    """Whether unclip_jax's cache is turned off (by the environment or by
    :func:`disable_compilation_cache`)."""
    return _state["disabled"] or os.environ.get(SWITCH_ENV, "").strip().lower() in _OFF


def disable_compilation_cache() -> None:
    """Turn unclip_jax's cache off for this process (what ``--no-compile-cache`` does): later
    :func:`enable_compilation_cache` calls (e.g. from ``UnCLIPPipeline``) set nothing."""
    _state["disabled"] = True


def _writable(path: str) -> None:
    """Create `path` and check a file can be written in it (raises OSError otherwise)."""
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".unclip_jax_probe_")
    os.close(fd)
    os.remove(probe)


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on at `path` (default: :func:`default_cache_dir`)
    unless JAX already has a cache directory or the cache is turned off. Call it before the
    programs to be cached compile; calling it again is cheap.

    Returns the cache directory in use (JAX's own when one was configured), or None when this
    process compiles without a persistent cache.
    """
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:  # the user's (or an earlier call's): never overridden
        return configured
    if disabled() or not jax.config.jax_enable_compilation_cache:
        return None
    path = os.path.abspath(os.path.expanduser(path or default_cache_dir()))
    try:
        _writable(path)
    except OSError as e:
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                f"unclip_jax: cannot use {path!r} as the compilation cache ({e}); compiling "
                f"without a persistent cache (set {DIR_ENV} to a writable directory, or "
                f"{SWITCH_ENV}=0 to turn the cache off)", RuntimeWarning, stacklevel=2)
        return None
    # a threshold set through the environment or jax.config (anything but JAX's default) stays
    if ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ
            and jax.config.jax_persistent_cache_min_compile_time_secs == 1.0):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    jax.config.update("jax_compilation_cache_dir", path)
    return path
