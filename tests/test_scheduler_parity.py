"""Step parity with diffusers' schedulers: same model outputs, same noise, float32, <= 1e-5.

The model is a fixed smooth function implemented in both frameworks; our sampler runs its one
jitted scan, diffusers runs its Python loop of `scheduler.step`. Our schedule is built from the
peer's float32 `betas` and `alphas_cumprod` tables so that the comparison measures the step math (the schedules
themselves are compared in test_schedule.py).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unclip_jax.diffusion import (
    DiffusionConfig, GaussianDiffusion, NoiseSchedule, Sampler, SamplingConfig)

C = 3
SHAPE = (2, C, 5, 5)  # NCHW for diffusers; ours is NHWC
WM = np.array([0.9, -0.6, 0.4], np.float32)
WV = np.array([1.5, -0.5, 0.8], np.float32)


def torch_model(x, t, learned):
    w = torch.from_numpy(WM).view(1, C, 1, 1)
    out = torch.tanh(x * w + float(t) / 1000.0) * 0.8
    if learned:
        v = torch.tanh(x * torch.from_numpy(WV).view(1, C, 1, 1) - float(t) / 700.0)
        out = torch.cat([out, v], dim=1)
    return out


def jax_model(learned):
    def model(params, x, t, cond):
        tt = (t.astype(jnp.float32) / 1000.0).reshape(-1, 1, 1, 1)
        out = jnp.tanh(x * jnp.asarray(WM) + tt) * 0.8
        if learned:
            v = jnp.tanh(x * jnp.asarray(WV) - (t.astype(jnp.float32) / 700.0).reshape(-1, 1, 1, 1))
            out = jnp.concatenate([out, v], axis=-1)
        return out
    return model


def nchw_to_nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def peer_noise(timesteps, seed, always=False):
    """The noise diffusers draws: one randn per step with t > 0 (or every step), in order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in timesteps:
        if always or int(t) > 0:
            out.append(nchw_to_nhwc(torch.randn(SHAPE, generator=g)))
        else:
            out.append(np.zeros(SHAPE[:1] + SHAPE[2:] + SHAPE[1:2], np.float32))
    return np.stack(out)


def run_ours(peer, dcfg, scfg, x_T, noise, learned):
    diff = GaussianDiffusion(dcfg, NoiseSchedule(peer.betas.numpy(), peer.alphas_cumprod.numpy()))
    sampler = Sampler(jax_model(learned), diff, scfg)
    return np.asarray(sampler({}, jnp.asarray(nchw_to_nhwc(x_T)), None, noise=jnp.asarray(noise)))


def x_T_of(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "linear"])
@pytest.mark.parametrize("prediction,variance,steps", [
    ("epsilon", "fixed_small", 25), ("sample", "fixed_small_log", 10),
    ("v_prediction", "fixed_large", 20), ("epsilon", "learned_range", 16)])
def test_ddpm_scheduler_parity(schedule, prediction, variance, steps):
    from diffusers import DDPMScheduler

    peer = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, variance_type=variance,
                         prediction_type=prediction, clip_sample=True, clip_sample_range=1.0,
                         timestep_spacing="leading")
    peer.set_timesteps(steps)
    learned = variance == "learned_range"
    x = x_T_of(1)
    x_T = x.clone()
    g = torch.Generator().manual_seed(2)
    for t in peer.timesteps:
        x = peer.step(torch_model(x, t, learned), t, x, generator=g).prev_sample
    noise = peer_noise(peer.timesteps, 2)
    ours = run_ours(peer, DiffusionConfig(schedule=schedule, prediction=prediction,
                                          variance=variance),
                    SamplingConfig(method="ddpm", steps=steps, spacing="leading", clip_x0=1.0),
                    x_T, noise, learned)
    np.testing.assert_allclose(ours, nchw_to_nhwc(x.numpy()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 1)])
@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_ddpm_last_step_at_t_above_zero_adds_no_noise(spacing, offset, variance, monkeypatch):
    """With trailing or offset spacing the last timestep is > 0. diffusers' DDPMScheduler still
    adds noise there (its test is `t > 0`: std sqrt(beta_t) for fixed_large, the learned one for
    learned_range); ours ends every run on the posterior mean. Ours equals diffusers' run with
    the same noise at every step but the last, whose noise is zeroed."""
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    peer = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         variance_type=variance, prediction_type="epsilon", clip_sample=True,
                         clip_sample_range=1.0, timestep_spacing=spacing, steps_offset=offset)
    peer.set_timesteps(7)
    ts = peer.timesteps
    assert int(ts[-1]) > 0
    learned = variance == "learned_range"
    x = x_T_of(7)
    x_T = x.clone()
    g = torch.Generator().manual_seed(8)
    for t in ts[:-1]:
        x = peer.step(torch_model(x, t, learned), t, x, generator=g).prev_sample
    t = ts[-1]
    noisy = peer.step(torch_model(x, t, learned), t, x, generator=g).prev_sample  # diffusers
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                        lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    mean = peer.step(torch_model(x, t, learned), t, x, generator=g).prev_sample
    noise = peer_noise(ts, 8)
    ours = run_ours(peer, DiffusionConfig(schedule="cosine", prediction="eps", variance=variance),
                    SamplingConfig(method="ddpm", steps=7, spacing=spacing, offset=offset,
                                   clip_x0=1.0), x_T, noise, learned)
    np.testing.assert_allclose(ours, nchw_to_nhwc(mean.numpy()), atol=1e-5, rtol=0)
    assert np.abs(nchw_to_nhwc(noisy.numpy()) - ours).max() > 1e-3  # diffusers' last-step noise


