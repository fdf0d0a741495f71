"""Prior transformer: parity with diffusers' PriorTransformer, normalisation, checkpoint errors."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert import diffusers_prior
from unclip_jax.convert.torch_io import CheckpointMismatchError
from unclip_jax.models import prior as prior_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    # Karlo's layout (defaults: no norm_in, no embedding-proj norm, linear text proj, prd token)
    "karlo_like": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16,
                       num_embeddings=7, additional_embeddings=4),
    # the other supported options switched on
    "options": dict(num_attention_heads=4, attention_head_dim=8, num_layers=3, embedding_dim=24,
                    num_embeddings=9, additional_embeddings=4, norm_in_type="layer",
                    embedding_proj_norm_type="layer", time_embed_dim=48, time_embed_act_fn="gelu"),
    # no learned query token: the output is read at the noised-image token
    "no_prd": dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=16,
                   num_embeddings=5, additional_embeddings=3, added_emb_type=None),
}


def _random_diffusers_prior(kwargs, seed=0):
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    model = PriorTransformer(**kwargs).eval()
    with torch.no_grad():  # zero/one-initialised tensors (pos emb, prd, norms, stats) made random
        for name, p in model.named_parameters():
            if name == "clip_std":
                p.copy_(0.5 + torch.rand_like(p))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _inputs(kwargs, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    d, L = kwargs["embedding_dim"], kwargs["num_embeddings"]
    x = rng.standard_normal((batch, d)).astype(np.float32)
    emb = rng.standard_normal((batch, d)).astype(np.float32)
    hid = rng.standard_normal((batch, L, d)).astype(np.float32)
    t = np.array([0, 17, 999][:batch], np.int64)
    lengths = [L, 4, 2][:batch]  # right padding, as the CLIP tokenizer gives
    mask = np.arange(L)[None, :] < np.array(lengths)[:, None]
    return x, t, emb, hid, mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_diffusers(name, tmp_path):
    from diffusers import UnCLIPScheduler

    kwargs = CONFIGS[name]
    model = _random_diffusers_prior(kwargs)
    model.save_pretrained(tmp_path / "prior")
    UnCLIPScheduler(clip_sample_range=5.0, prediction_type="sample",
                    variance_type="fixed_small_log").save_pretrained(tmp_path / "prior_scheduler")

    config, params = diffusers_prior.load_diffusers_prior(str(tmp_path))
    assert config.clip_x0 == 5.0 and config.embedding_norm == "meanstd"
    assert config.num_text_tokens == kwargs["num_embeddings"]
    assert prior_lib.PriorConfig.from_dict(config.to_dict()) == config

    x, t, emb, hid, mask = _inputs(kwargs)
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(emb),
                     encoder_hidden_states=torch.from_numpy(hid),
                     attention_mask=torch.from_numpy(mask)).predicted_image_embedding.numpy()
        want = want.reshape(want.shape[0], -1)  # [B, 1, D] without the prd token
        want_post = model.post_process_latents(torch.from_numpy(x)).numpy()

    net = prior_lib.PriorTransformer(config)
    variables = {"params": params}
    got = jax.jit(net.apply)(variables, x, t, emb, hid, mask)
    assert got.shape == want.shape == (3, kwargs["embedding_dim"])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 0.1  # a non-trivial output

    # the padded positions really matter: ignoring the mask changes the answer
    got_nomask = net.apply(variables, x, t, emb, hid, None)
    assert np.abs(np.asarray(got_nomask)[1:] - want[1:]).max() > 1e-3
    # text_mask=None means "all tokens real" (the causal mask still applies)
    full = np.ones_like(mask)
    np.testing.assert_allclose(np.asarray(got_nomask),
                               np.asarray(net.apply(variables, x, t, emb, hid, full)), atol=1e-6)

    # post-processing = diffusers' post_process_latents; normalisation inverts it
    post = net.apply(variables, x, method=prior_lib.PriorTransformer.denormalize)
    np.testing.assert_allclose(np.asarray(post), want_post, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(prior_lib.denormalize_embedding(x, config, params)), want_post, atol=1e-5)
    back = prior_lib.normalize_embedding(post, config, variables)
    np.testing.assert_allclose(np.asarray(back), x, atol=1e-4)


def test_init_matches_converted_tree():
    kwargs = CONFIGS["karlo_like"]
    config = diffusers_prior.prior_config_from_diffusers(_random_diffusers_prior(kwargs).config)
    x, t, emb, hid, mask = _inputs(kwargs, batch=2)
    variables = prior_lib.PriorTransformer(config).init(jax.random.PRNGKey(0), x, t, emb, hid, mask)
    params = nn.meta.unbox(variables)["params"]
    assert set(params) >= {"time_embedding", "proj_in", "embedding_proj", "positional_embedding",
                           "prd_embedding", "blocks_0", "blocks_1", "norm_out",
                           "proj_to_clip_embeddings", "clip_mean", "clip_std"}
    assert params["blocks_0"]["attn"]["to_q"]["dense"]["kernel"].shape == (16, 16)
    # the statistics start as the identity and are excluded from training
    np.testing.assert_array_equal(params["clip_mean"], 0.0)
    np.testing.assert_array_equal(params["clip_std"], 1.0)
    mask_tree = prior_lib.trainable_mask(params)
    assert mask_tree["clip_mean"] is False and mask_tree["clip_std"] is False
    assert mask_tree["proj_in"]["dense"]["kernel"] is True
    grads = jax.grad(lambda p: prior_lib.normalize_embedding(x, config, p).sum())(params)
    assert float(jnp.abs(grads["clip_mean"]).max()) == 0.0
    new = prior_lib.set_embedding_stats(params, np.full(16, 2.0), np.full(16, 4.0))
    np.testing.assert_allclose(prior_lib.normalize_embedding(np.full((1, 16), 6.0), config, new), 1.0)


@pytest.mark.parametrize("mode", ["scale", "l2", "none"])
def test_normalisation_round_trip(mode):
    d = 24
    config = prior_lib.PriorConfig(embedding_dim=d, num_layers=1, num_heads=2, head_dim=8,
                                   num_text_tokens=5, embedding_norm=mode, embedding_scale=17.2)
    x = np.random.default_rng(0).standard_normal((4, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)  # unit vectors: the default clip_norm is 1
    params = prior_lib.init_params(config, jax.random.key(0))
    z = prior_lib.normalize_embedding(x * 1.7 if mode != "none" else x, config)
    if mode == "l2":
        np.testing.assert_allclose(np.linalg.norm(z, axis=-1), np.sqrt(d), rtol=1e-5)
    if mode == "scale":
        np.testing.assert_allclose(z, x * 17.2, rtol=1e-5)
    np.testing.assert_allclose(prior_lib.denormalize_embedding(z, config, params), x, atol=1e-6)
    # only 'scale' / 'l2' hold a statistic (clip_norm, frozen); none has clip_mean/clip_std
    assert "clip_mean" not in params and "clip_std" not in params
    assert ("clip_norm" in params) == (mode != "none")


def _raw_clip_like(n=6, d=24, seed=0):
    """Embeddings at a raw CLIP-like scale: norms spread around 12, far from 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)
            * rng.uniform(8.0, 16.0, (n, 1))).astype(np.float32)


