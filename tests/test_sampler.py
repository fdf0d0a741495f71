"""The one jitted lax.scan sampler: against a step-by-step reference loop, DDIM inversion, guidance
as one batched call, progress, bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import (
    DiffusionConfig, GaussianDiffusion, Sampler, SamplingConfig, StepRule, build_plan)
from unclip_jax.diffusion.sampler import _jitted_loop

W = np.linspace(-0.8, 0.9, 3).astype(np.float32)


def toy_model(params, x, t, cond):
    """A smooth deterministic 'network' (NHWC); cond is a per-example scalar shift."""
    tt = (t.astype(jnp.float32) / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    out = jnp.tanh(x * params["w"] + tt) * 0.7
    if cond is not None:
        out = out + cond.reshape((-1,) + (1,) * (x.ndim - 1))
    return out


def toy_model_np(x, t, cond, w=W):
    out = np.tanh(x * w + t / 1000.0) * 0.7
    return out if cond is None else out + cond.reshape((-1,) + (1,) * (x.ndim - 1))


def reference_loop(diff, sampling, x, noise, cond=None, uncond=None, scale=1.0, w=W):
    """Textbook DDPM / DDIM written step by step in float64 numpy, model called separately on
    cond and uncond."""
    acp = diff.alphas_cumprod
    ts = diff.schedule.timesteps(sampling.steps, sampling.spacing)
    x = np.asarray(x, np.float64)
    for i, t in enumerate(ts):
        a = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else 1.0
        out = toy_model_np(x, t, cond, w)
        if uncond is not None:
            out_u = toy_model_np(x, t, uncond, w)
            out = out_u + scale * (out - out_u)
        if diff.config.prediction == "eps":
            x0 = (x - math.sqrt(1 - a) * out) / math.sqrt(a)
        else:
            x0 = out
        if sampling.clip_x0 is not None:
            x0 = np.clip(x0, -sampling.clip_x0, sampling.clip_x0)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        beta = 1 - a / a_prev
        if sampling.method == "ddpm":
            mean = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + \
                   (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x
            var = beta * (1 - a_prev) / (1 - a)
            x = mean + (math.sqrt(var) * noise[i] if t > 0 else 0.0)
        else:
            sigma = sampling.eta * math.sqrt((1 - a_prev) / (1 - a) * beta)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * noise[i]
    return x


CASES = [
    (DiffusionConfig(prediction="eps"), SamplingConfig(method="ddpm", steps=10, clip_x0=1.0)),
    (DiffusionConfig(prediction="x0", schedule="linear"),
     SamplingConfig(method="ddpm", steps=7, spacing="leading", clip_x0=None)),
    (DiffusionConfig(prediction="eps"), SamplingConfig(method="ddim", steps=12, eta=0.0)),
    (DiffusionConfig(prediction="eps"), SamplingConfig(method="ddim", steps=9, eta=0.7,
                                                       spacing="trailing")),
]


@pytest.mark.parametrize("dcfg,scfg", CASES)
@pytest.mark.parametrize("guided", [False, True])
def test_scan_equals_reference_loop(dcfg, scfg, guided):
    diff = GaussianDiffusion(dcfg)
    rng = np.random.default_rng(0)
    x_T = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    noise = rng.normal(size=(scfg.steps,) + x_T.shape).astype(np.float32)
    cond = np.array([0.1, -0.2], np.float32)
    uncond = np.zeros(2, np.float32) if guided else None
    scale = 3.0 if guided else 1.0
    want = reference_loop(diff, scfg, x_T, noise, cond, uncond, scale)
    sampler = Sampler(toy_model, diff, scfg)
    got = sampler({"w": jnp.asarray(W)}, jnp.asarray(x_T), jnp.asarray(cond),
                  None if uncond is None else jnp.asarray(uncond), guidance_scale=scale,
                  noise=jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_rng_is_derived_from_the_step():
    diff = GaussianDiffusion(DiffusionConfig())
    scfg = SamplingConfig(method="ddpm", steps=5)
    sampler = Sampler(toy_model, diff, scfg)
    x_T = jnp.zeros((1, 2, 2, 3))
    key = jax.random.key(7)
    got = sampler({"w": jnp.asarray(W)}, x_T, None, rng=key)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), x_T.shape))
                      for i in range(5)])
    want = sampler({"w": jnp.asarray(W)}, x_T, None, noise=jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    other = sampler({"w": jnp.asarray(W)}, x_T, None, rng=jax.random.key(8))
    assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-3


def _toy_learned(params, x, t, cond):
    """toy_model's mean channels + variance channels in [-1, 1] (learned_range)."""
    v = jnp.tanh(x * 0.5 - (t.astype(jnp.float32) / 700.0).reshape((-1,) + (1,) * (x.ndim - 1)))
    return jnp.concatenate([toy_model(params, x, t, cond), v], axis=-1)


