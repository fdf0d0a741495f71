"""3x3 convolutions (stride 1, zero padding 1, NHWC / HWIO) lowered four ways on this machine, in
this run, against PyTorch's conv2d on the same arrays: the lever docs/PERFORMANCE.md names for
CPU sampling (issue 18: XLA:CPU's small convolutions at about half of oneDNN's speed).

    python bench/bench_conv.py                  # the UNet shapes of bench_pipeline's `small`
    python bench/bench_conv.py --shapes 8x32x32x32x32 4x64x64x64x64 --repeats 50

Lowerings, all from the same kernel [3, 3, Cin, Cout] (so any of them could replace
`nn.Conv` without touching checkpoints):

* xla     -- `lax.conv_general_dilated` (what `nn.Conv` emits);
* im2col  -- the 9 shifted views concatenated on channels, one [B*H*W, 9 Cin] x [9 Cin, Cout]
             matrix product;
* shift9  -- 9 matrix products of shifted views, summed;
* row3    -- the 3 horizontal shifts concatenated, 3 matrix products over vertical shifts.

Prints per shape the median milliseconds of each (forward, jitted, after a warm-up), the largest
absolute difference from `xla`, torch's time, and torch / best-of-ours (> 1: ours is faster).
Appends one JSON line per run to --out (if given).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

DEFAULT_SHAPES = (  # B x H x W x Cin x Cout; the decoder / upsampler levels of the small bench
    "8x64x64x64x64", "8x32x32x128x128", "8x16x16x128x128", "4x128x128x64x64",
    "4x64x64x128x128", "8x32x32x32x32", "8x16x16x64x64")


def lowerings():
    import jax.numpy as jnp
    from jax import lax

    def pad(x):
        return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def xla(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def im2col(x, w):
        _, h, wd, c = x.shape
        xp = pad(x)
        cols = jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], -1)
        return jnp.einsum("bhwk,ko->bhwo", cols, w.reshape(9 * c, -1))

    def shift9(x, w):
        _, h, wd, _ = x.shape
        xp = pad(x)
        return sum(jnp.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + wd], w[i, j])
                   for i in range(3) for j in range(3))

    def row3(x, w):
        _, h, wd, c = x.shape
        rows = jnp.concatenate([pad(x)[:, :, j:j + wd] for j in range(3)], -1)
        return sum(jnp.einsum("bhwk,ko->bhwo", rows[:, i:i + h], w[i].reshape(3 * c, -1))
                   for i in range(3))

    return dict(xla=xla, im2col=im2col, shift9=shift9, row3=row3)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 5 or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"a shape is BxHxWxCINxCOUT (five positive integers joined by x), got {text!r}")
    return dims


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def run(shapes, repeats: int = 30, threads: int | None = None) -> list[dict]:
    import jax
    import torch

    if threads:
        torch.set_num_threads(threads)
    fns = {k: jax.jit(f) for k, f in lowerings().items()}
    rows = []
    for b, h, w, c, o in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, h, w, c), dtype=np.float32)
        k = (0.1 * rng.standard_normal((3, 3, c, o))).astype(np.float32)
        xj, kj = jax.device_put(x), jax.device_put(k)
        ref = np.asarray(fns["xla"](xj, kj))
        row = dict(shape=[b, h, w, c, o], ms={}, max_abs_diff={})
        for name, f in fns.items():
            row["max_abs_diff"][name] = float(np.abs(np.asarray(f(xj, kj)) - ref).max())
            row["ms"][name] = median_ms(lambda f=f: f(xj, kj).block_until_ready(), repeats)
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
        with torch.no_grad():
            got = torch.nn.functional.conv2d(tx, tk, padding=1).permute(0, 2, 3, 1).numpy()
            row["max_abs_diff"]["torch"] = float(np.abs(got - ref).max())
            row["ms"]["torch"] = median_ms(
                lambda: torch.nn.functional.conv2d(tx, tk, padding=1), repeats)
        ours = {n: v for n, v in row["ms"].items() if n != "torch"}
        row["best"] = min(ours, key=ours.get)
        row["torch_over_best"] = row["ms"]["torch"] / ours[row["best"]]
        row["torch_over_xla"] = row["ms"]["torch"] / row["ms"]["xla"]
        row["gflops_xla"] = 2 * b * h * w * 9 * c * o / row["ms"]["xla"] / 1e6
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape,
                    default=[parse_shape(s) for s in DEFAULT_SHAPES],
                    help="BxHxWxCINxCOUT ... (default: the small bench's UNet levels)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per lowering (median)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--out", default=None, help="append one JSON line with every row")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    rows = run(args.shapes, args.repeats, args.threads)
    names = list(rows[0]["ms"])
    print("| B x H x W x Cin -> Cout | " + " | ".join(f"{n} ms" for n in names)
          + " | XLA GFLOP/s | best of ours | torch / best | largest |diff| vs xla |")
    print("|---" * (len(names) + 5) + "|")
    for r in rows:
        b, h, w, c, o = r["shape"]
        print(f"| {b}x{h}x{w}x{c} -> {o} | " + " | ".join(f"{r['ms'][n]:.2f}" for n in names)
              + f" | {r['gflops_xla']:.0f} | {r['best']} | {r['torch_over_best']:.2f}x | "
              f"{max(r['max_abs_diff'].values()):.1e} |")
    if args.out:
        import jax
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(device=jax.devices()[0].device_kind, rows=rows)) + "\n")


if __name__ == "__main__":
    main()