def test_scale_mode_scales_the_unit_vector_by_17_2():
    """The paper scales the L2-normalised CLIP image embedding: |normalize(x)| = 17.2 exactly,
    whatever |x|, in x's direction."""
    config = prior_lib.PriorConfig(embedding_dim=24, num_layers=1, num_heads=2, head_dim=8,
                                   num_text_tokens=5, embedding_norm="scale")
    x = _raw_clip_like()
    z = np.asarray(prior_lib.normalize_embedding(x, config), np.float64)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 17.2, rtol=1e-6)
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(z / 17.2, unit, atol=1e-6)


@pytest.mark.parametrize("mode", ["scale", "l2"])
def test_denormalize_returns_the_raw_clip_scale(mode):
    """The decoder is trained on raw CLIP image embeddings: the prior's output is handed over at
    the recorded mean norm of the training embeddings (clip_norm), in the sample's direction."""
    d = 24
    config = prior_lib.PriorConfig(embedding_dim=d, num_layers=1, num_heads=2, head_dim=8,
                                   num_text_tokens=5, embedding_norm=mode)
    x = _raw_clip_like(d=d)
    mean_norm = float(np.linalg.norm(x, axis=-1).mean())
    params = prior_lib.init_params(config, jax.random.key(0))
    np.testing.assert_array_equal(params["clip_norm"], np.ones((1, 1)))
    params = prior_lib.set_embedding_stats(params, norm=mean_norm)
    assert params["clip_norm"].shape == (1, 1)
    assert prior_lib.trainable_mask(params)["clip_norm"] is False  # a statistic, not a weight
    back = np.asarray(prior_lib.denormalize_embedding(
        prior_lib.normalize_embedding(x, config), config, {"params": params}), np.float64)
    np.testing.assert_allclose(np.linalg.norm(back, axis=-1), mean_norm, rtol=1e-5)
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(back / mean_norm, unit, atol=1e-5)
    # the model's methods read the same statistic
    net = prior_lib.PriorTransformer(config)
    z = np.asarray(prior_lib.normalize_embedding(x, config))
    np.testing.assert_allclose(
        np.asarray(net.apply({"params": params}, z, method=prior_lib.PriorTransformer.denormalize)),
        back, atol=1e-5)
    # it is frozen: no gradient reaches it through the normalisation
    g = jax.grad(lambda p: prior_lib.denormalize_embedding(z, config, p).sum())(params)
    assert float(jnp.abs(g["clip_norm"]).max()) == 0.0
    with pytest.raises(ValueError, match="clip_norm"):
        prior_lib.denormalize_embedding(z, config)  # without the statistic: an error, not a guess
    with pytest.raises(ValueError, match="positive"):
        prior_lib.set_embedding_stats(params, norm=0.0)


