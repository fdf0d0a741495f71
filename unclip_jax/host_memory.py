"""The host allocator's settings for XLA:CPU steps (glibc malloc, Linux).

XLA:CPU allocates each step's temporaries with malloc. glibc serves blocks above its mmap
threshold with a fresh mmap and gives them back with munmap on free, and trims the top of the
heap once more than the trim threshold is free there; either way the next step touches new pages
and pays a page fault per 4 KiB. A fresh-clone `make demo` took 57 million minor page faults and
243 s of system time (of 1655 s CPU time). Keeping freed memory in the heap (mmap threshold
512 MiB, trim threshold 1 GiB, 256 MiB top pad) took the demo decoder's training loop from
7.0-7.2 to 8.2-9.0 steps/s and its page faults from 2.2 M to 0.44 M (`bench/bench_train.py
--config configs/decoder.py:size=demo`; docs/PERFORMANCE.md, "The host allocator").

`unclip-jax` applies this at start-up; call :func:`keep_freed_memory` from your own entry point
for the same effect. It is a no-op off glibc, when any ``MALLOC_*_`` tunable is already set in
the environment (yours win), or with ``UNCLIP_JAX_MALLOC=0``.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_CAP = 32 << 20  # the largest threshold older glibc takes (64-bit)
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory(mmap_threshold: int = 512 << 20, trim_threshold: int = 1 << 30,
                      top_pad: int = 256 << 20) -> bool:
    """Set glibc's mmap threshold, trim threshold and top pad (bytes) so that memory freed by
    one step is reused by the next instead of returned to the OS. Returns whether it was
    applied. Where glibc refuses a threshold above 32 MiB (glibc 2.36 takes 512 MiB), 32 MiB is
    set and larger blocks keep their mmap."""
    if not sys.platform.startswith("linux") or os.environ.get("UNCLIP_JAX_MALLOC", "1") == "0":
        return False
    if any(k in os.environ for k in _ENV):
        return False
    settings = [(_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
                (_M_TOP_PAD, top_pad)]
    for _, v in settings:
        if not 0 <= int(v) < 2 ** 31:
            raise ValueError(f"malloc settings are C ints in [0, 2**31), got {v!r}")
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no libc.so.6: leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = [mallopt(p, int(v)) == 1 for p, v in settings]
    if not ok[0] and mmap_threshold > _GLIBC_MMAP_CAP:  # a glibc that caps the threshold
        ok[0] = mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_CAP) == 1
    return all(ok)
