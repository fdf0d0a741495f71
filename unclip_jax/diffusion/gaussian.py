"""Gaussian diffusion math: the forward process, its posterior, model parametrisations, variances
and training losses.

`GaussianDiffusion` holds a model's diffusion settings (schedule, what the network predicts, how
its variance is chosen) and the float64 tables derived from them. Its methods are pure functions of
arrays and can be used inside `jax.jit`; the tables become constants of the compiled program.

Array layout: the batch axis is first and the channel axis is last (NHWC images, [B, D] vectors).
A learned-variance model outputs 2x channels: [mean part, variance part] on the last axis.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion.schedule import NoiseSchedule, _check_int, make_betas

PREDICTIONS = ("eps", "x0", "v", "edm")
_PREDICTION_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
LOSSES = ("mse", "hybrid")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """How a diffusion model was trained: a static, JSON-serialisable description."""

    schedule: str = "cosine"  # cosine (squaredcos_cap_v2) | linear
    num_train_steps: int = 1000
    prediction: str = "eps"  # eps | x0 | v | edm  (aliases: epsilon, sample, v_prediction)
    variance: str = "fixed_small_log"  # fixed_small | fixed_small_log | fixed_large | learned_range
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    # prediction="edm": the data's standard deviation of Karras et al.'s (2022) preconditioning
    sigma_data: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "prediction",
                           _PREDICTION_ALIASES.get(self.prediction, self.prediction))
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown model prediction {self.prediction!r}; expected one of "
                             f"{PREDICTIONS}")
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance type {self.variance!r}; expected one of {VARIANCES}")
        _check_int("num_train_steps", self.num_train_steps, 1)
        if not float(self.sigma_data) > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
        make_betas(self.schedule, 1, beta_start=self.beta_start, beta_end=self.beta_end)

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned_range"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        return cls(**d)


def edm_coefficients(sa, s1a, sigma_data: float):
    """Karras et al.'s (2022) preconditioning written for the variance-preserving x_t = sa x0 +
    s1a eps (sigma = s1a / sa): x0 = c_skip x_t + c_out F with c_skip = sigma_d^2 sa / D^2 and
    c_out = s1a sigma_d / D, D^2 = s1a^2 + sa^2 sigma_d^2 (EDM's c_skip(sigma) / sa and
    c_out(sigma) on x_t / sa). At low noise x0 is mostly x_t (nothing to blur), at high noise
    mostly F (an x0 prediction); sigma_d = 1 is v prediction (F = -v)."""
    d2 = s1a * s1a + sa * sa * sigma_data * sigma_data
    return sigma_data * sigma_data * sa / d2, s1a * sigma_data / jnp.sqrt(d2)


def _gather(table: np.ndarray, t: jax.Array, ndim: int, dtype=jnp.float32) -> jax.Array:
    """table[t] reshaped to broadcast against an array of rank `ndim` ([B, 1, ..., 1])."""
    v = jnp.asarray(table, dtype)[t]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def split_variance(out: jax.Array, learned: bool):
    """Split a model output into (mean part, variance part or None) on the last axis."""
    if not learned:
        return out, None
    c = out.shape[-1] // 2
    return out[..., :c], out[..., c:]


def predict_x0_eps(prediction: str, out: jax.Array, x_t: jax.Array, sa: jax.Array,
                   s1a: jax.Array, sigma_data: float = 0.5):
    """Model output -> (x0, eps) at the noise level with sqrt(abar) = sa, sqrt(1 - abar) = s1a
    (both broadcastable; pass them precomputed in float64 to avoid cancellation in 1 - abar).
    `sigma_data`: prediction "edm" only (:func:`edm_coefficients`)."""
    if prediction == "eps":
        return (x_t - s1a * out) / sa, out
    if prediction == "x0":
        return out, (x_t - sa * out) / s1a
    if prediction == "v":
        return sa * x_t - s1a * out, sa * out + s1a * x_t
    if prediction == "edm":
        c_skip, c_out = edm_coefficients(sa, s1a, sigma_data)
        x0 = c_skip * x_t + c_out * out
        return x0, (x_t - sa * x0) / s1a
    raise ValueError(f"unknown model prediction {prediction!r}")


def dynamic_threshold(x0: jax.Array, ratio: float, max_value: float = 1.0) -> jax.Array:
    """Imagen's dynamic thresholding: per sample, s = quantile(|x0|, ratio) clamped to
    [1, max_value]; x0 -> clip(x0, -s, s) / s."""
    b = x0.shape[0]
    flat = jnp.abs(x0.reshape(b, -1).astype(jnp.float32))
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
    s = s.reshape((b,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of data in [-1, 1] quantised to 256 levels under N(mean, e^(2 log_scale)) (ADM)."""
    centered = x - mean
    inv_stdv = jnp.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min,
                               jnp.log(jnp.maximum(cdf_delta, 1e-12))))


