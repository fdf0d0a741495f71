"""Gaussian diffusion math against closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion
from unclip_jax.diffusion.gaussian import normal_kl, predict_x0_eps


@pytest.fixture(scope="module")
def diff():
    return GaussianDiffusion(DiffusionConfig(schedule="cosine", num_train_steps=1000))


@pytest.mark.parametrize("t", [0, 10, 500, 990])
def test_q_sample_moments(diff, t):
    # x_t | x0 ~ N(sqrt(abar) x0, (1 - abar) I): check mean and variance over 200k draws
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    noise = jax.random.normal(jax.random.key(t), (n, 1))
    xt = np.asarray(diff.q_sample(x0, jnp.full((n,), t), noise))
    a = diff.alphas_cumprod[t]
    se = math.sqrt((1 - a) / n)
    assert abs(xt.mean() - math.sqrt(a) * 0.7) < 5 * se
    assert xt.var() == pytest.approx(1 - a, rel=0.02)
    mean, var = diff.q_mean_variance(x0[:1], jnp.array([t]))
    np.testing.assert_allclose(float(mean[0, 0]), math.sqrt(a) * 0.7, rtol=1e-6)
    np.testing.assert_allclose(float(var[0, 0]), 1 - a, rtol=1e-5)


def test_posterior_is_bayes_rule(diff):
    # q(x_{t-1} | x_t, x0) ∝ N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) N(x_t; sqrt(a_t) x_{t-1}, b_t):
    # a product of Gaussians in x_{t-1}: precision = 1/(1 - abar_{t-1}) + a_t / b_t.
    rng = np.random.default_rng(0)
    ts = np.array([1, 5, 100, 600, 998])
    x0 = rng.normal(size=(len(ts), 3))
    xt = rng.normal(size=(len(ts), 3))
    mean, var, logvar = diff.q_posterior(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32),
                                         jnp.asarray(ts))
    b = diff.betas[ts][:, None]
    ap = diff.alphas_cumprod[ts - 1][:, None]
    prec = 1 / (1 - ap) + (1 - b) / b
    want_var = 1 / prec
    want_mean = want_var * (np.sqrt(ap) * x0 / (1 - ap) + np.sqrt(1 - b) * xt / b)
    np.testing.assert_allclose(np.asarray(var)[:, 0], want_var[:, 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logvar)[:, 0], np.log(want_var[:, 0]), rtol=1e-5)


def test_posterior_log_variance_clipped_at_t0(diff):
    assert diff.posterior_variance[0] == 0.0
    assert diff.posterior_log_variance_clipped[0] == pytest.approx(math.log(diff.posterior_variance[1]))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_parametrisations_are_consistent(prediction):
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(4, 5, 5, 3)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    t = jnp.array([0, 3, 400, 950])
    xt = d.q_sample(x0, t, noise)
    target = d.targets(x0, noise, t)
    a = d.alphas_cumprod[np.asarray(t)][:, None, None, None]
    x0_hat, eps_hat = predict_x0_eps(prediction, target, xt, jnp.float32(np.sqrt(a)),
                                     jnp.float32(np.sqrt(1 - a)))
    tol = dict(rtol=1e-3, atol=2e-3)  # eps -> x0 amplifies rounding by 1/sqrt(abar) at t=950
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), **tol)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(noise), **tol)


def test_v_target_closed_form():
    d = GaussianDiffusion(DiffusionConfig(prediction="v"))
    x0, noise, t = jnp.ones((1, 2)), 2 * jnp.ones((1, 2)), jnp.array([300])
    a = d.alphas_cumprod[300]
    np.testing.assert_allclose(np.asarray(d.targets(x0, noise, t)),
                               math.sqrt(a) * 2 - math.sqrt(1 - a), rtol=1e-5)


def test_mse_loss_and_p2_weighting(diff):
    x0 = jnp.zeros((2, 4))
    noise = jnp.ones((2, 4))
    t = jnp.array([10, 700])
    out = noise + 0.5  # error 0.5 everywhere -> mse 0.25
    loss, _ = diff.loss(out, x0, noise, t)
    np.testing.assert_allclose(np.asarray(loss), 0.25, rtol=1e-6)
    loss, _ = diff.loss(out, x0, noise, t, p2_gamma=1.0, p2_k=1.0)
    snr = diff.alphas_cumprod[[10, 700]] / (1 - diff.alphas_cumprod[[10, 700]])
    np.testing.assert_allclose(np.asarray(loss), 0.25 / (1 + snr), rtol=1e-5)


@pytest.mark.parametrize("prediction,factor", [
    ("eps", lambda snr, g: min(snr, g) / snr), ("x0", lambda snr, g: min(snr, g)),
    ("v", lambda snr, g: min(snr, g) / (snr + 1))])
def test_min_snr_weighting(prediction, factor):
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    t = jnp.array([5, 400, 900])
    x0, noise = jnp.zeros((3, 4)), jnp.ones((3, 4))
    out = d.targets(x0, noise, t) + 0.5
    loss, _ = d.loss(out, x0, noise, t, min_snr_gamma=5.0)
    snr = d.alphas_cumprod[[5, 400, 900]] / (1 - d.alphas_cumprod[[5, 400, 900]])
    want = [0.25 * factor(s, 5.0) for s in snr]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-4)
    # weight 1 where SNR <= gamma for eps, i.e. at high noise
    assert snr[2] < 5.0 and want[2] == pytest.approx(0.25) if prediction == "eps" else True


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
@pytest.mark.parametrize("gamma,floor", [(0.0, 1.0), (5.0, 1.0), (5.0, 0.0)])
def test_snr_weights_are_x0_space_weights(prediction, gamma, floor):
    """Weighted loss = clip(SNR, floor, gamma) x the squared error of the x0 the output implies
    (computed here through predict_x0_eps, not through the loss's own conversion table)."""
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    ts = [2, 300, 700, 990]
    t = jnp.array(ts)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 6)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    out = d.targets(x0, noise, t) + jnp.asarray(rng.normal(size=(4, 6)) * 0.3, jnp.float32)
    a = np.asarray(d.alphas_cumprod, np.float64)[ts]
    x_t = d.q_sample(x0, t, noise)
    x0_hat, _ = predict_x0_eps(prediction, np.asarray(out, np.float64), np.asarray(x_t, np.float64),
                               np.sqrt(a)[:, None], np.sqrt(1 - a)[:, None])
    x0_mse = np.mean((x0_hat - np.asarray(x0, np.float64)) ** 2, axis=1)
    snr = a / (1 - a)
    w = np.clip(snr, floor, gamma if gamma else np.inf)
    loss, _ = d.loss(out, x0, noise, t, min_snr_gamma=gamma, snr_floor=floor)
    np.testing.assert_allclose(np.asarray(loss), w * x0_mse, rtol=2e-3)
    if floor:  # the highest-noise step keeps weight `floor` (its SNR is far below it)
        assert snr[-1] < 1e-2 and w[-1] == floor