@pytest.mark.parametrize("variance,final_alpha_bar", [
    ("fixed_large", 1.0), ("learned_range", 1.0), ("fixed_small", None)])
@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 1)])
def test_last_ddpm_step_adds_no_noise(variance, final_alpha_bar, spacing, offset):
    """The last step of a DDPM run adds no noise whatever its timestep (trailing and offset
    spacings end at t > 0): the final x is the posterior mean of the last step, closed form."""
    diff = GaussianDiffusion(DiffusionConfig(prediction="eps", variance=variance))
    if final_alpha_bar is None:  # diffusers' set_alpha_to_one=False: the posterior std is > 0
        final_alpha_bar = float(diff.alphas_cumprod[0])
    scfg = SamplingConfig(method="ddpm", steps=6, spacing=spacing, offset=offset, clip_x0=1.0,
                          final_alpha_bar=final_alpha_bar)
    learned = variance == "learned_range"
    model = _toy_learned if learned else toy_model
    sampler = Sampler(model, diff, scfg)
    plan = sampler.plan
    ts = np.asarray(plan.t)
    assert ts[-1] > 0
    assert float(plan.std[-1]) == 0.0 and float(plan.noise_mask[-1]) == 0.0
    assert np.all(np.asarray(plan.noise_mask[:-1]) == 1.0)
    if not learned:
        assert np.all(np.asarray(plan.std[:-1]) > 0)
    params = {"w": jnp.asarray(W)}
    rng = np.random.default_rng(3)
    x_T = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
    noise = rng.normal(size=(6,) + x_T.shape).astype(np.float32)
    other = noise.copy()
    other[-1] = rng.normal(size=x_T.shape) * 10.0  # only the last step's noise differs
    got = np.asarray(sampler(params, jnp.asarray(x_T), None, noise=jnp.asarray(noise)))
    got_other = np.asarray(sampler(params, jnp.asarray(x_T), None, noise=jnp.asarray(other)))
    np.testing.assert_array_equal(got, got_other)
    # closed form: x before the last step (the same scan over the first n - 1 steps), then the
    # posterior mean of q(x_prev | x_t, x0_hat) in float64, with zero std
    head = jax.tree.map(lambda a: a[:-1], plan)
    x = np.asarray(_jitted_loop(model, params, jnp.asarray(x_T), None, None, jnp.float32(1.0),
                                jax.random.key(0), head, jnp.asarray(noise[:-1]),
                                rule=sampler.rule), np.float64)
    t = int(ts[-1])
    a, a_prev = diff.alphas_cumprod[t], final_alpha_bar
    eps = toy_model_np(x, t, None)
    x0 = np.clip((x - math.sqrt(1 - a) * eps) / math.sqrt(a), -1.0, 1.0)
    beta = 1 - a / a_prev
    mean = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + \
        (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x
    np.testing.assert_allclose(got, mean, atol=2e-5, rtol=1e-5)


def test_an_out_of_range_learned_variance_leaves_the_last_step_finite():
    """A learned_range variance output far above 1 (an untrained network's) overflows the log
    variance interpolation to +inf where the posterior variance is ~0; the last DDPM step adds no
    noise, so its result must be that step's posterior mean, finite (diffusers skips the noise
    there too), not inf * 0 = NaN."""
    diff = GaussianDiffusion(DiffusionConfig(prediction="eps", variance="learned_range"))
    scfg = SamplingConfig(method="ddpm", steps=3, clip_x0=1.0)
    t_last = int(Sampler(toy_model, diff, scfg).plan.t[-1])

    def model(params, x, t, cond):  # in range, but 40 at the last step
        v = jnp.where((t == t_last).reshape((-1, 1, 1, 1)), 40.0, 0.0) * jnp.ones_like(x)
        return jnp.concatenate([toy_model(params, x, t, cond), v], axis=-1)

    sampler = Sampler(model, diff, scfg)
    x_T = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 3)), jnp.float32)
    # the interpolated log variance of the last step overflows in float32 ...
    p = sampler.plan
    frac = (40.0 + 1.0) / 2.0
    last = np.float32(0.5) * (np.float32(frac) * np.float32(p.max_log[-1])
                              + np.float32(1 - frac) * np.float32(p.min_log[-1]))
    assert float(last) > 88.8  # exp overflows float32 above ~88.7
    # ... and the run still ends on the last step's finite posterior mean
    out = np.asarray(sampler({"w": jnp.asarray(W)}, x_T, None, rng=jax.random.key(0)))
    assert np.isfinite(out).all()


