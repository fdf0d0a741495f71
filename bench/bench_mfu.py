"""Training MFU of the diffusion networks at a config's size, on synthetic inputs: the jitted
train step (bf16 compute, float32 params, AdamW, donated state) of the prior, the decoder or the
upsampler with the CLIP embeddings given as inputs (as when training from precomputed
embeddings), for a sweep of batch sizes and remat settings.

    python bench/bench_mfu.py --stage prior --size karlo --batch 256,512,1024 --remat none,dots
    python bench/bench_mfu.py --stage decoder --size karlo --batch 32,64 --remat none,full

MFU = model FLOPs (3 x the forward pass's matrix products and convolutions, counted on its jaxpr
by flops.jaxpr_flops — XLA's cost analysis counts a scanned layer once; recomputation under remat
is not counted) / step time / the device's peak dense bf16 FLOP/s (train/flops.py). A batch that does
not fit is reported as OOM and the sweep goes on (larger batches of the same remat / scan are then
skipped); --budget-s stops starting points once the next one would not fit in it. Appends one
JSON line per point to --out. `sweep` / `run_point` are the same as functions (bench/gpu_suite.py).

The parameters have the model's shapes and dtypes (`jax.eval_shape` of its init) filled with
seeded noise on the host (`init_params`): a step's time does not depend on their values, and
compiling the init itself (hundreds of threefry draws) took 40 s for the tiny decoder on a
2-core CPU (one jitted fill with the unsafe_rbg generator still 13 s).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(stage: str, size: str, remat: str, scan: bool, attention: str | None):
    """(config, init(rng, batch), loss(params, batch, rng), forward(params, batch, rng),
    make_batch(rng, n)) over the stage's denoiser (`models.*.denoiser`) and the one diffusion
    loss (`GaussianDiffusion.training_loss`). A batch is dict(x0, cond)."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion, loss_options
    from unclip_jax.train.config import load_config

    cfg = load_config(os.path.join(HERE, "configs", f"{stage}.py") + f":size={size}", [])
    diffusion = GaussianDiffusion(DiffusionConfig.from_dict(cfg.diffusion.to_dict()))
    rm = dict(remat=remat != "none", remat_policy=remat if remat != "none" else "full")
    if stage == "prior":
        from unclip_jax.models import prior as lib

        pc = lib.PriorConfig.from_dict(cfg.model.to_dict())
        pc = dataclasses.replace(pc, scan_layers=scan, attention_impl=attention, **rm)
        model, fn = lib.PriorTransformer(pc), lib.denoiser(pc)
        L, D = pc.num_text_tokens, pc.embedding_dim

        def make_batch(rng, n):
            k = jax.random.split(rng, 3)
            return dict(x0=jax.random.normal(k[0], (n, pc.out_dim)), cond=dict(
                text_embed=jax.random.normal(k[1], (n, pc.text_embed_dim)),
                text_hidden=jax.random.normal(k[2], (n, L, D)),
                text_mask=jnp.ones((n, L), bool)))

        def init_args(b):
            c = b["cond"]
            return (b["x0"], jnp.zeros(b["x0"].shape[:1], jnp.int32), c["text_embed"],
                    c["text_hidden"], c["text_mask"])
    elif stage == "decoder":
        from unclip_jax.models import decoder as lib

        dc = lib.DecoderConfig.from_dict(cfg.model.to_dict())
        dc = dataclasses.replace(dc, unet=dataclasses.replace(dc.unet, attention_impl=attention,
                                                              **rm))
        model, fn = lib.Decoder(dc), lib.denoiser(dc)
        s, E, L = dc.unet.sample_size, dc.clip_embed_dim, 77
        H = dc.text_hidden_dim or E

        def make_batch(rng, n):
            k = jax.random.split(rng, 4)
            return dict(x0=jax.random.uniform(k[0], (n, s, s, 3), minval=-1, maxval=1), cond=dict(
                image_embed=jax.random.normal(k[1], (n, E)),
                text_embed=jax.random.normal(k[2], (n, E)),
                text_hidden=jax.random.normal(k[3], (n, L, H)), text_mask=jnp.ones((n, L), bool),
                null_image=jnp.zeros((n,), bool)))

        def init_args(b):
            c = b["cond"]
            return (b["x0"], jnp.zeros(b["x0"].shape[:1], jnp.int32), c["image_embed"],
                    c["text_embed"], c["text_hidden"], c["text_mask"])
    elif stage == "upsampler":
        from unclip_jax.models import unet as lib

        uc = lib.UNetConfig.from_dict(cfg.model.to_dict())
        uc = dataclasses.replace(uc, attention_impl=attention, **rm)
        model, fn = lib.UNet(uc), lib.super_res_denoiser(uc)
        crop = int(cfg.upsample.crop_size)

        def make_batch(rng, n):
            k = jax.random.split(rng, 2)
            return dict(x0=jax.random.uniform(k[0], (n, crop, crop, 3), minval=-1, maxval=1),
                        cond=dict(low_res=jax.random.uniform(k[1], (n, crop, crop, 3),
                                                             minval=-1, maxval=1)))

        def init_args(b):
            x = jnp.concatenate([b["x0"], b["cond"]["low_res"]], -1)
            return (x, jnp.zeros(x.shape[:1], jnp.int32))
    else:
        raise ValueError(stage)
    loss_kw = loss_options(cfg.get("loss"))

    def init(rng, b):
        return model.init(rng, *init_args(b))["params"]

    def loss(params, b, rng):
        value, _ = diffusion.training_loss(fn, params, b["x0"], b["cond"], rng, **loss_kw)
        return jnp.mean(value)

    def fwd_only(params, b, rng):
        t = jnp.zeros(b["x0"].shape[:1], jnp.int32)
        return fn(params, b["x0"], t, b["cond"], train=True, rng=jax.random.key(0))

    return cfg, init, loss, fwd_only, make_batch