class _FakePriorStage:
    """post_init of the prior stage reading precomputed embeddings (no CLIP)."""

    @staticmethod
    def make(mode, stats_batches):
        import ml_collections

        from unclip_jax.stages.prior import PriorStage

        st = PriorStage.__new__(PriorStage)
        st.config = ml_collections.ConfigDict({"stats_batches": stats_batches})
        st.cfg = prior_lib.PriorConfig(embedding_dim=24, num_layers=1, num_heads=2, head_dim=8,
                                       num_text_tokens=5, embedding_norm=mode)
        st.from_embeddings = True
        return st


@pytest.mark.parametrize("mode", ["scale", "l2", "meanstd"])
def test_post_init_records_the_embedding_statistics(mode):
    batches = [_raw_clip_like(n=5, seed=s) for s in range(4)]
    st = _FakePriorStage.make(mode, stats_batches=3)
    params = prior_lib.init_params(st.cfg, jax.random.key(0))
    out = st.post_init(params, iter([({"image_embed": b}, 0) for b in batches]))
    e = np.concatenate(batches[:3]).astype(np.float64)  # the first stats_batches batches only
    if mode == "meanstd":  # Karlo's statistics, unchanged
        np.testing.assert_allclose(out["clip_mean"], e.mean(0)[None], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["clip_std"], e.std(0)[None] + 1e-6, rtol=1e-5)
        assert "clip_norm" not in out
    else:
        np.testing.assert_allclose(out["clip_norm"], [[np.linalg.norm(e, axis=-1).mean()]],
                                   rtol=1e-6)
        assert "clip_mean" not in out


def test_converted_prior_with_scale_norm_gets_a_clip_norm():
    model = _random_diffusers_prior(CONFIGS["karlo_like"])
    config = diffusers_prior.prior_config_from_diffusers(model.config, embedding_norm="scale")
    params = diffusers_prior.convert_prior(model.state_dict(), config)
    np.testing.assert_array_equal(params["clip_norm"], np.ones((1, 1)))
    assert "clip_mean" not in params