def _oracle(diff, x0_true, prediction):
    sab = jnp.asarray(diff.sqrt_alphas_cumprod, jnp.float32)
    s1m = jnp.asarray(diff.sqrt_one_minus_alphas_cumprod, jnp.float32)

    def model(params, x, t, cond):
        if prediction == "x0":
            return jnp.broadcast_to(x0_true, x.shape)
        sa = sab[t].reshape((-1,) + (1,) * (x.ndim - 1))
        s1 = s1m[t].reshape((-1,) + (1,) * (x.ndim - 1))
        return (x - sa * x0_true) / s1

    return model


@pytest.mark.parametrize("prediction,steps", [("eps", 50), ("x0", 25), ("eps", 4)])
def test_ddim_inversion_round_trip(prediction, steps):
    diff = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(2, 8, 8, 3)), jnp.float32)
    sampler = Sampler(_oracle(diff, x0, prediction), diff,
                      SamplingConfig(method="ddim", steps=steps, eta=0.0, clip_x0=None))
    x_T = sampler.invert({}, x0, None)
    # x_T sits at the noise level of the first sampling step, and is not x0
    assert float(jnp.abs(x_T - x0).max()) > 0.5
    back = sampler({}, x_T, None)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x0), atol=1e-4)


def test_guidance_is_one_batched_call():
    calls = []

    def model(params, x, t, cond):
        calls.append(x.shape[0])
        return toy_model(params, x, t, cond)

    sampler = Sampler(model, DiffusionConfig(), SamplingConfig(steps=3))
    sampler({"w": jnp.asarray(W)}, jnp.zeros((2, 2, 2, 3)), jnp.ones(2), jnp.zeros(2),
            guidance_scale=4.0)
    assert calls == [4]  # traced once, inside the scan, on the [cond, uncond] batch