def gaussian_log_likelihood(x, mean, logvar):
    """Continuous Gaussian log density, elementwise (for vector data such as embeddings)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * jnp.exp(-logvar))


class GaussianDiffusion:
    """The diffusion process of one model and the math around it (pure, jit-friendly)."""

    def __init__(self, config: DiffusionConfig, schedule: NoiseSchedule | None = None):
        self.config = config
        self.schedule = schedule or NoiseSchedule.named(
            config.schedule, config.num_train_steps, beta_start=config.beta_start,
            beta_end=config.beta_end)
        if self.schedule.num_steps != config.num_train_steps:
            raise ValueError("schedule length differs from config.num_train_steps")
        b = self.schedule.betas
        a = self.schedule.alphas_cumprod
        a_prev = np.concatenate([[1.0], a[:-1]])
        self.betas = b
        self.alphas_cumprod = a
        self.alphas_cumprod_prev = a_prev
        self.sqrt_alphas_cumprod = np.sqrt(a)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - a)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = b * (1.0 - a_prev) / (1.0 - a)
        # log of the posterior variance with the t=0 entry (0) replaced by the t=1 entry (ADM)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]) if len(pv) > 1
                                                     else np.maximum(pv, 1e-20))
        self.posterior_mean_coef1 = b * np.sqrt(a_prev) / (1.0 - a)
        self.posterior_mean_coef2 = (1.0 - a_prev) * np.sqrt(1.0 - b) / (1.0 - a)
        # fixed_large uses beta_t, with the t=0 entry replaced by the posterior variance at t=1
        self.large_log_variance = np.log(np.append(pv[1], b[1:]) if len(b) > 1 else b)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    # ----------------------------------------------------------------- forward process
    def _sqrt_ab(self, t, ndim, dtype):
        return (_gather(self.sqrt_alphas_cumprod, t, ndim, dtype),
                _gather(self.sqrt_one_minus_alphas_cumprod, t, ndim, dtype))

    def q_mean_variance(self, x0, t):
        sa, _ = self._sqrt_ab(t, x0.ndim, x0.dtype)
        return sa * x0, _gather(1.0 - self.alphas_cumprod, t, x0.ndim, x0.dtype)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        sa, s1a = self._sqrt_ab(t, x0.ndim, x0.dtype)
        return sa * x0 + s1a * noise

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        nd, dt = x_t.ndim, x_t.dtype
        mean = (_gather(self.posterior_mean_coef1, t, nd, dt) * x0
                + _gather(self.posterior_mean_coef2, t, nd, dt) * x_t)
        return (mean, _gather(self.posterior_variance, t, nd, dt),
                _gather(self.posterior_log_variance_clipped, t, nd, dt))

    # ----------------------------------------------------------------- model side
    def targets(self, x0, noise, t):
        """What the network is trained to output, by config.prediction."""
        p = self.config.prediction
        if p == "eps":
            return noise
        if p == "x0":
            return x0
        sa, s1a = self._sqrt_ab(t, x0.ndim, x0.dtype)
        if p == "edm":  # F with c_skip x_t + c_out F = x0
            c_skip, c_out = edm_coefficients(sa, s1a, float(self.config.sigma_data))
            return (x0 - c_skip * (sa * x0 + s1a * noise)) / c_out
        return sa * noise - s1a * x0

    def p_mean_variance(self, out, x_t, t, *, clip_x0: float | None = None):
        """The reverse step p(x_{t-1} | x_t) of the full (not respaced) process.

        Returns dict(mean, log_variance, x0, eps).
        """
        cfg = self.config
        out, var_out = split_variance(out, cfg.learned_variance)
        x0, eps = predict_x0_eps(cfg.prediction, out, x_t, *self._sqrt_ab(t, x_t.ndim, x_t.dtype),
                                 sigma_data=float(cfg.sigma_data))
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        mean, _, min_log = self.q_posterior(x0, x_t, t)
        if cfg.variance == "learned_range":
            max_log = _gather(np.log(self.betas), t, x_t.ndim, x_t.dtype)
            frac = (var_out + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        elif cfg.variance == "fixed_large":
            log_var = jnp.broadcast_to(_gather(self.large_log_variance, t, x_t.ndim, x_t.dtype),
                                       x_t.shape)
        else:
            log_var = jnp.broadcast_to(min_log, x_t.shape)
        return dict(mean=mean, log_variance=log_var, x0=x0, eps=eps)

    # ----------------------------------------------------------------- training
    def snr(self, t):
        a = jnp.asarray(self.alphas_cumprod, jnp.float32)[t]
        return a / (1.0 - a)

    def vlb_terms(self, out, x0, x_t, t, *, discrete: bool = True):
        """The variational bound term L_t per example, in bits per dimension.

        For t > 0: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)); for t = 0: -log p(x0|x1), discretised
        for images in [-1, 1] (`discrete=True`) or a Gaussian density for continuous data.
        """
        true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(out, x_t, t)
        axes = tuple(range(1, x0.ndim))
        kl = jnp.mean(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"]),
                      axis=axes) / math.log(2.0)
        if discrete:
            ll = discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        else:
            ll = gaussian_log_likelihood(x0, p["mean"], p["log_variance"])
        nll = -jnp.mean(ll, axis=axes) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def loss(self, out, x0, noise, t, *, loss_type: str = "mse", vlb_weight: float = 1e-3,
             p2_gamma: float = 0.0, p2_k: float = 1.0, min_snr_gamma: float = 0.0,
             snr_floor: float = 0.0, discrete: bool = True):
        """Per-example training loss for model output `out` at (x_t = q_sample(x0, t, noise), t).

        mse:    mean squared error on the target of config.prediction, optionally weighted by
                p2 weighting 1 / (k + SNR_t)^gamma (Choi et al. 2022; gamma = 0 disables it), or
                by min-SNR-gamma weighting (Hang et al. 2023: the x0-space weight min(SNR, g),
                expressed for the prediction target; 0 disables it). `snr_floor` f > 0 raises
                that x0-space weight to at least f: max(SNR, 1) is Salimans & Ho's (2022)
                truncated-SNR weighting, and with min_snr_gamma both bound it,
                clip(SNR, f, g) -- high-noise steps keep the weight an x0 loss gives them.
        hybrid: mse + vlb_weight * T * L_t (improved DDPM's L_hybrid with lambda = vlb_weight); the
                variational term trains only the variance (the mean is held fixed by stop_gradient).
        Returns (loss [B], aux dict of per-example terms).
        """
        if loss_type not in LOSSES:
            raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSSES}")
        learned = self.config.learned_variance
        if loss_type == "hybrid" and not learned:
            raise ValueError("the hybrid loss needs a learned variance (variance='learned_range')")
        mean_out, var_out = split_variance(out, learned)
        axes = tuple(range(1, x0.ndim))
        target = self.targets(x0, noise, t)
        mse = jnp.mean((mean_out.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=axes)
        if p2_gamma:
            mse = mse / (p2_k + self.snr(t)) ** p2_gamma
        if min_snr_gamma or snr_floor:
            snr = self.snr(t)
            clipped = jnp.minimum(snr, min_snr_gamma) if min_snr_gamma else snr
            clipped = jnp.maximum(clipped, snr_floor) if snr_floor else clipped
            sd2 = float(self.config.sigma_data) ** 2  # edm: x0 error = c_out F error
            mse = mse * {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0),
                         "edm": clipped * sd2 / (1.0 + snr * sd2)}[self.config.prediction]
        aux = {"mse": mse}
        loss = mse
        if loss_type == "hybrid":
            x_t = self.q_sample(x0, t, noise)
            frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
            vb = self.vlb_terms(frozen.astype(jnp.float32), x0.astype(jnp.float32),
                                x_t.astype(jnp.float32), t, discrete=discrete)
            aux["vb"] = vb
            loss = mse + vlb_weight * self.num_steps * vb
        return loss, aux

    def training_loss(self, model_fn, params, x0, cond, rng, *, with_output: bool = False,
                      t_logit_mean: float = 0.0, t_logit_std: float = 0.0, **loss_kw):
        """The diffusion training loss of a denoiser, for every model that trains here.

        Draws t ~ U{0, ..., T-1} (or, with `t_logit_std` > 0, t = floor(T sigmoid(u)) with
        u ~ N(t_logit_mean, t_logit_std^2): the logit-normal timestep density of Esser et al.
        2024, which spends the steps on middle noise levels) and Gaussian noise per example,
        noises `x0` to x_t and calls
        `model_fn(params, x_t, t, cond, train=True, rng=dropout_key)` (the models' `denoiser`
        adapters). `rng` is a key, or an array of three keys (timestep, noise, dropout).
        `loss_kw` are :meth:`loss`'s options (see :func:`loss_options`).
        Returns (per-example loss [B], aux dict of per-example terms), and the model's output
        too with `with_output`.
        """
        typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
        keys = rng if rng.ndim == (1 if typed else 2) else jax.random.split(rng, 3)
        k_t, k_noise, k_dropout = keys[0], keys[1], keys[2]
        t = self.sample_timesteps(k_t, x0.shape[0], t_logit_mean, t_logit_std)
        noise = jax.random.normal(k_noise, x0.shape)
        out = model_fn(params, self.q_sample(x0, t, noise), t, cond, train=True, rng=k_dropout)
        loss, aux = self.loss(out, x0, noise, t, **loss_kw)
        return (loss, aux, out) if with_output else (loss, aux)

    def sample_timesteps(self, key, n: int, logit_mean: float = 0.0, logit_std: float = 0.0):
        """n training timesteps in {0, ..., T-1}: uniform, or logit-normal when logit_std > 0."""
        if logit_std < 0:
            raise ValueError(f"t_logit_std must be >= 0, got {logit_std}")
        if not logit_std:
            return jax.random.randint(key, (n,), 0, self.num_steps)
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (n,)))
        return jnp.clip(jnp.floor(u * self.num_steps), 0, self.num_steps - 1).astype(jnp.int32)


#: config `loss` block key -> :meth:`GaussianDiffusion.training_loss` / `loss` keyword
_LOSS_OPTIONS = {"type": "loss_type", "vlb_weight": "vlb_weight", "p2_gamma": "p2_gamma",
                 "p2_k": "p2_k", "min_snr_gamma": "min_snr_gamma", "snr_floor": "snr_floor",
                 "t_logit_mean": "t_logit_mean", "t_logit_std": "t_logit_std"}


def loss_options(loss_cfg) -> dict:
    """A stage config's `loss` block (dict or ConfigDict; None: the defaults) -> the keyword
    arguments of :meth:`GaussianDiffusion.training_loss` (its timestep options and
    :meth:`GaussianDiffusion.loss`'s). An unknown key is an error."""
    if loss_cfg is None:
        return {}
    d = loss_cfg.to_dict() if hasattr(loss_cfg, "to_dict") else dict(loss_cfg)
    unknown = sorted(set(d) - set(_LOSS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown loss options {unknown}; expected some of {sorted(_LOSS_OPTIONS)}")
    return {_LOSS_OPTIONS[k]: (str(v) if k == "type" else float(v)) for k, v in d.items()}

