"""Noise schedules (beta_t, alpha_bar_t) and the choice of sampling timesteps.

Everything here is host-side numpy in float64: schedules are constants of a model, computed once
and baked into the jitted programs that use them.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

SCHEDULES = ("cosine", "linear")
_ALIASES = {"squaredcos_cap_v2": "cosine", "cos": "cosine"}
SPACINGS = ("even", "ddim", "leading", "trailing")
_SPACING_ALIASES = {"linspace": "even"}


def cosine_alpha_bar(s: np.ndarray | float, offset: float = 0.008) -> np.ndarray:
    """The improved-DDPM cosine alpha_bar(s), s in [0, 1] (unnormalised: alpha_bar(0) < 1)."""
    return np.cos((np.asarray(s, np.float64) + offset) / (1 + offset) * math.pi / 2) ** 2


def make_betas(name: str, num_steps: int = 1000, *, beta_start: float = 1e-4,
               beta_end: float = 0.02, max_beta: float = 0.999) -> np.ndarray:
    """Betas of a named schedule in float64.

    cosine (alias squaredcos_cap_v2): beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta).
    linear: beta_start .. beta_end evenly spaced (DDPM; diffusers' "linear"). To reproduce ADM's
    step-count-independent linear schedule pass beta_start=1e-4 * 1000/T, beta_end=0.02 * 1000/T.
    """
    name = _ALIASES.get(name, name)
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES} "
                         f"(or an alias: {sorted(_ALIASES)})")
    _check_int("num_steps", num_steps, 1)
    if name == "linear":
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"linear schedule needs 0 < beta_start <= beta_end < 1, "
                             f"got {beta_start}, {beta_end}")
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    abar = cosine_alpha_bar(t)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def _check_int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The training-time diffusion process: betas and their cumulative products (float64)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray | None = None  # derived from betas unless given (a peer's table)

    def __post_init__(self):
        b = np.asarray(self.betas, np.float64)
        if b.ndim != 1 or len(b) == 0 or not np.all((b > 0) & (b < 1)):
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1)")
        object.__setattr__(self, "betas", b)
        a = np.cumprod(1.0 - b) if self.alphas_cumprod is None else np.asarray(
            self.alphas_cumprod, np.float64)
        if a.shape != b.shape:
            raise ValueError("alphas_cumprod and betas differ in length")
        object.__setattr__(self, "alphas_cumprod", a)

    @classmethod
    def named(cls, name: str, num_steps: int = 1000, **kw) -> "NoiseSchedule":
        return cls(make_betas(name, num_steps, **kw))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "NoiseSchedule":
        """A schedule with exactly this alpha_bar_t table (e.g. a peer's float32 table)."""
        a = np.asarray(alphas_cumprod, np.float64)
        prev = np.concatenate([[1.0], a[:-1]])
        return cls(1.0 - a / prev, a)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    def timesteps(self, num_sampling_steps: int, spacing: str = "even", offset: int = 0) -> np.ndarray:
        return sampling_timesteps(self.num_steps, num_sampling_steps, spacing, offset)


def sampling_timesteps(num_train_steps: int, num_steps: int, spacing: str = "even",
                       offset: int = 0) -> np.ndarray:
    """The timesteps a sampler visits, in descending order (int64).

    spacing:
      even     — evenly strided over [0, T-1] including both ends, round(i * (T-1)/(n-1)): ADM's
                 "evenly strided" respacing, Karlo's / diffusers' UnCLIPScheduler, diffusers'
                 "linspace" spacing.
      ddim     — ADM's "ddimN": a constant integer stride T // n from 0 (requires that it gives
                 exactly n steps).
      leading  — diffusers' "leading": i * (T // n) + offset.
      trailing — diffusers' "trailing": round(T - i * T/n) - 1.
    """
    _check_int("num_train_steps", num_train_steps, 1)
    _check_int("number of sampling steps", num_steps, 1, num_train_steps)
    spacing = _SPACING_ALIASES.get(spacing, spacing)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    T, n = num_train_steps, num_steps
    if spacing == "even":
        ts = np.round(np.arange(n) * ((T - 1) / max(n - 1, 1))) if n > 1 else np.array([T - 1])
    elif spacing == "ddim":
        stride = T // n
        ts = np.arange(0, T, stride)
        if len(ts) != n:
            raise ValueError(f"ddim spacing cannot take exactly {n} steps out of {T} "
                             f"with an integer stride")
    elif spacing == "leading":
        ts = np.arange(n) * (T // n) + offset
    else:  # trailing
        ts = np.round(np.arange(T, 0, -T / n)) - 1
        ts = ts[::-1]
    ts = np.asarray(ts, np.int64)[::-1].copy()
    if ts[0] >= T or ts[-1] < 0 or np.any(np.diff(ts) >= 0):
        raise ValueError(f"spacing {spacing!r} with offset {offset} gives invalid timesteps {ts}")
    return ts
