"""Shared layers against closed forms: the CPU attention path against jax's reference attention
(values and gradients, every mask form), GroupNorm against a float64 reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import layers


def _qkv(b, lq, lk, h, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, lq, h, d)), jax.random.normal(ks[1], (b, lk, h, d)),
            jax.random.normal(ks[2], (b, lk, h, d)))


@pytest.mark.parametrize("shape,mask_kind,causal", [
    ((2, 9, 13, 3, 4), "none", False),
    ((2, 9, 13, 3, 4), "keys", False),      # padding mask [B, 1, 1, Lk]
    ((2, 11, 11, 2, 8), "keys", True),      # the prior: causal + padding
    ((2, 7, 10, 2, 4), "full", False),      # a mask per (batch, head, query, key)
    ((1, 1500, 1500, 2, 8), "keys", False),  # one (batch, head) pair per block (group = 1)
])
def test_blocked_attention_equals_reference(shape, mask_kind, causal):
    b, lq, lk, h, d = shape
    q, k, v = _qkv(b, lq, lk, h, d)
    rng = np.random.default_rng(0)
    mask = None
    if mask_kind == "keys":
        keep = rng.random((b, lk)) < 0.7
        keep[:, 0] = True  # every row keeps a key
        mask = jnp.asarray(keep)[:, None, None, :]
    elif mask_kind == "full":
        keep = rng.random((b, h, lq, lk)) < 0.6
        keep[..., 0] = True
        mask = jnp.asarray(keep)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")
    out = layers.blocked_attention(q, k, v, mask=mask, is_causal=causal)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    if lq * lk > 10 ** 6:
        return

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    g_ref = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation="xla")), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss(lambda q, k, v: layers.blocked_attention(
        q, k, v, mask=mask, is_causal=causal)), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, atol=5e-5, rtol=5e-5)


def test_attention_picks_the_cpu_path_under_jit():
    q, k, v = _qkv(2, 5, 6, 2, 4, seed=1)
    hlo = jax.jit(lambda q, k, v: layers.attention(q, k, v)).lower(q, k, v).as_text()
    assert "while" in hlo  # the lax.map of blocked_attention, lowered for CPU
    np.testing.assert_allclose(layers.attention(q, k, v),
                               layers.attention(q, k, v, implementation="xla"), atol=2e-5)


def test_group_norm_against_float64():
    x = np.random.default_rng(0).normal(size=(2, 12, 10, 64)) * 3.0 + 100.0  # far from zero mean
    gn = layers.GroupNorm(num_groups=8, epsilon=1e-5)
    params = gn.init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))
    scale = np.random.default_rng(1).normal(size=64)
    bias = np.random.default_rng(2).normal(size=64)
    params = {"params": {"scale": jnp.asarray(scale, jnp.float32),
                         "bias": jnp.asarray(bias, jnp.float32)}}
    out = gn.apply(params, jnp.asarray(x, jnp.float32))
    xg = x.reshape(2, 12 * 10, 8, 8)
    ref = ((xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-5))
    ref = ref.reshape(x.shape) * scale + bias
    # float32 input rounding alone is ~1e-5 relative at |x| ~ 100
    np.testing.assert_allclose(out, ref, atol=2e-4 * np.abs(ref).max())
    # the same parameter tree as flax's GroupNorm (checkpoints and importers rely on it)
    flax_tree = nn.GroupNorm(num_groups=8).init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))
    ours = gn.init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))
    assert ours["params"]["scale"].names == ("norm",)  # logical axis for sharding rules
    assert jax.tree.structure(flax_tree) == jax.tree.structure(nn.unbox(ours))
    with pytest.raises(ValueError, match="groups"):
        layers.GroupNorm(num_groups=7).init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))
