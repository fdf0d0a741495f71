"""Images/s of UnCLIPPipeline.generate against diffusers' UnCLIPPipeline with the same weights,
steps (25/25/7), guidance (4/8) and batch, on this machine, in this run.

    python bench/bench_pipeline.py --size small --batch 4

Sizes: fast-test (diffusers' own fast-test shapes: overhead-bound) and small (a ~20 M-parameter
stack). Prints both rates, the ratio and our compile time (first call minus a warm call).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

SIZES = {
    "fast-test": dict(text_dim=32, context=16, decoder_size=32, super_res_size=64,
                      block_out=(32, 64), prior_heads=2, prior_head_dim=12),
    "small": dict(text_dim=128, context=32, decoder_size=64, super_res_size=128,
                  block_out=(64, 128), prior_heads=4, prior_head_dim=32),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import jax
    import torch

    from unclip_jax.peers import tiny_unclip_pipeline
    from unclip_jax.pipeline import UnCLIPPipeline

    torch.set_num_threads(os.cpu_count())
    prompts = [f"a photo of thing number {i}" for i in range(args.batch)]
    steps = dict(prior=25, decoder=25, super_res=7)
    with tempfile.TemporaryDirectory() as d:
        peer = tiny_unclip_pipeline(d, seed=0, **SIZES[args.size])
        peer.set_progress_bar_config(disable=True)
        n_params = sum(p.numel() for m in (peer.prior, peer.decoder, peer.super_res_first,
                                            peer.text_encoder, peer.text_proj)
                       for p in m.parameters())
        ours = UnCLIPPipeline.from_diffusers(d, progress=False, prior_candidates=1)

        def run_ours():
            return ours.generate(prompts, seed=0, prior_steps=steps["prior"],
                                 decoder_steps=steps["decoder"],
                                 super_res_steps=steps["super_res"])

        def run_peer():
            with torch.inference_mode():
                return peer(prompts, prior_num_inference_steps=steps["prior"],
                            decoder_num_inference_steps=steps["decoder"],
                            super_res_num_inference_steps=steps["super_res"],
                            generator=torch.Generator().manual_seed(0), output_type="np").images

        t0 = time.perf_counter()
        run_ours()
        first = time.perf_counter() - t0
        ours_t = min(_time(run_ours) for _ in range(args.repeats))
        run_peer()  # warm-up
        peer_t = min(_time(run_peer) for _ in range(args.repeats))
    ours_ips, peer_ips = args.batch / ours_t, args.batch / peer_t
    print(f"device: {jax.devices()[0].device_kind} ({jax.device_count()} devices), "
          f"torch threads {torch.get_num_threads()}")
    print(f"size {args.size}: {n_params / 1e6:.1f} M parameters (diffusers count), "
          f"batch {args.batch}, steps 25/25/7, guidance 4/8")
    print(f"unclip_jax: {ours_ips:.3f} images/s ({ours_t:.2f} s per batch); "
          f"compile {first - ours_t:.1f} s")
    print(f"diffusers : {peer_ips:.3f} images/s ({peer_t:.2f} s per batch)")
    print(f"ratio     : {ours_ips / peer_ips:.2f}x")


def _time(fn):
    t = time.perf_counter()
    out = fn()
    np.asarray(out)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