@pytest.mark.parametrize("prediction,eta,steps,clip", [
    ("epsilon", 0.0, 25, True), ("epsilon", 0.5, 15, True), ("sample", 1.0, 10, False),
    ("v_prediction", 0.3, 20, True)])
def test_ddim_scheduler_parity(prediction, eta, steps, clip):
    from diffusers import DDIMScheduler

    peer = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction, clip_sample=clip, set_alpha_to_one=True,
                         timestep_spacing="leading")
    peer.set_timesteps(steps)
    x = x_T_of(3)
    x_T = x.clone()
    noise = peer_noise(peer.timesteps, 4, always=True)
    for i, t in enumerate(peer.timesteps):
        vn = torch.from_numpy(noise[i].transpose(0, 3, 1, 2).copy())
        x = peer.step(torch_model(x, t, False), t, x, eta=eta, variance_noise=vn).prev_sample
    ours = run_ours(peer, DiffusionConfig(schedule="cosine", prediction=prediction),
                    SamplingConfig(method="ddim", steps=steps, spacing="leading", eta=eta,
                                   clip_x0=1.0 if clip else None, recompute_eps=False),
                    x_T, noise, False)
    np.testing.assert_allclose(ours, nchw_to_nhwc(x.numpy()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variance,prediction,clip_range,steps", [
    ("fixed_small_log", "sample", 5.0, 25),   # Karlo's prior
    ("fixed_small_log", "sample", 1.0, 7),
    ("learned_range", "epsilon", 1.0, 25),    # Karlo's decoder
    ("learned_range", "epsilon", 1.0, 6),
])
def test_unclip_scheduler_parity(variance, prediction, clip_range, steps):
    from diffusers import UnCLIPScheduler

    peer = UnCLIPScheduler(variance_type=variance, prediction_type=prediction, clip_sample=True,
                           clip_sample_range=clip_range)
    peer.set_timesteps(steps)
    learned = variance == "learned_range"
    x = x_T_of(5)
    x_T = x.clone()
    g = torch.Generator().manual_seed(6)
    ts = peer.timesteps
    for i, t in enumerate(ts):  # as UnCLIPPipeline calls it
        prev = None if i + 1 == len(ts) else ts[i + 1]
        x = peer.step(torch_model(x, t, learned), t, x, prev_timestep=prev, generator=g).prev_sample
    noise = peer_noise(ts, 6)
    dcfg = DiffusionConfig(schedule="cosine", prediction=prediction, variance=variance)
    scfg = SamplingConfig(method="ddpm", steps=steps, spacing="even", clip_x0=clip_range,
                          coefficient_dtype="float32")
    ours = run_ours(peer, dcfg, scfg, x_T, noise, learned)
    np.testing.assert_allclose(ours, nchw_to_nhwc(x.numpy()), atol=1e-5, rtol=0)
    # Our default computes the coefficients in float64. It differs from diffusers only through
    # diffusers' float32 cancellation in alpha = 1 - (1 - abar_t / abar_prev) at the first step.
    exact = run_ours(peer, dcfg, dataclasses.replace(scfg, coefficient_dtype="float64"), x_T,
                     noise, learned)
    assert np.abs(exact - ours).max() < 2e-3


def test_unclip_first_step_coefficient_is_exact_in_float64():
    from diffusers import UnCLIPScheduler

    from unclip_jax.diffusion import build_plan

    peer = UnCLIPScheduler()
    diff = GaussianDiffusion(DiffusionConfig(),
                             NoiseSchedule.from_alphas_cumprod(peer.alphas_cumprod.numpy()))
    a = diff.alphas_cumprod
    r = a[999] / a[957]  # tiny: the first step of 25
    exact = np.sqrt(r) * (1 - a[957]) / (1 - a[999])
    ours = build_plan(diff, SamplingConfig(steps=25)).c_x[0]
    peer32 = build_plan(diff, SamplingConfig(steps=25, coefficient_dtype="float32")).c_x[0]
    assert ours == pytest.approx(exact, rel=1e-6)
    assert abs(peer32 - exact) / exact > 0.01  # what float32 cancellation costs diffusers


@pytest.mark.parametrize("ratio,max_value", [(0.9, 1.5), (0.995, 3.0)])
def test_dynamic_thresholding_parity(ratio, max_value):
    from diffusers import DDPMScheduler

    peer = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                         sample_max_value=max_value)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)) * 2.0
    want = nchw_to_nhwc(peer._threshold_sample(x).numpy())
    from unclip_jax.diffusion.gaussian import dynamic_threshold

    got = np.asarray(dynamic_threshold(jnp.asarray(nchw_to_nhwc(x.numpy())), ratio, max_value))
    np.testing.assert_allclose(got, want, atol=1e-6)
