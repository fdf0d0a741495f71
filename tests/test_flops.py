"""Model-FLOP counting against closed forms (MFU's numerator)."""
import jax
import jax.numpy as jnp
import pytest

from unclip_jax.train import flops


def test_dense_conv_and_loops_count_exactly():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert flops.jaxpr_flops(lambda x, w: x @ w, x, w) == 2 * 4 * 8 * 16
    batched = jnp.ones((3, 4, 8))
    assert flops.jaxpr_flops(lambda a, w: jnp.einsum("bnk,km->bnm", a, w), batched, w) == \
        2 * 3 * 4 * 8 * 16

    img, k = jnp.ones((2, 10, 12, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.jaxpr_flops(conv, img, k) == 2 * (2 * 10 * 12 * 5) * 3 * 9
    strided = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.jaxpr_flops(strided, img, k) == 2 * (2 * 5 * 6 * 5) * 3 * 9

    sq = jnp.ones((8, 8))

    def looped(x, w):  # a scan of 5 products, a remat'd product, a cond with a costlier branch
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)
        y = jax.checkpoint(lambda a: a @ w)(y)
        return jax.lax.cond(y.sum() > 0, lambda: (y @ w) @ w, lambda: y)

    one = 2 * 4 * 8 * 8
    assert flops.jaxpr_flops(looped, jnp.ones((4, 8)), sq) == 5 * one + one + 2 * one
    # jit-wrapped calls are entered
    assert flops.jaxpr_flops(jax.jit(lambda x, w: x @ w), x, w) == 2 * 4 * 8 * 16


@pytest.mark.parametrize("scan", [False, True])
def test_scanned_prior_counts_every_layer(scan):
    import dataclasses

    from unclip_jax.models import prior as prior_lib

    c = prior_lib.PriorConfig(embedding_dim=16, num_layers=3, num_heads=2, head_dim=8,
                              num_text_tokens=5)
    c = dataclasses.replace(c, scan_layers=scan)
    params = prior_lib.init_params(c)  # abstract
    b = 2
    args = (jnp.zeros((b, 16)), jnp.zeros((b,), jnp.int32), jnp.zeros((b, 16)),
            jnp.zeros((b, 5, 16)), jnp.ones((b, 5), bool))
    f = flops.jaxpr_flops(lambda p, *a: prior_lib.PriorTransformer(c).apply({"params": p}, *a),
                          params, *args)
    # per layer and token: q, k, v, out (4 x 16 x 16) + MLP (2 x 16 x 64) multiply-adds, plus
    # attention scores and values (2 x 9 x 16) over the 9 tokens; outside the layers: the
    # projections in, the time MLP and the output
    S, W = 9, 16
    per_layer = 2 * b * S * (4 * W * W + 2 * W * 4 * W) + 2 * 2 * b * S * S * W
    outside = 2 * b * (16 * W + 16 * W + 5 * 16 * W + W * W + W * W + W * 16)
    assert f == 3 * per_layer + outside


def test_trainer_counts_model_flops_per_device_with_accumulation():
    import ml_collections

    from unclip_jax.train.trainer import _model_flops_per_device

    class Linear:  # a stage whose loss is one [B, 8] x [8, 16] product
        def flops_per_example(self):
            return None

        def loss(self, params, batch, rng, frozen):
            return jnp.sum(batch["x"] @ params["w"]), {}

    cfg = ml_collections.ConfigDict({"batch_size": 32, "grad_accum": 4})
    params = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
    batch = {"x": jax.ShapeDtypeStruct((32, 8), jnp.float32)}
    got = _model_flops_per_device(Linear(), cfg, params, batch, None)
    # 3 x forward of the whole global batch (4 micro-batches of 8), split over the devices
    assert got == 3 * (2 * 32 * 8 * 16) / jax.device_count()


def test_jaxpr_ops_groups_shapes_ranks_them_and_reruns_them():
    """The dominant-op listing behind bench/bench_stage_steps.py's roofline: one group per shape,
    executions counted through a scan, costliest first, totals summing to jaxpr_flops, and each
    group's equation re-runnable alone."""
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    img, k = jnp.ones((2, 10, 12, 3)), jnp.ones((3, 3, 3, 5))

    def fn(x, w, img, k):
        y, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)
        z = (y @ w).sum()  # the same shape again, outside the loop
        c = jax.lax.conv_general_dilated(img, k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return z + c.sum()

    ops = flops.jaxpr_ops(fn, x, w, img, k)
    conv_f, mm_f = 2 * (2 * 10 * 12 * 5) * 3 * 9, 2 * 4 * 8 * 8
    assert [(o["primitive"], o["count"], o["flops"]) for o in ops] == [
        ("conv_general_dilated", 1, conv_f), ("dot_general", 6, mm_f)]
    assert sum(o["total_flops"] for o in ops) == flops.jaxpr_flops(fn, x, w, img, k)
    assert ops[1]["lhs"].shape == (4, 8) and ops[1]["rhs"].shape == (8, 8)
    conv = ops[0]
    out = conv["bind"].bind(img, k, **conv["params"])
    assert out.shape == (2, 10, 12, 5) and float(out[0, 5, 5, 0]) == 27.0
