"""The one sampling loop: a jitted `jax.lax.scan` over timesteps, shared by every model.

The prior (vectors [B, D]) and every UNet (images [B, H, W, C]) sample through `sample_loop`. A
sampler method (DDPM ancestral, DDIM with eta, DDIM inversion) is not code but a *plan*: per-step
arrays of the timestep and the coefficients of

    x_next = c_x0 * x0_hat + c_x * x_t + c_eps * eps_hat + std * noise

computed on the host from the schedule (`build_plan`, `build_inversion_plan`). The loop body is
the same for all of them: call the model (once, on the concatenated [cond, uncond] batch when
guiding), turn its output into (x0_hat, eps_hat), clip or threshold x0_hat, update. Noise for step
i comes from `fold_in(rng, i)` unless given explicitly (for parity with a peer's noise).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion.gaussian import (
    DiffusionConfig, GaussianDiffusion, dynamic_threshold, predict_x0_eps, split_variance)
from unclip_jax.diffusion.schedule import _check_int, sampling_timesteps

METHODS = ("ddpm", "ddim")

# model_fn(params, x_t [B, ...], t [B] int32, cond pytree with leading batch axis) -> output
ModelFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample: method, steps and spacing, x0 clipping. JSON-serialisable."""

    method: str = "ddpm"  # ddpm (ancestral, with the model's variance) | ddim
    steps: int = 25
    spacing: str = "even"  # even | ddim | leading | trailing (see schedule.sampling_timesteps)
    offset: int = 0  # added to "leading" timesteps (diffusers' steps_offset)
    eta: float = 0.0  # DDIM noise scale
    clip_x0: float | None = 1.0  # clip predicted x0 to [-c, c]; None: no clipping
    dynamic_threshold: float | None = None  # Imagen's percentile (e.g. 0.995); replaces clip_x0
    threshold_max: float = 1.0  # upper bound of the dynamic threshold s
    final_alpha_bar: float = 1.0  # alpha_bar after the last step (diffusers' set_alpha_to_one)
    recompute_eps: bool = True  # DDIM: eps from the clipped x0 (ADM); diffusers' default is False
    # "float64": plan coefficients computed exactly (as ADM/Karlo do). "float32": reproduce the
    # float32 arithmetic of diffusers' UnCLIPScheduler, which forms alpha = 1 - (1 - abar_t /
    # abar_prev) and so loses most digits of sqrt(alpha) at the first step from t=999 (about 5e-5
    # on the coefficient of x_T), and at the last step scales x0 by beta_0 / (1 - abar_0) computed
    # in float32 (~1 + 5e-4); for parity with diffusers' UnCLIPPipeline.
    coefficient_dtype: str = "float64"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}; expected one of {METHODS}")
        _check_int("sampling steps", self.steps, 1)
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if self.clip_x0 is not None and not self.clip_x0 > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {self.clip_x0}")
        if self.coefficient_dtype not in ("float64", "float32"):
            raise ValueError(f"coefficient_dtype must be 'float64' or 'float32', got "
                             f"{self.coefficient_dtype!r}")
        if self.dynamic_threshold is not None and not 0 < self.dynamic_threshold <= 1:
            raise ValueError(f"dynamic_threshold must be in (0, 1], got {self.dynamic_threshold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StageSampling:
    """How a trained model is sampled by default: the diffusion it was trained with, the x0 clip
    range, the sampler ("ddpm" ancestral, as diffusers' UnCLIPScheduler, or "ddim" with `eta`),
    the classifier-free guidance scale (None: the caller's default) and, for an upsampler trained
    with noise augmentation, the noise level its low-resolution input is noised to (0: none)."""

    diffusion: DiffusionConfig
    clip_x0: float | None = 1.0
    method: str = "ddpm"
    eta: float = 0.0
    guidance: float | None = None
    noise_level: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}; expected one of {METHODS}")
        if isinstance(self.diffusion, dict):
            object.__setattr__(self, "diffusion", DiffusionConfig.from_dict(self.diffusion))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["diffusion"] = self.diffusion.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StageSampling":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)


