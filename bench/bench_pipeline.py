"""Images/s of UnCLIPPipeline.generate against diffusers' UnCLIPPipeline with the same weights,
steps (25/25/7), guidance (4/8) and batch, on this machine, in this run.

    python bench/bench_pipeline.py --size small --batch 4                      # CPU
    python bench/bench_pipeline.py --size karlo --batch 8 --dtype bfloat16     # GPU (H100)

Sizes: fast-test (diffusers' own fast-test shapes: overhead-bound), small (a ~7 M-parameter
stack) and karlo (kakaobrain/karlo-v1-alpha's architecture, random weights). On a GPU the peer
runs in --peer-dtype (float16 by default, as Karlo is usually run) and ours in --dtype.

Prints both rates, the ratio, our compile time (first call minus a warm call), per-stage times,
peak device memory of both (GPU), the model FLOPs per image (the matrix products and
convolutions of one call of each network, `flops.jaxpr_flops`, times the calls the samplers make)
and the fraction of the device's peak-FLOP/s limit that each time per image reaches. Appends one
JSON line per run to --out (if given). `run_bench` is the same run as a function
(bench/gpu_suite.py calls it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# the PyTorch peers live with the tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import numpy as np  # noqa: E402

SIZES = {
    "fast-test": dict(text_dim=32, context=16, decoder_size=32, super_res_size=64,
                      block_out=(32, 64), prior_heads=2, prior_head_dim=12),
    "small": dict(text_dim=128, context=32, decoder_size=64, super_res_size=128,
                  block_out=(64, 128), prior_heads=4, prior_head_dim=32),
    "karlo": None,  # peers.KARLO
}
STEPS = dict(prior=25, decoder=25, super_res=7)
GUIDANCE = dict(prior=4.0, decoder=8.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="ours: float32 | bfloat16 (default: bfloat16 "
                    "on GPU/TPU, float32 on CPU)")
    ap.add_argument("--peer-dtype", default=None, help="diffusers: float32 | float16 | bfloat16 "
                    "(default: float16 on GPU, float32 on CPU)")
    ap.add_argument("--attention", default=None, choices=("xla", "cudnn"),
                    help="our attention implementation (default: XLA's choice)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--out", default="", help="append a JSON line with the results here")
    args = ap.parse_args()
    res = run_bench(args.size, args.batch, repeats=args.repeats, dtype=args.dtype,
                    peer_dtype=args.peer_dtype, attention=args.attention,
                    skip_peer=args.skip_peer)
    report(res)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(res) + "\n")


def run_bench(size: str, batch: int, *, repeats: int = 2, dtype: str | None = None,
              peer_dtype: str | None = None, attention: str | None = None,
              skip_peer: bool = False, stage_times: bool = True, peak: float | None = None,
              catch_peer: bool = False, progress=None, steps: dict | None = None) -> dict:
    """Run the comparison and return its figures (the dict `report` prints and --out writes).

    steps: sampling steps per stage (default STEPS: 25/25/7). peak: the device's peak FLOP/s
    (default: train/flops.py's table; None on CPU). catch_peer: an exception of the peer's run
    is recorded as res["peer_error"] instead of raised (ours are kept). progress(res) is called
    after each measured phase with the figures so far (a caller with a time budget keeps what
    was measured when it stops the run). On a GPU whose torch has no CUDA the peer is not run
    (res["peer_error"] says why): a CPU peer is no comparison.
    """
    import jax
    import torch

    from peers import KARLO, UnCLIPArch
    from unclip_jax.train.flops import peak_flops

    progress = progress or (lambda r: None)
    steps = dict(STEPS, **(steps or {}))
    platform = jax.devices()[0].platform
    cuda = torch.cuda.is_available()
    dtype = dtype or ("float32" if platform == "cpu" else "bfloat16")
    peer_dtype = peer_dtype or ("float16" if cuda else "float32")
    torch_dtype = getattr(torch, peer_dtype)
    torch.set_num_threads(os.cpu_count())
    arch = KARLO if size == "karlo" else UnCLIPArch(**SIZES[size])
    prompts = [f"a photo of thing number {i}" for i in range(batch)]
    res = dict(size=size, batch=batch, dtype=dtype, peer_dtype=peer_dtype,
               attention=attention or "default", device=jax.devices()[0].device_kind,
               platform=platform, n_devices=jax.device_count(),
               peer_device="cuda" if cuda else "cpu", steps=steps, guidance=GUIDANCE)
    peer, ours, built = build_pipelines(arch, randomise=size != "karlo", dtype=dtype,
                                        torch_dtype=torch_dtype, cuda=cuda, attention=attention)
    res.update(built)
    progress(res)

    def run_ours():
        return ours.generate(prompts, seed=0, prior_steps=steps["prior"],
                             decoder_steps=steps["decoder"], super_res_steps=steps["super_res"],
                             prior_guidance=GUIDANCE["prior"],
                             decoder_guidance=GUIDANCE["decoder"])

    t0 = time.perf_counter()
    run_ours()
    first = time.perf_counter() - t0
    ours_t = min(_time(run_ours) for _ in range(repeats))
    res.update(ours_s=ours_t, ours_first_call_s=first, compile_s=first - ours_t,
               ours_images_per_s=batch / ours_t, ours_peak_gib=_jax_peak_gib())
    progress(res)
    if stage_times:  # before the peer runs: torch's OpenMP threads spin on after its calls
        res["stages_s"] = _stage_times(ours, prompts, steps)
    res["flops_per_image"] = _flops_per_image(ours, prompts, steps)
    peak = peak or peak_flops()
    res["peak_flops"] = peak
    if peak and res["flops_per_image"]:
        limit = res["flops_per_image"] / peak
        res["limit_s_per_image"] = limit
        res["fraction_of_limit"] = limit / (ours_t / batch)
    progress(res)

    if not skip_peer:
        _run_peer(res, peer, prompts, steps, repeats, catch_peer)
        progress(res)
    return res


def build_pipelines(arch, *, randomise: bool = True, dtype: str = "float32", torch_dtype=None,
                    cuda: bool = False, attention: str | None = None):
    """The peer (diffusers' UnCLIPPipeline of `arch`, random weights; `randomise`: the small
    sizes' weights scaled by 0.1 so that samples stay finite) and ours imported from it:
    (peer, ours, dict(n_params, peer_build_s, import_s))."""
    import torch

    from peers import unclip_pipeline
    from unclip_jax.pipeline import UnCLIPPipeline

    info = {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        peer = unclip_pipeline(d, arch, seed=0, torch_dtype=torch_dtype or torch.float32,
                               device="cuda" if cuda else None,
                               randomise_scale=0.1 if randomise else None)
        peer.set_progress_bar_config(disable=True)
        info["n_params"] = sum(p.numel() for m in (peer.prior, peer.decoder,
                                                    peer.super_res_first, peer.text_encoder,
                                                    peer.text_proj) for p in m.parameters())
        info["peer_build_s"] = time.perf_counter() - t0
        print(f"built and saved the peer in {info['peer_build_s']:.1f} s", flush=True)
        t0 = time.perf_counter()
        ours = UnCLIPPipeline.from_diffusers(d, progress=False, prior_candidates=1, dtype=dtype,
                                             attention_impl=attention)
        info["import_s"] = time.perf_counter() - t0
        print(f"imported into unclip_jax in {info['import_s']:.1f} s", flush=True)
    return peer, ours, info


def _run_peer(res, peer, prompts, steps, repeats, catch_peer):
    """Time diffusers' pipeline into `res` (peer_s, peer_peak_gib, ratio, ...)."""
    import torch

    cuda = res["peer_device"] == "cuda"
    if res["platform"] != "cpu" and not cuda:
        res["peer_error"] = (f"torch {torch.__version__} has no CUDA device: the peer would run "
                             "on the CPU; not run")
        return
    try:
        if cuda:
            peer.to("cuda")
            torch.cuda.reset_peak_memory_stats()

        def run_peer():
            with torch.inference_mode():
                g = torch.Generator("cuda" if cuda else "cpu").manual_seed(0)
                out = peer(prompts, prior_num_inference_steps=steps["prior"],
                           decoder_num_inference_steps=steps["decoder"],
                           super_res_num_inference_steps=steps["super_res"],
                           prior_guidance_scale=GUIDANCE["prior"],
                           decoder_guidance_scale=GUIDANCE["decoder"],
                           generator=g, output_type="np").images
            if cuda:
                torch.cuda.synchronize()
            return out

        run_peer()  # warm-up
        res["peer_s"] = min(_time(run_peer) for _ in range(repeats))
    except Exception as e:  # noqa: BLE001 -- recorded for the caller that asked (catch_peer)
        if not catch_peer:
            raise
        res["peer_error"] = f"{type(e).__name__}: " + (str(e).splitlines() or [""])[0][:300]
        return
    batch = res["batch"]
    if cuda:
        res["peer_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if res.get("ours_peak_gib"):
            res["peak_memory_ratio"] = res["ours_peak_gib"] / res["peer_peak_gib"]
    res["peer_images_per_s"] = batch / res["peer_s"]
    res["ratio"] = res["peer_s"] / res["ours_s"]  # = ours images/s / diffusers images/s
    if res.get("limit_s_per_image"):
        res["peer_fraction_of_limit"] = res["limit_s_per_image"] / (res["peer_s"] / batch)


def _time(fn):
    t = time.perf_counter()
    out = fn()
    np.asarray(out)
    return time.perf_counter() - t


def _stage_times(pipe, prompts, steps=STEPS):
    """Warm seconds of each stage of ours, run one after another (block_until_ready between)."""
    import jax

    def timed(fn):
        fn()  # compiled already by the full run; one more call warms any re-specialisation
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        return time.perf_counter() - t, out

    k = jax.random.key(0)
    t_text, (cond, uncond) = timed(lambda: pipe.text_conditioning(prompts))
    t_prior, emb = timed(lambda: pipe.sample_prior(cond, uncond, steps=steps["prior"],
                                                   guidance=GUIDANCE["prior"], rng=k))
    t_dec, low = timed(lambda: pipe.sample_decoder(emb, cond, uncond, steps=steps["decoder"],
                                                   guidance=GUIDANCE["decoder"], rng=k))
    t_sr, _ = timed(lambda: pipe.sample_super_res(low, steps=steps["super_res"], rng=k))
    return dict(text=t_text, prior=t_prior, decoder=t_dec, super_res=t_sr)


def _flops_per_image(pipe, prompts, steps=STEPS):
    """Model FLOPs of one image: the matrix products and convolutions of one call of each
    network at this batch (`flops.jaxpr_flops`, abstract: nothing is compiled; the guided
    networks on [cond, uncond]) times the calls the samplers make. The text encoder's one call
    is not counted. None when a network reports no FLOPs."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.train.flops import jaxpr_flops

    n = len(prompts)
    cond, uncond = pipe.text_conditioning(prompts)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)
    t2 = jnp.zeros((2 * n,), jnp.int32)
    p = pipe.prior.config
    f_prior = jaxpr_flops(pipe._prior_fn, pipe.prior.params, jnp.zeros((2 * n, p.out_dim)), t2,
                          both)
    u = pipe.decoder.config.unet
    emb = jnp.zeros((n, cond["text_embed"].shape[1]))
    dc, du = pipe._decoder_inputs(emb, cond, uncond)
    dboth = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), dc, du)
    f_dec = jaxpr_flops(pipe._decoder_fn, pipe.decoder.params,
                        jnp.zeros((2 * n, u.sample_size, u.sample_size, 3)), t2, dboth)
    total = steps["prior"] * f_prior + steps["decoder"] * f_dec
    t1 = jnp.zeros((n,), jnp.int32)
    for up, (first_fn, last_fn) in zip(pipe.upsamplers, pipe._sr_fns):  # the cascade's steps
        s = up.sample_size
        x = jnp.zeros((n, s, s, 3))
        c = dict(low_res=x)
        if up.noise_level_cond:
            c["noise_level"] = t1
        f_first = jaxpr_flops(first_fn, up.first.params, x, t1, c)
        # Karlo's super_res_last takes the final timestep, super_res_first the others
        f_last = f_first if last_fn is None else jaxpr_flops(last_fn, up.last.params, x, t1, c)
        total += (steps["super_res"] - 1) * f_first + f_last
        if not (f_first and f_last):
            return None
    if not (f_prior and f_dec):
        return None
    return total / n


def _jax_peak_gib():
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 -- CPU has none
        return None
    v = stats.get("peak_bytes_in_use")
    return v / 2 ** 30 if v else None


def report(r):
    b = r["batch"]
    print(f"device: {r['device']} x {r['n_devices']}; size {r['size']} "
          f"({r['n_params'] / 1e6:.0f} M parameters), batch {b}, steps "
          + "/".join(str(v) for v in r["steps"].values()) + ", guidance "
          + "/".join(f"{v:g}" for v in r["guidance"].values()))
    st = r.get("stages_s") or {}
    print(f"unclip_jax ({r['dtype']}, attention {r['attention']}): {b / r['ours_s']:.3f} images/s "
          f"({r['ours_s']:.2f} s per batch); compile {r['compile_s']:.1f} s"
          + ("; stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in st.items()) if st else ""))
    if r.get("flops_per_image"):
        print(f"model FLOPs per image: {r['flops_per_image'] / 1e9:.4g} GFLOP")
    if r.get("fraction_of_limit"):
        print(f"peak-FLOP/s limit: {r['limit_s_per_image']:.3f} s per image; ours reaches "
              f"{100 * r['fraction_of_limit']:.1f}% of it")
    if "peer_s" in r:
        frac = (f"; {100 * r['peer_fraction_of_limit']:.1f}% of the limit"
                if r.get("peer_fraction_of_limit") else "")
        print(f"diffusers  ({r['peer_dtype']}): {b / r['peer_s']:.3f} images/s "
              f"({r['peer_s']:.2f} s per batch){frac}")
        print(f"ratio      : {r['ratio']:.2f}x")
    if r.get("peer_error"):
        print(f"diffusers  : {r['peer_error']}")
    if r.get("ours_peak_gib") is not None or r.get("peer_peak_gib") is not None:
        print(f"peak device memory: unclip_jax {r.get('ours_peak_gib') or float('nan'):.2f} GiB, "
              f"diffusers {r.get('peer_peak_gib') or float('nan'):.2f} GiB")


if __name__ == "__main__":
    main()