def test_edm_preconditioning_closed_forms():
    """prediction="edm" is Karras et al.'s preconditioning on x_t / sqrt(abar): c_skip(sigma) =
    sd^2 / (sigma^2 + sd^2), c_out(sigma) = sigma sd / sqrt(sigma^2 + sd^2), sigma^2 = 1 / SNR;
    sigma_data = 1 is v prediction (F = -v); the unweighted loss is EDM's lambda(sigma) =
    1 / sigma^2 + 1 / sd^2 times the squared error of x0."""
    from unclip_jax.diffusion.gaussian import edm_coefficients

    sd = 0.3
    d = GaussianDiffusion(DiffusionConfig(prediction="edm", sigma_data=sd))
    ts = np.array([1, 150, 500, 980])
    a = np.asarray(d.alphas_cumprod, np.float64)[ts]
    sigma = np.sqrt((1 - a) / a)
    c_skip, c_out = edm_coefficients(np.sqrt(a), np.sqrt(1 - a), sd)
    np.testing.assert_allclose(np.asarray(c_skip) * np.sqrt(a), sd ** 2 / (sigma ** 2 + sd ** 2),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c_out), sigma * sd / np.sqrt(sigma ** 2 + sd ** 2),
                               rtol=1e-6)
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 5)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    t = jnp.asarray(ts)
    v = GaussianDiffusion(DiffusionConfig(prediction="v"))
    d1 = GaussianDiffusion(DiffusionConfig(prediction="edm", sigma_data=1.0))
    np.testing.assert_allclose(np.asarray(d1.targets(x0, noise, t)),
                               -np.asarray(v.targets(x0, noise, t)), rtol=1e-4, atol=1e-5)
    out = d.targets(x0, noise, t) + jnp.asarray(rng.normal(size=(4, 5)) * 0.2, jnp.float32)
    x_t = np.asarray(d.q_sample(x0, t, noise), np.float64)
    x0_hat = (np.asarray(c_skip)[:, None] * x_t + np.asarray(c_out)[:, None]
              * np.asarray(out, np.float64))
    lam = 1 / sigma ** 2 + 1 / sd ** 2
    want = lam * np.mean((x0_hat - np.asarray(x0, np.float64)) ** 2, axis=1)
    loss, _ = d.loss(out, x0, noise, t)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=2e-3)
    with pytest.raises(ValueError, match="sigma_data"):
        DiffusionConfig(prediction="edm", sigma_data=0.0)


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    want = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + 0.25) / (2 * 2.0) - 0.5
    assert float(normal_kl(m1, lv1, m2, lv2)) == pytest.approx(want, rel=1e-6)