class StepPlan(NamedTuple):
    """Per-step arrays (leading axis = step) driving the scan."""

    t: jax.Array  # int32 model timestep
    sqrt_ab: jax.Array  # sqrt(abar_t) and sqrt(1 - abar_t): model output -> (x0, eps)
    sqrt_1m_ab: jax.Array
    c_x0: jax.Array
    c_x: jax.Array
    c_eps: jax.Array
    std: jax.Array  # fixed noise scale (0 where no noise is added)
    min_log: jax.Array  # learned_range bounds of the log variance
    max_log: jax.Array
    noise_mask: jax.Array  # 1 where noise is added (learned variance), else 0

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])


def _as_plan(**cols) -> StepPlan:
    out = {k: np.asarray(v, np.int32 if k == "t" else np.float32) for k, v in cols.items()}
    return StepPlan(**out)


def build_plan(diffusion: GaussianDiffusion, sampling: SamplingConfig,
               timesteps: np.ndarray | None = None) -> StepPlan:
    """The plan of a DDPM or DDIM sampling run, from x_T down to x_0.

    Respacing: with sampling timesteps t_0 > t_1 > ... the process is the one whose cumulative
    alphas are abar[t_i]; its betas are 1 - abar[t_i] / abar[t_{i+1}] (the last step goes to
    `final_alpha_bar`, 1 by default).
    """
    T = diffusion.num_steps
    if timesteps is None:
        timesteps = sampling_timesteps(T, sampling.steps, sampling.spacing, sampling.offset)
    ts = np.asarray(timesteps, np.int64)
    if ts.ndim != 1 or len(ts) == 0 or ts[0] >= T or ts[-1] < 0 or np.any(np.diff(ts) >= 0):
        raise ValueError(f"timesteps must be strictly descending within [0, {T}), got {ts}")
    acp = diffusion.alphas_cumprod
    a = acp[ts]
    a_prev = np.append(acp[ts[1:]], sampling.final_alpha_bar)
    if sampling.coefficient_dtype == "float32":
        one = np.float32(1.0)
        a, a_prev = a.astype(np.float32), a_prev.astype(np.float32)
        beta = one - a / a_prev
        alpha = one - beta  # diffusers' UnCLIPScheduler: cancels when abar_t / abar_prev is tiny
        # ... and where the next timestep is t - 1 (the last step, t=0) it takes beta_t itself
        consecutive = np.append(ts[1:], -1) == ts - 1
        b32 = diffusion.betas.astype(np.float32)[ts]
        beta = np.where(consecutive, b32, beta)
        alpha = np.where(consecutive, one - b32, alpha)
        var = (one - a_prev) / (one - a) * beta
    else:
        beta = 1.0 - a / a_prev
        alpha = a / a_prev
        var = (1.0 - a_prev) / (1.0 - a) * beta
    n = len(ts)
    zeros = np.zeros(n)
    if sampling.method == "ddim":
        sigma = sampling.eta * np.sqrt(np.maximum(var, 0.0))
        return _as_plan(t=ts, sqrt_ab=np.sqrt(a), sqrt_1m_ab=np.sqrt(1.0 - a),
                        c_x0=np.sqrt(a_prev), c_x=zeros,
                        c_eps=np.sqrt(np.maximum(1.0 - a_prev - sigma ** 2, 0.0)), std=sigma,
                        min_log=zeros, max_log=zeros, noise_mask=zeros)
    # DDPM ancestral: x_{t-1} = posterior mean(x0_hat, x_t) + std * noise, noise at every step
    # but the last: the run ends on the posterior mean whatever its last timestep (trailing or
    # offset spacings end above t = 0, where a t > 0 test would still add noise).
    mask = (np.arange(n) < n - 1).astype(np.float64)
    kind = diffusion.config.variance
    if kind == "fixed_large":
        std = np.sqrt(beta)
    else:
        std = np.sqrt(np.maximum(var, 1e-20))
    return _as_plan(t=ts, sqrt_ab=np.sqrt(a), sqrt_1m_ab=np.sqrt(1.0 - a),
                    c_x0=np.sqrt(a_prev) * beta / (1.0 - a),
                    c_x=np.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a), c_eps=zeros,
                    std=std * mask, min_log=np.log(np.maximum(var, 1e-20)),
                    max_log=np.log(beta), noise_mask=mask)