_HOST_PARAMS: dict = {}  # (treedef, shapes, seed) -> numpy leaves: one fill per structure


def init_params(init, batch1, seed: int = 0):
    """Params of `init`'s shapes and dtypes (abstract: `jax.eval_shape`, nothing compiled):
    matrices / kernels N(0, 0.02^2) drawn by numpy, biases 0, other vectors (norm scales,
    embedding statistics) 1. The host arrays are kept for the next point of the same structure
    (a sweep's remat / batch points), which only copies them to the device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = jax.eval_shape(init, jax.random.key(0), batch1)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    key = (treedef, tuple((s.shape, str(s.dtype)) for _, s in leaves), seed)
    if key not in _HOST_PARAMS:
        _HOST_PARAMS.clear()  # one structure at a time: Karlo's are GBs
        gen = np.random.default_rng(seed)
        host = []
        for path, s in leaves:
            if len(s.shape) >= 2:
                v = gen.standard_normal(s.shape, dtype=np.float32)
                v *= 0.02
            else:
                name = str(getattr(path[-1], "key", path[-1]))
                v = np.full(s.shape, 0.0 if name == "bias" else 1.0, np.float32)
            host.append(v)
        _HOST_PARAMS[key] = host
    return jax.tree_util.tree_unflatten(treedef, [
        jnp.array(v, s.dtype) for v, (_, s) in zip(_HOST_PARAMS[key], leaves)])  # copies


def run_point(stage, size, batch, remat, scan, attention, steps, compile_only=False, peak=None):
    """One point of the sweep: compile the train step, run `steps` timed steps after a warm-up
    one; a dict of its figures. peak: the device's peak FLOP/s (default train/flops.py's)."""
    import jax
    import optax

    from unclip_jax.train import flops as flops_lib

    cfg, init, loss, fwd_only, make_batch = build(stage, size, remat, scan, attention)
    rng = jax.random.key(0)
    data_rng = jax.random.key(0, impl="unsafe_rbg")  # compiles in a fraction of threefry's time
    b = jax.jit(make_batch, static_argnums=1)(data_rng, batch)
    params = init_params(init, jax.tree.map(lambda a: a[:1], b))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt = tx.init(params)

    def step(params, opt, b, i):
        l, g = jax.value_and_grad(loss)(params, b, jax.random.fold_in(rng, i))
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, l

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, b, 0).compile()
    compile_s = time.perf_counter() - t0
    f_fwd = flops_lib.jaxpr_flops(fwd_only, params, b, rng)  # loops counted (scan_layers)
    mem = flops_lib.memory_summary(compiled)
    if compile_only:  # what the compiler says: compile time, per-step FLOPs and memory
        model_flops = 3 * f_fwd if f_fwd else None
        return dict(stage=stage, size=size, batch=batch, remat=remat, scan=scan,
                    attention=attention or "default", n_params=n_params, compile_s=compile_s,
                    model_tflops_per_step=model_flops / 1e12 if model_flops else None,
                    temp_gib=mem.get("temp_mib", 0) / 1024,
                    args_gib=mem.get("argument_mib", 0) / 1024,
                    device=jax.devices()[0].device_kind)
    params, opt, l = compiled(params, opt, b, 0)  # warm-up
    jax.block_until_ready(l)
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt, l = compiled(params, opt, b, i + 1)
    jax.block_until_ready(l)
    dt = (time.perf_counter() - t0) / steps
    peak = peak or flops_lib.peak_flops()
    model_flops = 3 * f_fwd if f_fwd else None
    return dict(stage=stage, size=size, batch=batch, remat=remat, scan=scan,
                attention=attention or "default", n_params=n_params, step_s=dt,
                examples_per_s=batch / dt, compile_s=compile_s, loss=float(l),
                model_tflops_per_step=model_flops / 1e12 if model_flops else None,
                tflops_per_s=model_flops / dt / 1e12 if model_flops else None,
                mfu=model_flops / dt / peak if model_flops and peak else None,
                temp_gib=mem.get("temp_mib", 0) / 1024, args_gib=mem.get("argument_mib", 0) / 1024,
                device=jax.devices()[0].device_kind)


def try_point(stage, size, batch, remat, scan, attention=None, steps=10, compile_only=False,
              peak=None):
    """run_point, with a failure (OOM or another error) returned as the point's `error`."""
    try:
        return run_point(stage, size, batch, remat, scan, attention, steps, compile_only, peak)
    except Exception as e:  # noqa: BLE001 -- an OOM ends this point, not the sweep
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
        return dict(stage=stage, size=size, batch=batch, remat=remat, scan=scan,
                    error="OOM" if oom else msg)


