"""Training throughput of one stage: steps/s, examples/s, TFLOP/s per device, MFU (where the
device's peak is known) and the step's memory, for a config and mesh.

    python bench/bench_train.py --config configs/decoder.py:size=demo --steps 20 [--config.batch_size=16]

Needs the stage's inputs (the prior and the decoder read WORKDIR/clip): pass --workdir of a
trained stack, e.g. workdir/demo. Writes into a temporary copy of nothing: checkpoints go to
--scratch (a temporary directory by default).
"""
from __future__ import annotations

import argparse
import sys
import tempfile


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", default="", help="a workdir holding clip/ (prior, decoder)")
    from unclip_jax.train.config import load_config, split_overrides

    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = ap.parse_args(rest)

    import jax

    from unclip_jax.stages import train_stage
    from unclip_jax.train import flops

    over = [f"total_steps={args.steps}", f"log_every={max(1, args.steps // 4)}",
            "checkpoint.every=1000000", "checkpoint.async_save=False", *overrides]
    if args.workdir:
        over.append(f"clip_dir={args.workdir}/clip")
    cfg = load_config(args.config, over)
    with tempfile.TemporaryDirectory() as scratch:
        res = train_stage(cfg, scratch, progress=False)
    last = res.history[-1]  # steady state: the first window includes warm-up
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; peak "
          f"{(flops.peak_flops() or 0) / 1e12:.0f} TFLOP/s per device (0 = unknown)")
    print(f"stage {cfg.stage}: batch {cfg.batch_size}, mesh {dict(cfg.mesh)}, {cfg.sharding}")
    print(f"steps/s {last['steps_per_s']:.3f}  examples/s {last['examples_per_s']:.1f}  "
          f"TFLOP/s/device {last.get('tflops_per_device', float('nan')):.3f}  "
          f"MFU {last.get('mfu', float('nan')):.3f}")
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            print(f"peak memory {stats['peak_bytes_in_use'] / 2 ** 30:.2f} GiB per device")
    except Exception:  # noqa: BLE001 -- CPU has no memory stats
        pass


if __name__ == "__main__":
    main()