def test_learned_variance_guidance_keeps_conditional_variance():
    def model(params, x, t, cond):  # variance channels depend on cond only
        v = jnp.tanh(cond).reshape(-1, 1, 1, 1) * jnp.ones_like(x)
        return jnp.concatenate([x * 0.1 + cond.reshape(-1, 1, 1, 1), v], axis=-1)

    from unclip_jax.diffusion.sampler import guided_output

    x = jnp.ones((2, 2, 2, 3))
    out = guided_output(model, None, x, 500, jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]),
                        5.0, learned=True)
    np.testing.assert_allclose(np.asarray(out[..., :3]), 0.1 + 5.0 * np.array([1, 2.0]).reshape(-1, 1, 1, 1)
                               * np.ones((2, 2, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[..., 3:]), np.tanh([1.0, 2.0]).reshape(-1, 1, 1, 1)
                               * np.ones((2, 2, 2, 3)), rtol=1e-6)


def test_vectors_sample_through_the_same_loop():
    # the prior's case: [B, D] vectors, x0 prediction, fixed_small_log, clip range 5
    diff = GaussianDiffusion(DiffusionConfig(prediction="x0"))
    scfg = SamplingConfig(method="ddpm", steps=6, clip_x0=5.0)
    rng = np.random.default_rng(4)
    x_T = rng.normal(size=(3, 5)).astype(np.float32)
    noise = rng.normal(size=(6, 3, 5)).astype(np.float32)
    w = np.linspace(-1.0, 1.0, 5).astype(np.float32)
    want = reference_loop(diff, scfg, x_T, noise, w=w)
    got = Sampler(toy_model, diff, scfg)({"w": jnp.asarray(w)}, jnp.asarray(x_T), None,
                                        noise=jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_progress_callback_runs_inside_the_jitted_scan():
    seen = []
    diff = GaussianDiffusion(DiffusionConfig())
    scfg = SamplingConfig(steps=6)
    plan = build_plan(diff, scfg)
    out = _jitted_loop(toy_model, {"w": jnp.asarray(W)}, jnp.zeros((1, 2, 2, 3)), None, None,
                       jnp.float32(1.0), jax.random.key(0), plan, None,
                       rule=StepRule.of(diff.config, scfg), on_step=lambda i: seen.append(int(i)))
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert sorted(seen) == list(range(6))


def test_sampler_with_progress_bar(capsys):
    sampler = Sampler(toy_model, DiffusionConfig(), SamplingConfig(steps=4), progress="toy")
    out = sampler({"w": jnp.asarray(W)}, jnp.zeros((1, 2, 2, 3)), None)
    assert out.shape == (1, 2, 2, 3) and np.all(np.isfinite(np.asarray(out)))


def test_donated_sampler_keeps_result():
    sampler = Sampler(toy_model, DiffusionConfig(), SamplingConfig(steps=3), donate=True)
    out = sampler({"w": jnp.asarray(W)}, jnp.zeros((1, 2, 2, 3)), None)
    assert out.shape == (1, 2, 2, 3)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_nan_guidance_is_a_clear_error(scale):
    sampler = Sampler(toy_model, DiffusionConfig(), SamplingConfig(steps=3))
    with pytest.raises(ValueError, match="guidance scale must be a finite number"):
        sampler({"w": jnp.asarray(W)}, jnp.zeros((1, 2, 2, 3)), jnp.ones(1), jnp.zeros(1),
                guidance_scale=scale)


def test_guidance_without_uncond_is_an_error():
    sampler = Sampler(toy_model, DiffusionConfig(), SamplingConfig(steps=3))
    with pytest.raises(ValueError, match="needs the unconditional inputs"):
        sampler({"w": jnp.asarray(W)}, jnp.zeros((1, 2, 2, 3)), jnp.ones(1), guidance_scale=3.0)


@pytest.mark.parametrize("kw,msg", [
    (dict(steps=0), "sampling steps must be >= 1"),
    (dict(steps=-5), "sampling steps must be >= 1"),
    (dict(method="euler"), "unknown sampling method"),
    (dict(eta=float("nan")), "eta must be a finite number"),
])
def test_bad_sampling_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kw)


def test_more_steps_than_training_steps():
    with pytest.raises(ValueError, match=r"sampling steps must be in \[1, 1000\], got 1001"):
        Sampler(toy_model, DiffusionConfig(), SamplingConfig(steps=1001))


def test_noise_of_wrong_shape():
    sampler = Sampler(toy_model, DiffusionConfig(), SamplingConfig(steps=3))
    with pytest.raises(ValueError, match="noise must have shape"):
        sampler({"w": jnp.asarray(W)}, jnp.zeros((1, 2, 2, 3)), None, noise=jnp.zeros((2, 1, 2, 2, 3)))