def test_wrong_size_checkpoint_raises():
    kwargs = CONFIGS["karlo_like"]
    model = _random_diffusers_prior(kwargs)
    config = diffusers_prior.prior_config_from_diffusers(model.config)
    sd = dict(model.state_dict())
    sd["transformer_blocks.1.attn1.to_k.weight"] = torch.zeros(16, 12)
    with pytest.raises(CheckpointMismatchError, match=r"transformer_blocks\.1\.attn1\.to_k\.weight"
                       r".*\(16, 12\).*blocks_1/attn/to_k/dense/kernel.*\(16, 16\)"):
        diffusers_prior.convert_prior(sd, config)
    # a checkpoint for a different width fails on the first mismatching tensor, naming it
    bigger = dataclasses.replace(config, embedding_dim=20)
    with pytest.raises(CheckpointMismatchError, match=r"\(16, 16\).*\(20, 16\)"):
        diffusers_prior.convert_prior(model.state_dict(), bigger)
    # a missing tensor is named too
    sd = dict(model.state_dict())
    del sd["norm_out.weight"]
    with pytest.raises(CheckpointMismatchError, match="norm_out.weight"):
        diffusers_prior.convert_prior(sd, config)


def test_config_validation():
    with pytest.raises(ValueError, match="norm_in_type"):
        prior_lib.PriorConfig(norm_in_type="group")
    with pytest.raises(ValueError, match="width"):
        prior_lib.PriorConfig(num_heads=2, head_dim=8, width=32)
    with pytest.raises(ValueError, match="additional_embeddings"):
        prior_lib.PriorConfig(added_emb_type=None, additional_embeddings=4)
    with pytest.raises(ValueError, match="embedding_norm"):
        prior_lib.PriorConfig(embedding_norm="zscore")
    c = prior_lib.PriorConfig()
    assert c.width == 2048 and c.seq_len == 81


def _prior_inputs(c, b=3, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    mask = jnp.arange(c.num_text_tokens)[None] < jnp.array([2, c.num_text_tokens, 4])[:b, None]
    return (jax.random.normal(ks[0], (b, c.embedding_dim)), jnp.array([0, 500, 999])[:b],
            jax.random.normal(ks[1], (b, c.text_embed_dim)),
            jax.random.normal(ks[2], (b, c.num_text_tokens, c.embedding_dim)), mask)


@pytest.mark.parametrize("kw", [dict(scan_layers=True), dict(remat=True),
                                dict(scan_layers=True, remat=True, remat_policy="dots")])
def test_scanned_and_rematerialised_blocks_compute_the_same(kw):
    """nn.scan over stacked block params and remat change memory and compile time, never the
    function: outputs and gradients equal the plain trunk's, and the param trees convert."""
    c = prior_lib.PriorConfig(embedding_dim=16, num_layers=3, num_heads=2, head_dim=8,
                              num_text_tokens=5)
    params = prior_lib.init_params(c, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(9), p.shape),
                          params)  # non-trivial norms / biases
    c2 = dataclasses.replace(c, **kw)
    p2 = prior_lib.stack_block_params(params, 3) if c2.scan_layers else params
    assert jax.tree.structure(prior_lib.init_params(c2)) == jax.tree.structure(p2)
    args = _prior_inputs(c)

    def loss(cfg, p):
        return jnp.sum(prior_lib.PriorTransformer(cfg).apply({"params": p}, *args, train=True) ** 2)

    np.testing.assert_allclose(prior_lib.PriorTransformer(c2).apply({"params": p2}, *args),
                               prior_lib.PriorTransformer(c).apply({"params": params}, *args),
                               atol=1e-5, rtol=1e-5)
    g_ref = jax.grad(lambda p: loss(c, p))(params)
    g = jax.grad(lambda p: loss(c2, p))(p2)
    if c2.scan_layers:
        g = prior_lib.unstack_block_params(g)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    if c2.scan_layers:
        back = prior_lib.unstack_block_params(p2)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                        jax.tree.leaves(params)))


def test_scanned_params_carry_a_layers_axis_name():
    c = prior_lib.PriorConfig(embedding_dim=16, num_layers=3, num_heads=2, head_dim=8,
                              num_text_tokens=5, scan_layers=True)
    boxed = jax.eval_shape(prior_lib.PriorTransformer(c).init, jax.random.key(0),
                           *_prior_inputs(c))["params"]
    k = boxed["blocks"]["attn"]["to_q"]["dense"]["kernel"]
    assert k.names == ("layers", "embed", "heads") and k.value.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="remat_policy"):
        prior_lib.PriorConfig(remat_policy="sometimes")