def build_inversion_plan(diffusion: GaussianDiffusion, sampling: SamplingConfig,
                         timesteps: np.ndarray | None = None) -> StepPlan:
    """DDIM inversion (eta = 0): x_0 -> x_T, deterministic, visiting the timesteps upwards.

    Step i evaluates the model at t_i and moves to the noise level of t_{i+1}:
    x_{i+1} = sqrt(abar_{i+1}) x0_hat + sqrt(1 - abar_{i+1}) eps_hat. The result is the x_T
    that `build_plan(..., method="ddim", eta=0)` with the same timesteps starts from.
    """
    T = diffusion.num_steps
    if timesteps is None:
        timesteps = sampling_timesteps(T, sampling.steps, sampling.spacing, sampling.offset)
    ts = np.asarray(timesteps, np.int64)[::-1]  # ascending
    if len(ts) < 2:
        raise ValueError("DDIM inversion needs at least 2 timesteps")
    acp = diffusion.alphas_cumprod
    a, a_next = acp[ts[:-1]], acp[ts[1:]]
    zeros = np.zeros(len(a))
    return _as_plan(t=ts[:-1], sqrt_ab=np.sqrt(a), sqrt_1m_ab=np.sqrt(1.0 - a),
                    c_x0=np.sqrt(a_next), c_x=zeros,
                    c_eps=np.sqrt(1.0 - a_next), std=zeros, min_log=zeros, max_log=zeros,
                    noise_mask=zeros)


@dataclasses.dataclass(frozen=True)
class StepRule:
    """The static part of a loop body: how model outputs become (x0, eps)."""

    prediction: str = "eps"
    sigma_data: float = 0.5  # prediction "edm" only
    learned_variance: bool = False  # model outputs 2x channels (mean part, variance part)
    learned_std: bool = False  # take the noise scale from the variance part (DDPM only)
    clip_x0: float | None = 1.0
    dynamic_threshold: float | None = None
    threshold_max: float = 1.0
    recompute_eps: bool = True

    @classmethod
    def of(cls, diffusion: DiffusionConfig, sampling: SamplingConfig,
           clip_x0: float | None | str = "config") -> "StepRule":
        return cls(prediction=diffusion.prediction, sigma_data=float(diffusion.sigma_data),
                   learned_variance=diffusion.learned_variance,
                   learned_std=diffusion.learned_variance and sampling.method == "ddpm",
                   clip_x0=sampling.clip_x0 if clip_x0 == "config" else clip_x0,
                   dynamic_threshold=sampling.dynamic_threshold,
                   threshold_max=sampling.threshold_max,
                   recompute_eps=sampling.recompute_eps)


def is_key_batch(rng) -> bool:
    """Is `rng` a batch of typed keys [B] (one a row) rather than one key?"""
    return (rng is not None and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
            and rng.ndim == 1)


