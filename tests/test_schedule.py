"""Schedules against closed forms and against diffusers' tables; timestep spacings."""
import math

import numpy as np
import pytest

from unclip_jax.diffusion import NoiseSchedule, make_betas, sampling_timesteps


def test_cosine_alphas_cumprod_closed_form():
    T = 1000
    acp = NoiseSchedule.named("cosine", T).alphas_cumprod
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    t = np.arange(T)
    closed = np.array([f(i + 1) / f(0) for i in t])
    # beta is capped at 0.999 only in the last steps; before that acp is exactly f(t+1)/f(0)
    unclipped = make_betas("cosine", T) < 0.999
    assert unclipped[:990].all() and not unclipped.all()
    np.testing.assert_allclose(acp[unclipped], closed[unclipped], rtol=1e-12)
    # where capped: betas are 0.999 exactly
    np.testing.assert_array_equal(make_betas("cosine", T)[~unclipped], 0.999)


def test_linear_alphas_cumprod_closed_form():
    T = 1000
    betas = np.linspace(1e-4, 0.02, T)
    acp = NoiseSchedule.named("linear", T).alphas_cumprod
    np.testing.assert_allclose(acp, np.exp(np.cumsum(np.log1p(-betas))), rtol=1e-12)
    assert acp[0] == pytest.approx(1 - 1e-4)


@pytest.mark.parametrize("name,kw", [("squaredcos_cap_v2", {}), ("linear", {})])
def test_schedule_matches_diffusers(name, kw):
    from diffusers import DDPMScheduler

    peer = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
    ours = NoiseSchedule.named(name, 1000)
    np.testing.assert_allclose(ours.betas, peer.betas.numpy(), rtol=2e-6, atol=1e-9)
    # diffusers accumulates the product in float32: relative error grows to ~1e-5 at t=999
    np.testing.assert_allclose(ours.alphas_cumprod, peer.alphas_cumprod.numpy(), rtol=5e-5)


def test_from_alphas_cumprod_round_trip():
    s = NoiseSchedule.named("cosine", 100)
    np.testing.assert_allclose(NoiseSchedule.from_alphas_cumprod(s.alphas_cumprod).betas,
                               s.betas, rtol=1e-10)


@pytest.mark.parametrize("spacing,peer_spacing", [("even", "linspace"), ("leading", "leading"),
                                                  ("trailing", "trailing")])
@pytest.mark.parametrize("n", [1, 7, 25, 50, 1000])
def test_spacings_match_diffusers(spacing, peer_spacing, n):
    from diffusers import DDPMScheduler

    if spacing == "even" and n == 1:
        # diffusers' linspace(0, T-1, 1) is [0]: one step from pure noise at t=0. We start a
        # one-step sampler at t=T-1 (the noise level of x_T) instead.
        assert list(sampling_timesteps(1000, 1, "even")) == [999]
        return
    peer = DDPMScheduler(num_train_timesteps=1000, timestep_spacing=peer_spacing)
    peer.set_timesteps(n)
    np.testing.assert_array_equal(sampling_timesteps(1000, n, spacing), peer.timesteps.numpy())


@pytest.mark.parametrize("n", [2, 6, 25, 64, 250])
def test_even_spacing_matches_unclip_scheduler(n):
    from diffusers import UnCLIPScheduler

    peer = UnCLIPScheduler()
    peer.set_timesteps(n)
    np.testing.assert_array_equal(sampling_timesteps(1000, n, "even"), peer.timesteps.numpy())


def test_ddim_spacing_is_adm_ddimN():
    # ADM: the integer stride i for which range(0, T, i) has exactly N elements
    ts = sampling_timesteps(1000, 50, "ddim")
    np.testing.assert_array_equal(ts, np.arange(0, 1000, 20)[::-1])
    with pytest.raises(ValueError, match="ddim spacing"):
        sampling_timesteps(1000, 333, "ddim")


def test_even_spacing_includes_both_ends_and_is_descending():
    ts = sampling_timesteps(1000, 64, "even")
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 64 and np.all(np.diff(ts) < 0)


@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, True])
def test_bad_step_counts(bad):
    with pytest.raises(ValueError, match="sampling steps"):
        sampling_timesteps(1000, bad)


def test_unknown_schedule_and_spacing():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        sampling_timesteps(1000, 10, "random")
