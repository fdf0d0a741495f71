"""The autoregressive prior (paper section 2.2): the PCA + quantisation codebook against its
analytic error bound, the KV-cache sampler against the cache-free reference token for token,
guidance, scanned == unscanned layers, overfitting one batch, the paper's size compiled sharded
over 8 virtual devices (abstractly), and bad input."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from unclip_jax.models import ar_codes
from unclip_jax.models import ar_prior as ar
from unclip_jax.train.sharding import batch_sharding, get_rules, logical_shardings, make_mesh
from unclip_jax.train.state import opt_state_shardings

# ---------------------------------------------------------------------------------------------
# codebook

RANK_STD = np.array([4.0, 3.0, 2.0, 1.0])  # variances 16 + 9 + 4 + 1 = 30 in 4 directions
NOISE = 0.01                              # isotropic noise: 16 * 1e-4 of variance in all 16


def _low_rank(n=400, e=16, seed=0):
    """Embeddings with a known rank-4 structure + small noise, and noisy 'text' partners."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(e, e)))[0][:, :4].T  # [4, E] orthonormal
    mean = rng.normal(size=e) * 3
    x = mean + (rng.normal(size=(n, 4)) * RANK_STD) @ basis + NOISE * rng.normal(size=(n, e))
    t = x + 2.0 * rng.normal(size=(n, e))
    return x, t, basis


@pytest.fixture(scope="module")
def fitted():
    x, t, basis = _low_rank()
    return x, t, basis, ar_codes.fit_codebook(x, t, num_buckets=16, num_dot_buckets=8)


def test_codebook_pca_and_quantisation_round_trip_within_bound(fitted):
    x, _, basis, cb = fitted
    # 3 components hold 29/30 < 99% of the variance, 4 hold 30/30.0016: K = 4
    assert cb.num_components == 4 and cb.num_buckets == 16 and cb.embed_dim == 16
    np.testing.assert_allclose(cb.components @ cb.components.T, np.eye(4), atol=1e-12)
    # the kept subspace is the planted one; explained fractions decrease and sum to ~1
    np.testing.assert_allclose(np.linalg.svd(cb.components @ basis.T)[1], 1.0, atol=1e-4)
    assert np.all(np.diff(cb.explained) < 0) and 0.999 < cb.explained.sum() <= 1.0
    np.testing.assert_allclose(cb.explained, RANK_STD ** 2 / 30.0, rtol=0.15)
    assert np.all(np.diff(cb.edges, axis=1) > 0)  # strictly increasing: searchsorted well defined
    proj = (x - cb.mean) @ cb.components.T
    np.testing.assert_allclose(cb.edges[:, 0], proj.min(0), atol=1e-12)
    np.testing.assert_allclose(cb.edges[:, -1], proj.max(0), atol=1e-12)

    codes = cb.encode(x)
    assert codes.dtype == np.int32 and codes.shape == (400, 4)
    assert codes.min() == 0 and codes.max() == 15
    # equal-mass buckets: every bucket of every component holds 400 / 16 = 25 examples (+-1)
    counts = np.stack([np.bincount(codes[:, k], minlength=16) for k in range(4)])
    assert counts.min() >= 24 and counts.max() <= 26, counts
    _assert_in_buckets(cb, proj, codes)
    err = np.linalg.norm(cb.decode(codes) - x, axis=-1)
    bound = cb.bound(x)
    assert np.all(err <= bound + 1e-6), float((err - bound).max())
    assert err.mean() > 0.4 * bound.mean(), (err.mean(), bound.mean())  # tight: ~0.59 here
    # out-of-range values go to the end buckets, and the bound still holds there
    far = cb.mean + 100.0 * cb.components[:2].sum(0) * np.array([[1.0], [-1.0]])
    np.testing.assert_array_equal(cb.encode(far)[:, :2], [[15, 15], [0, 0]])
    assert np.all(np.linalg.norm(cb.decode(cb.encode(far)) - far, axis=-1) <= cb.bound(far) + 1e-6)

    # jax arrays: the same transform inside jit (float32)
    codes_j = jax.jit(cb.encode)(jnp.asarray(x, jnp.float32))
    assert codes_j.dtype == jnp.int32
    assert np.mean(np.asarray(codes_j) == codes) > 0.99  # float32 vs float64 at bucket edges
    dec_j = jax.jit(cb.decode)(jnp.asarray(codes))
    np.testing.assert_allclose(dec_j, cb.decode(codes), atol=1e-4)


