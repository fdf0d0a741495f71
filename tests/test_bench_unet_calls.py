"""bench/bench_unet_calls.py's torch equivalents of jaxpr ops compute what the ops compute."""
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from bench_unet_calls import torch_op  # noqa: E402

from unclip_jax.train.flops import jaxpr_ops  # noqa: E402


def _check(fn, *shapes):
    """Every matrix product / convolution of fn's jaxpr: torch's equivalent on random operands
    of the op's shapes equals the primitive's own result."""
    rng = np.random.default_rng(0)
    ops = jaxpr_ops(fn, *(np.zeros(s, np.float32) for s in shapes))
    assert ops
    for o in ops:
        a, b = (rng.standard_normal(v.shape).astype(np.float32) for v in (o["lhs"], o["rhs"]))
        run, to_jax = torch_op(o, a, b)
        want = np.asarray(o["bind"].bind(jnp.asarray(a), jnp.asarray(b), **o["params"]))
        got = to_jax(run())
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, ((0, 1), (1, 0))), (1, "VALID")])
def test_torch_conv_matches_the_jaxpr_conv(stride, padding):
    _check(lambda x, w: lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")),
        (2, 9, 8, 5), (3, 3, 5, 7))


def test_torch_conv_in_other_layouts():
    _check(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NHWC")),
        (2, 5, 6, 7), (4, 5, 3, 3))


def test_torch_bmm_matches_batched_and_plain_dot_generals():
    _check(lambda q, k: jnp.einsum("bhqd,bkhd->bhqk", q, k), (2, 3, 6, 4), (2, 5, 3, 4))
    _check(lambda x, w: x @ w, (2, 7, 5), (5, 3))


def test_lhs_dilated_convolutions_have_no_plain_equivalent():
    fn = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    o, = jaxpr_ops(fn, np.zeros((1, 4, 4, 2), np.float32), np.zeros((3, 3, 2, 2), np.float32))
    assert torch_op(o, np.zeros(o["lhs"].shape, np.float32),
                    np.zeros(o["rhs"].shape, np.float32)) is None