def sweep(stage, size, points, *, attention=None, steps=10, compile_only=False, peak=None,
          budget_s=None, on_row=None):
    """try_point over `points` ((scan, remat, batch) tuples, in order) -> the rows. A point
    larger than an OOM batch of the same scan / remat is skipped; with budget_s, a point is
    started only while the time left exceeds the longest point so far (the first always
    starts). Skipped points are rows with `skipped` (why). on_row(row) after each row."""
    t0, longest, oom = time.perf_counter(), 0.0, {}
    rows = []
    for scan, remat, batch in points:
        left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
        base = dict(stage=stage, size=size, batch=batch, remat=remat, scan=scan)
        if (scan, remat) in oom and batch > oom[(scan, remat)]:
            r = dict(base, skipped=f"larger than the OOM batch {oom[(scan, remat)]}")
        elif left is not None and rows and left < longest:
            r = dict(base, skipped=f"time budget: {left:.0f} s left, a point took up to "
                                   f"{longest:.0f} s")
        else:
            t = time.perf_counter()
            r = try_point(stage, size, batch, remat, scan, attention, steps, compile_only, peak)
            r["wall_s"] = time.perf_counter() - t
            longest = max(longest, r["wall_s"])
            if r.get("error") == "OOM":
                oom[(scan, remat)] = min(batch, oom.get((scan, remat), batch))
        rows.append(r)
        _print_row(r)
        if on_row is not None:
            on_row(r)
    return rows


def best_row(rows):
    """The measured row with the most examples/s (= the best MFU: a stage's model FLOPs per
    example do not depend on the batch), or None."""
    ok = [r for r in rows if r.get("examples_per_s")]
    return max(ok, key=lambda r: r["examples_per_s"]) if ok else None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=("prior", "decoder", "upsampler"), required=True)
    ap.add_argument("--size", default="karlo")
    ap.add_argument("--batch", default="64", help="comma-separated batch sizes")
    ap.add_argument("--remat", default="none", help="comma-separated: none, full, dots, ...")
    ap.add_argument("--scan", default="false", help="comma-separated true/false (prior only)")
    ap.add_argument("--attention", default=None, choices=("xla", "cudnn"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile-only", action="store_true",
                    help="compile each point and report compile time and memory, run nothing")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no point once the time left is under the longest point's")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    points = [(scan, remat, batch)
              for scan in [s.strip().lower() == "true" for s in args.scan.split(",")]
              for remat in args.remat.split(",")
              for batch in [int(x) for x in args.batch.split(",")]]

    def write(r):
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")

    return sweep(args.stage, args.size, points, attention=args.attention, steps=args.steps,
                 compile_only=args.compile_only, budget_s=args.budget_s, on_row=write)


def _print_row(r):
    head = f"{r['stage']:9s} {r['size']:6s} batch {r['batch']:5d} remat {r['remat']:5s} scan {str(r['scan'])[0]}"
    if "error" in r or "skipped" in r:
        print(f"{head}  {r.get('error') or 'skipped: ' + r['skipped']}", flush=True)
        return
    if "step_s" not in r:
        print(f"{head}  compile {r['compile_s']:.1f} s  temp {r['temp_gib']:.2f} GiB  args "
              f"{r['args_gib']:.2f} GiB  {r['model_tflops_per_step'] or 0:.2f} TFLOP/step  "
              f"({r['n_params'] / 1e6:.0f} M params)", flush=True)
        return
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    tf = f"{r['tflops_per_s']:.1f}" if r.get("tflops_per_s") else "n/a"
    print(f"{head}  {r['step_s'] * 1e3:8.1f} ms/step  {r['examples_per_s']:8.1f} ex/s  "
          f"{tf} TFLOP/s  MFU {mfu}  temp {r['temp_gib']:.1f} GiB  compile {r['compile_s']:.0f} s  "
          f"({r['n_params'] / 1e6:.0f} M params)", flush=True)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