def fold_in_rows(keys, data):
    """`jax.random.fold_in` of every key of a batch of keys [B] (the same `data`)."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


def random_normal(rng, shape, dtype=jnp.float32):
    """Standard normal noise of `shape` from a key; from a batch of keys [shape[0]] each row is
    drawn from its own key, so a row's noise does not depend on the rows beside it (chunked
    sampling equals unchunked sampling)."""
    if not is_key_batch(rng):
        return jax.random.normal(rng, shape, dtype)
    if rng.shape != tuple(shape[:1]):
        raise ValueError(f"{rng.shape[0]} keys for {shape[0]} rows: one key a row")
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(rng)


def _concat(a, b):
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def guided_output(model_fn: ModelFn, params, x, t, cond, uncond, guidance_scale, learned: bool):
    """Model output with classifier-free guidance, as ONE batched call on [cond, uncond].

    out = out_uncond + s * (out_cond - out_uncond) on the mean part; a learned variance part is
    taken from the conditional half. Without `uncond` the model is called on `cond` alone.
    """
    b = x.shape[0]
    tb = jnp.full((b,), t, jnp.int32)
    if uncond is None:
        return model_fn(params, x, tb, cond).astype(x.dtype)
    out = model_fn(params, jnp.concatenate([x, x]), jnp.concatenate([tb, tb]),
                   _concat(cond, uncond)).astype(x.dtype)
    mean_c, var_c = split_variance(out[:b], learned)
    mean_u, _ = split_variance(out[b:], learned)
    mean = mean_u + guidance_scale * (mean_c - mean_u)
    return jnp.concatenate([mean, var_c], axis=-1) if learned else mean


def sample_loop(model_fn: ModelFn, params, x, cond, uncond, guidance_scale, rng, plan: StepPlan,
                noise=None, *, rule: StepRule, on_step: Callable | None = None,
                latent_sharding=None):
    """Run a plan from x (x_T, or x_0 for an inversion plan); returns the final x.

    Pure: everything varying is an argument. Static: model_fn, rule, on_step, latent_sharding.
    `noise`, if given, is [steps, *x.shape] (the per-step noise of a reference run); otherwise
    step i draws from `jax.random.fold_in(rng, i)`; `rng` may also be a batch of keys [B], one a
    row of x, each row then drawing its own noise (`random_normal`), whatever the batch.
    """
    n = plan.t.shape[0]

    def body(x, xs):
        i, p, eps_noise = xs
        if latent_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, latent_sharding)
        out = guided_output(model_fn, params, x, p.t, cond, uncond, guidance_scale,
                            rule.learned_variance)
        mean_out, var_out = split_variance(out, rule.learned_variance)
        sa, s1a = p.sqrt_ab.astype(x.dtype), p.sqrt_1m_ab.astype(x.dtype)
        x0, eps = predict_x0_eps(rule.prediction, mean_out, x, sa, s1a, rule.sigma_data)
        if rule.dynamic_threshold is not None:
            x0 = dynamic_threshold(x0, rule.dynamic_threshold, rule.threshold_max)
        elif rule.clip_x0 is not None:
            x0 = jnp.clip(x0, -rule.clip_x0, rule.clip_x0)
        if rule.recompute_eps:
            eps = (x - sa * x0) / s1a
        x_next = p.c_x0 * x0 + p.c_x * x + p.c_eps * eps
        if eps_noise is None:
            eps_noise = random_normal(fold_in_rows(rng, i) if is_key_batch(rng)
                                      else jax.random.fold_in(rng, i), x.shape, x.dtype)
        if rule.learned_std:
            frac = (var_out + 1.0) / 2.0
            # selected, not multiplied: a variance output far outside [-1, 1] (an untrained
            # net) can overflow exp to inf at the noiseless last step, and inf * 0 is NaN
            std = jnp.where(p.noise_mask > 0,
                            jnp.exp(0.5 * (frac * p.max_log + (1.0 - frac) * p.min_log)), 0.0)
        else:
            std = p.std
        x_next = x_next + std * eps_noise
        if on_step is not None:
            jax.debug.callback(on_step, i)
        return x_next, None

    x, _ = jax.lax.scan(body, x, (jnp.arange(n), plan, noise))
    return x


_STATIC = ("model_fn", "rule", "on_step", "latent_sharding")
_jitted_loop = jax.jit(sample_loop, static_argnames=_STATIC)
# The same program with x donated: the caller's x_T buffer is reused for the result.
_jitted_loop_donating = jax.jit(sample_loop, static_argnames=_STATIC, donate_argnames=("x",))


class Sampler:
    """A model's sampler: its diffusion, a sampling config and the one jitted loop.

    >>> sampler = Sampler(model_fn, DiffusionConfig(), SamplingConfig(steps=25), progress="decoder")
    >>> x0 = sampler(params, x_T, cond, uncond, rng=key, guidance_scale=8.0)
    >>> x_T = sampler.invert(params, x0, cond)               # DDIM inversion

    With `donate=True` the x_T passed in is donated to the result (its buffer is invalid after
    the call); with `progress` a tqdm bar advances from a host callback inside the scan.
    """

    def __init__(self, model_fn: ModelFn, diffusion: DiffusionConfig | GaussianDiffusion,
                 sampling: SamplingConfig = SamplingConfig(), *, progress: str | bool = False,
                 latent_sharding=None, donate: bool = False):
        self.model_fn = model_fn
        self.diffusion = (diffusion if isinstance(diffusion, GaussianDiffusion)
                          else GaussianDiffusion(diffusion))
        self.sampling = sampling
        self.rule = StepRule.of(self.diffusion.config, sampling)
        self.plan = build_plan(self.diffusion, sampling)
        self.progress = progress
        self.latent_sharding = latent_sharding
        self._loop = _jitted_loop_donating if donate else _jitted_loop
        self._bar = None

    @classmethod
    def for_stage(cls, model_fn: ModelFn, stage: StageSampling, steps: int, *,
                  method: str | None = None, eta: float | None = None, clip: bool = True,
                  coefficient_dtype: str = "float64", progress: str | bool = False,
                  spacing: str = "even") -> "Sampler":
        """The sampler of a trained model as its `StageSampling` says (method, eta and x0 clip
        range; `method` / `eta` override them, `clip=False` turns clipping off), over `steps`
        timesteps spaced by `spacing` (`schedule.sampling_timesteps`; default evenly over
        [0, T - 1])."""
        scfg = SamplingConfig(method=stage.method if method is None else method,
                              eta=stage.eta if eta is None else float(eta), steps=steps,
                              spacing=spacing, clip_x0=stage.clip_x0 if clip else None,
                              coefficient_dtype=coefficient_dtype)
        return cls(model_fn, stage.diffusion, scfg, progress=progress)

    @property
    def timesteps(self) -> np.ndarray:
        return np.asarray(self.plan.t)

    def _tick(self, i):
        if self._bar is not None:
            self._bar.update(1)

    def _run(self, plan, rule, params, x, cond, uncond, guidance_scale, rng, noise, desc):
        gs = _check_guidance(guidance_scale, uncond)
        if gs == 1.0:  # out_u + 1 * (out_c - out_u) is out_c: skip the unconditional half
            uncond = None
        if noise is not None and tuple(noise.shape) != (plan.num_steps,) + tuple(x.shape):
            raise ValueError(f"noise must have shape {(plan.num_steps,) + tuple(x.shape)}, "
                             f"got {tuple(noise.shape)}")
        if rng is None:
            rng = jax.random.key(0)
        if is_key_batch(rng) and rng.shape != tuple(x.shape[:1]):
            raise ValueError(f"a batch of keys must hold one key a row: {rng.shape[0]} keys for "
                             f"{x.shape[0]} rows")
        on_step = self._tick if self.progress else None
        if self.progress:
            from tqdm.auto import tqdm

            name = self.progress if isinstance(self.progress, str) else "sampling"
            self._bar = tqdm(total=plan.num_steps, desc=f"{name} {desc}", leave=False)
        try:
            out = self._loop(self.model_fn, params, jnp.asarray(x, jnp.float32), cond, uncond,
                               jnp.float32(gs), rng, plan, noise, rule=rule, on_step=on_step,
                               latent_sharding=self.latent_sharding)
            if self.progress:
                out = jax.block_until_ready(out)
                jax.effects_barrier()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        return out

    def __call__(self, params, x_T, cond, uncond=None, *, rng=None, guidance_scale: float = 1.0,
                 noise=None):
        """Sample from x_T; with `uncond`, classifier-free guidance at `guidance_scale`."""
        return self._run(self.plan, self.rule, params, x_T, cond, uncond, guidance_scale, rng,
                         noise, self.sampling.method)

    def invert(self, params, x0, cond, uncond=None, *, guidance_scale: float = 1.0,
               clip_x0: float | None = None):
        """DDIM inversion x_0 -> x_T over this sampler's timesteps (deterministic)."""
        plan = build_inversion_plan(self.diffusion, self.sampling, self.timesteps)
        rule = dataclasses.replace(StepRule.of(self.diffusion.config, self.sampling, clip_x0),
                                   learned_std=False, dynamic_threshold=None)
        return self._run(plan, rule, params, x0, cond, uncond, guidance_scale, None, None,
                         "inversion")


def _check_guidance(scale, uncond):
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a number, got {scale!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
    if uncond is None and s != 1.0:
        raise ValueError("a guidance scale other than 1 needs the unconditional inputs (uncond)")
    return s
