"""host_memory.keep_freed_memory: a block freed and allocated again is reused, not faulted in
afresh from the OS; and it stays out of the way where asked (the user's MALLOC_*_ tunables,
UNCLIP_JAX_MALLOC=0, values that are not C ints)."""
import json
import os
import subprocess
import sys

import pytest

from unclip_jax import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# A 24 MiB block allocated, touched and freed ten times, as a training step does with its
# temporaries: glibc's default serves it with mmap and unmaps it on free (page faults each time).
_REUSE = r"""
import json, resource, sys
import numpy as np
from unclip_jax.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
n = (24 << 20) // 8
a = np.ones(n); del a
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = np.ones(n); del a
print(json.dumps({"applied": applied,
                  "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10}))
"""


def _run(mode, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    e.pop("UNCLIP_JAX_MALLOC", None)
    e.update(env)
    out = subprocess.run([sys.executable, "-c", _REUSE, mode], env=e, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_freed_block_is_reused():
    off, on = _run("off"), _run("on")
    assert on["applied"] and not off["applied"]
    assert off["faults"] >= 10  # glibc's default: mapped afresh on each allocation (51 measured)
    assert on["faults"] <= 2, (on, off)  # the heap keeps it: 0 measured


def test_stays_out_of_the_way():
    assert _run("on", UNCLIP_JAX_MALLOC="0")["applied"] is False
    assert _run("on", MALLOC_TOP_PAD_="0")["applied"] is False  # the user's tunables win


def test_rejects_values_that_are_not_c_ints(monkeypatch):
    for k in host_memory._ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("UNCLIP_JAX_MALLOC", raising=False)
    with pytest.raises(ValueError, match="C ints"):
        host_memory.keep_freed_memory(trim_threshold=4 << 30)