def _assert_in_buckets(cb, proj, codes):
    """Bucket j of component k is [edges[k, j], edges[k, j + 1]) (the last one closed)."""
    k = np.arange(cb.num_components)
    lo, hi = cb.edges[k, codes], cb.edges[k, codes + 1]
    last = codes == cb.num_buckets - 1
    assert np.all(lo <= proj) and np.all((proj < hi) | (last & (proj <= hi)))


def test_codebook_tied_values_get_strictly_increasing_edges(fitted):
    x, t, _, _ = fitted
    x, t = np.repeat(x[:20], 20, axis=0), np.repeat(t[:20], 20, axis=0)  # 20 values, 20 times
    cb = ar_codes.fit_codebook(x, t, num_components=4, num_buckets=64, num_dot_buckets=64)
    assert np.all(np.diff(cb.edges, axis=1) > 0) and np.all(np.diff(cb.dot_edges) > 0)
    proj = (x - cb.mean) @ cb.components.T
    codes = cb.encode(x)
    _assert_in_buckets(cb, proj, codes)  # values exactly on a (tied) edge go to its bucket
    assert np.all(np.linalg.norm(cb.decode(codes) - x, axis=-1) <= cb.bound(x) + 1e-6)


def test_codebook_fine_buckets_error_approaches_residual(fitted):
    x, t, _, _ = fitted
    cb = ar_codes.fit_codebook(x, t, num_buckets=20000, num_dot_buckets=8)
    p = (x - cb.mean) @ cb.components.T
    resid = np.linalg.norm(x - cb.mean - p @ cb.components, axis=-1)
    err = np.linalg.norm(cb.decode(cb.encode(x)) - x, axis=-1)
    assert np.all(err >= resid - 1e-9)
    # the quantisation error (in quadrature with the residual) vanishes; the sparse tails of the
    # projections keep their buckets widest
    assert np.mean(err) < 1.01 * np.mean(resid), (np.mean(err), np.mean(resid))
    assert np.max(err - resid) < 5e-3, np.max(err - resid)
    coarse = ar_codes.fit_codebook(x, t, num_components=4, num_buckets=4, num_dot_buckets=8)
    assert np.mean(np.linalg.norm(coarse.decode(coarse.encode(x)) - x, axis=-1)) > 10 * err.mean()


def test_codebook_dot_buckets(fitted):
    x, t, _, cb = fitted
    cos = ar_codes.cosine(x, t)
    d = cb.encode_dot(cos)
    assert d.dtype == np.int32 and d.shape == (400,)
    assert np.abs(np.bincount(d, minlength=8) - 50).max() <= 1  # equal mass: 400 / 8 each
    assert cb.dot_bucket_at(0.0) == 0 and cb.dot_bucket_at(0.5) == 4 and cb.dot_bucket_at(1.0) == 7
    # the bucket at quantile q holds the training dot products near that quantile
    assert np.median(cos[d == cb.dot_bucket_at(0.75)]) > np.median(cos)
    np.testing.assert_array_equal(jax.jit(cb.encode_dot)(jnp.asarray(cos, jnp.float32)), d)


