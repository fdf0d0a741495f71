"""The upsampler cascade: decoder image -> upsampler step 0 -> step 1 -> ... (the paper: 64 -> 256
trained on blurred inputs, then 256 -> 1024 trained on BSR-degraded ones).

A cascade step is one upsampling stage: one network, or Karlo's pair (`first` for every timestep
but the final one, `last` for that one), sampled as `first`'s StageSampling records (DDPM / DDIM,
eta, the noise level of a noise-augmented upsampler). This module holds what the pipeline and
the workdir share about the chain: the step record, the per-step argument checks, the keys each
step draws from, and the size check of a chain.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from unclip_jax.diffusion.sampler import METHODS, fold_in_rows, is_key_batch

#: data of fold_in(rng, .) reserved for cascade steps after the first (step 0 draws from rng
#: itself with data 0, 1, 2: initial latents, per-step noise, noise augmentation)
LATER_STEPS_KEY = 3


@dataclasses.dataclass
class UpsamplerStep:
    """One step of the cascade: `first` (a pipeline Component), Karlo's `last` network for the
    final timestep (None: `first` takes every step) and the input size it was trained for
    (`low_res_size`, None where unknown, e.g. a diffusers pipeline)."""

    first: Any
    last: Any | None = None
    low_res_size: int | None = None

    @property
    def sampling(self):
        return self.first.sampling

    @property
    def sample_size(self) -> int:
        return int(self.first.config.sample_size)

    @property
    def noise_level_cond(self) -> bool:
        return any(c is not None and c.config.noise_level_cond for c in (self.first, self.last))

    @property
    def params(self) -> dict:
        return {"first": self.first.params} if self.last is None else \
            {"first": self.first.params, "last": self.last.params}


def step_name(j: int) -> str:
    """The name of cascade step j in progress bars and caches: super_res, super_res_2, ..."""
    return "super_res" if j == 0 else f"super_res_{j + 1}"


def step_key(rng, j: int):
    """The key cascade step j draws from: `rng` itself for step 0 (what the single upsampler
    always drew), fold_in(fold_in(rng, 3), j) for the later ones (per row for a batch of keys)."""
    if j == 0:
        return rng
    fold = fold_in_rows if is_key_batch(rng) else jax.random.fold_in
    return fold(fold(rng, LATER_STEPS_KEY), j)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _check_steps(v, name: str):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _check_method(v, name: str):
    if v is not None and v not in METHODS:
        raise ValueError(f"{name} must be None (the stage's recorded method) or one of "
                         f"{', '.join(map(repr, METHODS))}, got {v!r}")
    return v


def _per_step(value, n: int, name: str, check: Callable[[Any, str], Any]) -> list:
    """`value` for each of the n cascade steps: one value for every step, or a sequence of n."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {_count(len(value), 'entry', 'entries')}, but the "
                             f"pipeline has {_count(n, 'upsampler step', 'upsampler steps')}: "
                             f"give one value for every step, or one entry per step")
        return [check(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [check(value, name)] * n


def steps_per_step(steps, n: int, name: str = "super_res_steps") -> list[int]:
    """Sampling steps for each of n cascade steps (an int for all, or one per step)."""
    return _per_step(steps, n, name, _check_steps)


def methods_per_step(method, n: int, name: str = "super_res_method") -> list[str | None]:
    """Sampling method ('ddpm' / 'ddim', None: the stage's record) for each of n cascade steps."""
    return _per_step(method, n, name, _check_method)


def arrays_per_step(x, n: int, name: str) -> list:
    """Explicit latents / noise for each of n cascade steps: None (all drawn), one array (step
    0's) or a sequence of n (None entries drawn)."""
    if x is None:
        return [None] * n
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name} has {_count(len(x), 'entry', 'entries')}, but the pipeline "
                             f"has {_count(n, 'upsampler step', 'upsampler steps')}: give one "
                             f"array (step 0's) or one entry per step")
        return list(x)
    return [x] + [None] * (n - 1)


def check_chain(decoder_size: int, steps: Sequence[tuple[str, int | None, int]],
                error: type[Exception] = ValueError) -> None:
    """Refuse a chain whose step j does not take what step j - 1 makes. `steps` holds (name,
    input size or None when unknown, output size) of each step, in order."""
    prev_name, prev = "the decoder", int(decoder_size)
    for name, low, out in steps:
        if low is not None and int(low) != prev:
            raise error(f"{name} upsamples {int(low)}x{int(low)} images, but {prev_name} before "
                        f"it makes {prev}x{prev} ones: each upsampler's input size (its record's "
                        f"data.low_res_size) must be the output size of the step before it")
        prev_name, prev = name, int(out)
