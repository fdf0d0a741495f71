"""bench/bench_conv.py's lowerings of a 3x3 convolution are the same function as XLA's and
PyTorch's conv2d (the bench compares their speed only after this holds)."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))


def test_every_lowering_matches_xla_and_torch():
    import bench_conv

    rows = bench_conv.run([(2, 5, 7, 3, 4), (1, 4, 4, 8, 2)], repeats=1)
    for r in rows:
        assert set(r["ms"]) == {"xla", "im2col", "shift9", "row3", "torch"}
        for name, diff in r["max_abs_diff"].items():
            assert diff < 1e-5, (r["shape"], name, diff)
        assert all(v > 0 for v in r["ms"].values())


def test_a_float64_reference_of_one_output_pixel():
    """The corner pixel sees the zero padding: out[0, 0, 0] = sum over the 2x2 in-image window."""
    import jax
    import bench_conv

    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(1)
        x = rng.standard_normal((1, 3, 3, 2))
        w = rng.standard_normal((3, 3, 2, 1))
        want = sum(x[0, i, j] @ w[i + 1, j + 1] for i in range(2) for j in range(2))
        for name, f in bench_conv.lowerings().items():
            got = np.asarray(f(x, w))[0, 0, 0]
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("text", ["8x32x32x32", "8x32x32x0x3", "axbxcxdxe"])
def test_bad_shapes_say_what_a_shape_is(text):
    import argparse
    import bench_conv

    with pytest.raises(argparse.ArgumentTypeError, match="BxHxWxCINxCOUT"):
        bench_conv.parse_shape(text)