def test_codebook_save_load_and_bad_files(fitted, tmp_path):
    cb = fitted[3]
    path = tmp_path / "codebook.npz"
    cb.save(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codebook.npz"]  # no temporary left
    back = ar_codes.Codebook.load(str(path))
    for k, v in cb.arrays().items():
        np.testing.assert_array_equal(getattr(back, k), v)
    x = fitted[0]
    np.testing.assert_array_equal(back.encode(x), cb.encode(x))

    raw = path.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable AR-prior codebook"):
        ar_codes.Codebook.load(str(tmp_path / "truncated.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a codebook at all" * 10)
    with pytest.raises(ValueError, match="not a readable AR-prior codebook"):
        ar_codes.Codebook.load(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not an AR-prior codebook"):
        ar_codes.Codebook.load(str(tmp_path / "other.npz"))
    arrays = cb.arrays()
    arrays["centers"] = arrays["centers"][:, :-1]  # inconsistent shapes behind a valid marker
    with open(tmp_path / "bad_shapes.npz", "wb") as f:
        np.savez(f, format=np.array(ar_codes.FORMAT), **arrays)
    with pytest.raises(ValueError, match="corrupt AR-prior codebook.*centers"):
        ar_codes.Codebook.load(str(tmp_path / "bad_shapes.npz"))
    with pytest.raises(FileNotFoundError):
        ar_codes.Codebook.load(str(tmp_path / "missing.npz"))


def test_codebook_bad_input(fitted):
    x, t, _, cb = fitted
    with pytest.raises(ValueError, match="at least 2 examples"):
        ar_codes.fit_codebook(x[:1], t[:1])
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ar_codes.fit_codebook(bad, t)
    with pytest.raises(ValueError, match="400 examples but text_embeds has 399"):
        ar_codes.fit_codebook(x, t[:-1])
    with pytest.raises(ValueError, match="text_embeds have width 12 but image_embeds have width 16"):
        ar_codes.fit_codebook(x, t[:, :12])
    for v in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="variance must be in"):
            ar_codes.fit_codebook(x, t, variance=v)
    with pytest.raises(ValueError, match="num_buckets must be an integer >= 2"):
        ar_codes.fit_codebook(x, t, num_buckets=1)
    with pytest.raises(ValueError, match="num_components must be an integer in"):
        ar_codes.fit_codebook(x, t, num_components=17)
    # a codebook applied to embeddings / codes of another width
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 16\]"):
        cb.encode(np.zeros((2, 12)))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 16\]"):
        cb.bound(np.zeros((2, 12)))
    with pytest.raises(ValueError, match=r"codes must be \[\.\.\., 4\]"):
        cb.decode(np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        cb.decode(np.full((2, 4), 16))
    with pytest.raises(ValueError, match="quantile must be in"):
        cb.dot_bucket_at(1.5)


# ---------------------------------------------------------------------------------------------
# the transformer and its samplers

TINY = ar.ARPriorConfig(num_components=7, num_buckets=16, num_dot_buckets=8, embedding_dim=12,
                        text_width=10, num_text_tokens=5, num_layers=2, num_heads=2, head_dim=8)
B = 4
DOT = np.array([1, 4, 6, 0])


def _random_params(c, seed=0, head_gain=3.0):
    """Random params filled in numpy from the abstract tree (no init program to compile):
    kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.5^2), non-trivial LayerNorm scales and biases;
    ``head_gain`` makes the softmax peaky-ish (most mass on a few buckets, not deterministic)."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path[-1].key
        if name == "kernel":
            v = rng.normal(size=x.shape) / np.sqrt(x.shape[-2])
            if path[0].key == "head":
                v = v * head_gain
        elif name == "scale":
            v = 1.0 + 0.1 * rng.normal(size=x.shape)
        elif name == "bias":
            v = 0.05 * rng.normal(size=x.shape)
        else:
            v = 0.5 * rng.normal(size=x.shape)
        return jnp.asarray(v, x.dtype)

    return jax.tree_util.tree_map_with_path(fill, ar.init_params(c))


@pytest.fixture(scope="module")
def tiny_params():
    return _random_params(TINY)


def _cond(seed, pad=False, b=B, c=TINY):
    r = np.random.default_rng(seed)
    mask = np.ones((b, c.num_text_tokens), bool)
    if pad:  # padded captions: the last tokens of rows 0 and 2 are padding
        mask[0, 2:] = False
        mask[2, 4:] = False
    return {"text_embed": r.normal(size=(b, c.embedding_dim)).astype(np.float32),
            "text_hidden": r.normal(size=(b, c.num_text_tokens, c.text_width)).astype(np.float32),
            "text_mask": mask}


def _forward(c, params, codes, cond, dot=DOT):
    """Teacher-forced logits as numpy (the tests' arithmetic stays in numpy: no eager jax ops
    to compile one by one)."""
    return np.asarray(ar.logits_fn(c)(params, jnp.asarray(codes), jnp.asarray(dot),
                                      cond["text_embed"], cond["text_hidden"], cond["text_mask"]))


@pytest.mark.parametrize("case", ["unguided", "guided_top_k", "padded"])
def test_cached_sample_equals_reference(tiny_params, case):
    cond, uncond, kw = _cond(1), None, {}
    if case == "guided_top_k":
        uncond, kw = _cond(2), dict(guidance_scale=3.0, temperature=0.7, top_k=5)
    if case == "padded":
        cond = _cond(1, pad=True)
    rng = jax.random.key(11)
    got = ar.sample(TINY, tiny_params, cond, uncond, dot=DOT, rng=rng, **kw)
    want = ar.sample_reference(TINY, tiny_params, cond, uncond, dot=DOT, rng=rng, **kw)
    assert got.dtype == jnp.int32 and got.shape == (B, TINY.num_components)
    np.testing.assert_array_equal(got, want)
    # not vacuous: the codes vary, and another rng draws other codes
    assert len(np.unique(np.asarray(got))) >= 5
    other = ar.sample(TINY, tiny_params, cond, uncond, dot=DOT, rng=jax.random.key(12), **kw)
    assert not np.array_equal(other, got)
    if case == "unguided":  # code k ~ categorical(fold_in(rng, k), logits of code k), rederived
        full = _forward(TINY, tiny_params, got, cond)
        redraw = jax.jit(lambda r, f: jnp.stack(
            [jax.random.categorical(jax.random.fold_in(r, k), f[:, k])
             for k in range(TINY.num_components)], 1))
        np.testing.assert_array_equal(redraw(rng, full), got)
    if case == "guided_top_k":
        # every code is among the 5 largest of uncond + 3 (cond - uncond), where both logits are
        # teacher-forced on the sampled codes (so the uncond rows were fed the same codes)
        lc, lu = _forward(TINY, tiny_params, got, cond), _forward(TINY, tiny_params, got, uncond)
        guided = np.asarray(lu + 3.0 * (lc - lu))
        rank = (guided > np.take_along_axis(guided, np.asarray(got)[..., None], -1)).sum(-1)
        assert rank.max() < 5 and rank.max() > 0, rank
        plain = ar.sample(TINY, tiny_params, cond, dot=DOT, rng=rng, **kw)
        assert not np.array_equal(plain, got)  # guidance changes the draw
    if case == "padded":  # padding tokens are hidden: their encodings do not matter...
        noisy = dict(cond, text_hidden=np.where(cond["text_mask"][..., None], cond["text_hidden"],
                                                100.0).astype(np.float32))
        np.testing.assert_array_equal(ar.sample(TINY, tiny_params, noisy, dot=DOT, rng=rng), got)
        # ...while the same encodings as real tokens do
        unmasked = dict(noisy, text_mask=np.ones_like(cond["text_mask"]))
        assert not np.array_equal(ar.sample(TINY, tiny_params, unmasked, dot=DOT, rng=rng), got)


def test_cached_logits_equal_teacher_forced(tiny_params):
    """The KV-cache passes' logits at every step equal __call__'s teacher-forced logits on the
    sampled codes (a finer check than equal codes), padding included."""
    cond = _cond(3, pad=True)
    codes, logits = ar.sample(TINY, tiny_params, cond, dot=DOT, rng=jax.random.key(0),
                              return_logits=True)
    full = _forward(TINY, tiny_params, codes, cond)
    assert logits.shape == full.shape == (B, TINY.num_components, TINY.num_buckets)
    np.testing.assert_allclose(logits, full, atol=2e-5, rtol=2e-5)
    assert float(np.std(full)) > 1.0  # the peaky-ish head: not a flat distribution
    # the distributions are peaky but not deterministic
    e = np.exp(full - full.max(-1, keepdims=True))
    p_max = (e / e.sum(-1, keepdims=True)).max(-1)
    assert 0.3 < float(p_max.mean()) < 0.95, float(p_max.mean())


def test_top_k_one_is_greedy(tiny_params):
    cond = _cond(3)
    got = ar.sample(TINY, tiny_params, cond, dot=DOT, rng=jax.random.key(0), top_k=1)
    again = ar.sample(TINY, tiny_params, cond, dot=DOT, rng=jax.random.key(5), top_k=1)
    np.testing.assert_array_equal(got, again)  # top-1 is argmax whatever the rng
    np.testing.assert_array_equal(np.argmax(_forward(TINY, tiny_params, got, cond), -1), got)
    cold = ar.sample(TINY, tiny_params, cond, dot=DOT, rng=jax.random.key(5), temperature=1e-4)
    np.testing.assert_array_equal(cold, got)  # temperature -> 0 is greedy too
    # and guided greedy decoding follows argmax(uncond + s (cond - uncond)) step by step
    uncond = _cond(9)
    g = ar.sample(TINY, tiny_params, cond, uncond, dot=DOT, rng=jax.random.key(0), top_k=1,
                  guidance_scale=2.5)
    lc, lu = _forward(TINY, tiny_params, g, cond), _forward(TINY, tiny_params, g, uncond)
    np.testing.assert_array_equal(np.argmax(lu + 2.5 * (lc - lu), -1), g)
    assert not np.array_equal(g, got)


def test_guidance_scale_one_equals_unguided(tiny_params):
    cond, uncond, rng = _cond(4), _cond(5), jax.random.key(3)
    kw = dict(dot=DOT, rng=rng, temperature=0.9, top_k=8)
    plain = ar.sample(TINY, tiny_params, cond, **kw)
    np.testing.assert_array_equal(
        ar.sample(TINY, tiny_params, cond, uncond, guidance_scale=1.0, **kw), plain)
    np.testing.assert_array_equal(
        ar.sample_reference(TINY, tiny_params, cond, uncond, guidance_scale=1.0, **kw), plain)
    guided = ar.sample(TINY, tiny_params, cond, uncond, guidance_scale=4.0, **kw)
    assert not np.array_equal(guided, plain)


def test_scan_layers_equals_unscanned(tiny_params):
    scanned = dataclasses.replace(TINY, scan_layers=True)
    stacked = ar.stack_block_params(tiny_params, TINY.num_layers)
    assert jax.tree.structure(ar.init_params(scanned)) == jax.tree.structure(stacked)
    cond, rng = _cond(6, pad=True), jax.random.key(8)
    codes = ar.sample(TINY, tiny_params, cond, dot=DOT, rng=rng)
    np.testing.assert_allclose(_forward(scanned, stacked, codes, cond),
                               _forward(TINY, tiny_params, codes, cond), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(ar.sample(scanned, stacked, cond, dot=DOT, rng=rng), codes)
    back = ar.unstack_block_params(stacked)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                    jax.tree.leaves(tiny_params)))


def test_overfits_one_batch():
    c = TINY
    params = _random_params(c, seed=1, head_gain=1.0)
    r = np.random.default_rng(0)
    codes = jnp.asarray(r.integers(0, c.num_buckets, (B, c.num_components)))
    cond = _cond(7)
    batch = (codes, jnp.asarray(DOT), cond["text_embed"], cond["text_hidden"], cond["text_mask"])
    tx = optax.adam(1e-2)
    model = ar.ARPrior(c)

    def loss(p):
        ce, acc = ar.loss_fn(model.apply({"params": p}, *batch, train=True), batch[0])
        return ce.mean(), acc.mean()

    @jax.jit
    def steps(p, s):
        def one(carry, _):
            p, s = carry
            (l, acc), g = jax.value_and_grad(loss, has_aux=True)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), (l, acc)
        (p, s), (l, acc) = jax.lax.scan(one, (p, s), None, length=300)
        return p, s, l, acc

    params, _, l, acc = steps(params, tx.init(params))
    assert float(l[0]) > 0.8 * np.log(c.num_buckets)  # starts near chance
    assert float(l[-1]) < 0.05 and float(acc[-1]) == 1.0, (float(l[-1]), float(acc[-1]))
    # and the cached sampler reproduces the memorised codes greedily
    np.testing.assert_array_equal(
        ar.sample(c, params, cond, dot=DOT, rng=jax.random.key(0), top_k=1), codes)


def test_paper_size_compiles_sharded_fsdp():
    """The paper's AR prior (319 codes x 1,024 buckets, 24 layers of width 2048) with Adam, on a
    data 2 x fsdp 4 mesh of the 8 virtual devices: lowered and compiled from abstract values only
    (nothing of paper size is allocated); the large kernels are sharded over 'fsdp'."""
    c = ar.ARPriorConfig(num_components=319, num_buckets=1024, num_dot_buckets=1024,
                         embedding_dim=768, text_width=768, num_text_tokens=77, num_layers=24,
                         num_heads=32, head_dim=64, scan_layers=True, remat=True,
                         dtype="bfloat16")
    assert c.width == 2048 and c.seq_len == 397
    mesh = make_mesh({"data": 2, "fsdp": 4})
    rules = get_rules("fsdp")
    boxed = ar.abstract_boxed_params(c)
    params_sh = logical_shardings(boxed, mesh, rules)
    params_abs = nn.unbox(boxed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_abs))
    assert 1.2e9 < n_params < 1.3e9, n_params
    blocks = params_sh["blocks"]
    assert blocks["attn"]["to_q"]["dense"]["kernel"].spec == P(None, "fsdp", None)
    # ('heads', 'embed') / ('mlp', 'embed'): the 'embed' rule comes first, so the output axis
    assert blocks["attn"]["to_out"]["dense"]["kernel"].spec == P(None, None, "fsdp")
    assert blocks["ff"]["proj_in"]["dense"]["kernel"].spec == P(None, "fsdp", None)
    assert blocks["ff"]["proj_out"]["dense"]["kernel"].spec == P(None, None, "fsdp")
    assert params_sh["head"]["dense"]["kernel"].spec == P("fsdp", None)
    assert params_sh["code_embedding"].spec == P(None, "fsdp")  # 'embed' comes first in the rules
    tx = optax.adam(1e-4)
    opt_abs = jax.eval_shape(tx.init, params_abs)
    opt_sh = opt_state_shardings(opt_abs, params_abs, params_sh, mesh)
    model = ar.ARPrior(c)
    gb = 16
    batch_abs = (jax.ShapeDtypeStruct((gb, 319), jnp.int32), jax.ShapeDtypeStruct((gb,), jnp.int32),
                 jax.ShapeDtypeStruct((gb, 768), jnp.float32),
                 jax.ShapeDtypeStruct((gb, 77, 768), jnp.float32),
                 jax.ShapeDtypeStruct((gb, 77), jnp.bool_))
    batch_sh = tuple(batch_sharding(mesh) for _ in batch_abs)

    def train_step_with_adam(params, opt_state, batch):
        def loss(p):
            ce, acc = ar.loss_fn(model.apply({"params": p}, *batch, train=True), batch[0])
            return ce.mean(), acc.mean()
        (l, acc), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, l, acc

    step = jax.jit(train_step_with_adam, in_shardings=(params_sh, opt_sh, batch_sh),
                   out_shardings=(params_sh, opt_sh, None, None), donate_argnums=(0, 1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = step.lower(params_abs, opt_abs, batch_abs)
    compiled = lowered.compile()
    out_params_sh = compiled.output_shardings[0]
    k = out_params_sh["blocks"]["ff"]["proj_in"]["dense"]["kernel"]
    assert k.spec == P(None, "fsdp", None) and k.mesh.shape["fsdp"] == 4
    # per-device parameter memory is a quarter of the f32 params (plus replicated small leaves)
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) for s, x in
                     zip(jax.tree.leaves(params_sh), jax.tree.leaves(params_abs)))
    assert per_device < 0.27 * n_params, per_device / n_params


def test_bad_inputs(tiny_params):
    cond = _cond(0)
    kw = dict(dot=DOT, rng=jax.random.key(0))
    for top_k in (0, -1, 17, 2.5, True):
        with pytest.raises(ValueError, match=r"top_k must be None \(all\) or an integer in \[1, 16\]"):
            ar.sample(TINY, tiny_params, cond, top_k=top_k, **kw)
    for temp in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            ar.sample(TINY, tiny_params, cond, temperature=temp, **kw)
    for scale in (0.5, float("nan")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 1"):
            ar.sample(TINY, tiny_params, cond, _cond(1), guidance_scale=scale, **kw)
    with pytest.raises(ValueError, match=r"dot must be a scalar or \[B\] = \[4\]"):
        ar.sample(TINY, tiny_params, cond, dot=np.array([1, 2]), rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"dot buckets must lie in \[0, 8\)"):
        ar.sample(TINY, tiny_params, cond, dot=np.array([1, 2, 8, 0]), rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"cond\['text_hidden'\] must be \[B, L, D\]"):
        ar.sample(TINY, tiny_params, dict(cond, text_hidden=cond["text_hidden"][:, :4]), **kw)
    with pytest.raises(ValueError, match="uncond has batch 2, cond has 4"):
        ar.sample(TINY, tiny_params, cond, _cond(1, b=2), guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match="temperature"):  # the reference checks the same way
        ar.sample_reference(TINY, tiny_params, cond, temperature=0, **kw)
    with pytest.raises(ValueError, match=r"top_k must be None \(all\) or an integer in \[1, 1024\]"):
        ar.check_sampling(1.0, 2000, 1024, 1.0)
    ar.check_sampling(0.7, 5, 16, 3.0)
    # a codebook that does not fit the config
    x, t, _ = _low_rank(n=50)
    cb = ar_codes.fit_codebook(x, t, num_components=7, num_buckets=16, num_dot_buckets=8)
    with pytest.raises(ValueError, match="embedding width: codebook 16 != config 12"):
        ar.check_codebook(TINY, cb)
    ar.check_codebook(dataclasses.replace(TINY, embedding_dim=16), cb)
    # config
    with pytest.raises(ValueError, match=r"unknown ARPriorConfig fields: \['width'\]"):
        ar.ARPriorConfig.from_dict(dict(TINY.to_dict(), width=16))
    assert ar.ARPriorConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="num_components must be a positive integer"):
        ar.ARPriorConfig(num_components=0)
    with pytest.raises(ValueError, match="remat_policy"):
        ar.ARPriorConfig(num_components=3, remat_policy="sometimes")
    with pytest.raises(ValueError, match=r"codes must be \[B, K\]"):
        ar.ARPrior(TINY).apply({"params": tiny_params}, jnp.zeros((B, 6), jnp.int32),
                               jnp.asarray(DOT), cond["text_embed"], cond["text_hidden"])