def test_learned_range_interpolates_log_variance():
    d = GaussianDiffusion(DiffusionConfig(variance="learned_range"))
    x = jnp.zeros((3, 2))
    t = jnp.array([50, 50, 50])
    v = jnp.array([[-1.0] * 2, [1.0] * 2, [0.0] * 2])
    out = jnp.concatenate([jnp.zeros((3, 2)), v], axis=-1)
    lv = np.asarray(d.p_mean_variance(out, x, t)["log_variance"])[:, 0]
    lo, hi = d.posterior_log_variance_clipped[50], math.log(d.betas[50])
    np.testing.assert_allclose(lv, [lo, hi, (lo + hi) / 2], rtol=1e-5)


def test_hybrid_loss_vlb_trains_only_the_variance():
    d = GaussianDiffusion(DiffusionConfig(variance="learned_range", num_train_steps=100))
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(-1, 1, size=(3, 4, 4, 3)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    t = jnp.array([0, 10, 99])
    out = jnp.asarray(rng.normal(size=x0.shape[:-1] + (6,)) * 0.1, jnp.float32)

    def vb_only(o):
        loss, aux = d.loss(o, x0, noise, t, loss_type="hybrid", vlb_weight=1e-3)
        return jnp.sum(loss - aux["mse"])

    g = np.asarray(jax.grad(vb_only)(out))
    assert np.all(g[..., :3] == 0) and np.any(g[..., 3:] != 0)
    loss, aux = d.loss(out, x0, noise, t, loss_type="hybrid", vlb_weight=1e-3)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(aux["mse"] + 0.1 * aux["vb"]), rtol=1e-6)
    assert np.all(np.asarray(aux["vb"]) > 0)


def test_vlb_is_zero_for_the_true_posterior():
    # When p(x_{t-1}|x_t) equals q(x_{t-1}|x_t, x0) the KL term vanishes.
    d = GaussianDiffusion(DiffusionConfig(prediction="x0", variance="learned_range",
                                          num_train_steps=100))
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.uniform(-1, 1, size=(2, 5)), jnp.float32)
    t = jnp.array([20, 60])
    xt = d.q_sample(x0, t, jnp.asarray(rng.normal(size=x0.shape), jnp.float32))
    # frac such that the interpolated log variance is the clipped posterior log variance: v = -1
    out = jnp.concatenate([x0, -jnp.ones_like(x0)], axis=-1)
    vb = np.asarray(d.vlb_terms(out, x0, xt, t, discrete=False))
    np.testing.assert_allclose(vb, 0.0, atol=1e-5)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="unknown variance type 'learned'"):
        DiffusionConfig(variance="learned")
    with pytest.raises(ValueError, match="unknown model prediction"):
        DiffusionConfig(prediction="score")
    with pytest.raises(ValueError, match="unknown noise schedule"):
        DiffusionConfig(schedule="sigmoid")
    with pytest.raises(ValueError, match="num_train_steps"):
        DiffusionConfig(num_train_steps=0)
    with pytest.raises(ValueError, match="hybrid loss needs a learned variance"):
        GaussianDiffusion(DiffusionConfig()).loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                                                  jnp.zeros((1, 2)), jnp.array([1]),
                                                  loss_type="hybrid")


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_timesteps_follow_their_cdf(diff, mean, std):
    """t = floor(T sigmoid(u)), u ~ N(mean, std^2): P(t < k) = Phi((logit(k / T) - mean) / std)."""
    t = np.asarray(diff.sample_timesteps(jax.random.key(0), 40000, mean, std))
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == np.int32
    ks = np.arange(50, 1000, 50)
    want = np.array([0.5 * (1 + math.erf((math.log(k / (1000 - k)) - mean) / (std * math.sqrt(2))))
                     for k in ks])
    got = np.array([np.mean(t < k) for k in ks])
    assert np.max(np.abs(got - want)) < 0.01, (got, want)
    u = np.asarray(diff.sample_timesteps(jax.random.key(1), 40000))  # std 0: uniform
    assert abs(np.mean(u < 250) - 0.25) < 0.01 and abs(np.mean(u) - 499.5) < 5
    with pytest.raises(ValueError, match="t_logit_std"):
        diff.sample_timesteps(jax.random.key(0), 4, 0.0, -1.0)
