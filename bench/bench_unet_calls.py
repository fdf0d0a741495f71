"""Where one sampling step's network call spends its time, ours against diffusers', on this
machine, in this run: the UNet calls of bench_pipeline's pipelines (the decoder on the guided
batch, the first super-resolution UNet), split into their matrix products / convolutions and
the rest (norms, activations, attention's softmax, resizes, layout changes).

    python bench/bench_unet_calls.py --size small --batch 4
    python bench/bench_unet_calls.py --size fast-test --batch 4 --out results.jsonl

For each network:

* call ms -- ours: the jitted network function on the inputs the sampler gives it (the decoder
  on [cond, uncond], 2 x batch rows), median of repeated calls; diffusers: the median of the
  module's forward calls inside one `UnCLIPPipeline.__call__` (timed by forward hooks, so with
  the pipeline's own inputs);
* dense ms -- every matrix product / convolution of our call's jaxpr (`flops.jaxpr_ops`:
  grouped by shape, loops counted) timed alone, times its count, summed; the same shapes run
  by torch (`conv2d` on NCHW, `bmm`) summed the same way: what the call would take if
  everything else were free;
* rest ms -- call minus dense;
* in-call conv / rest thread-ms (ours, CPU) -- a profile of 3 calls (`jax.profiler.trace`, read
  back from its XSpace): the time of XLA:CPU's convolution kernels (the `ynn_fusion` thunks,
  XNNPACK convolutions with what XLA fused into them) and of every other thunk, per call,
  summed over the threads that ran them (independent thunks run side by side, so the two can
  add up to more than the call's wall time).

Prints a table and the ratios (> 1: ours is faster). Appends one JSON line to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_conv import median_ms as _median_ms  # noqa: E402
from bench_pipeline import GUIDANCE, SIZES, STEPS, build_pipelines  # noqa: E402


def torch_op(o, lhs, rhs):
    """The jaxpr op group `o` (from `flops.jaxpr_ops`: a matrix product or a 2-D convolution)
    as torch computes it, on operands `lhs` / `rhs` given in the op's own (JAX) layout:
    (run, to_jax) where run() is torch's computation (`conv2d` on NCHW / OIHW, `bmm` on
    [batch, m, k] x [batch, k, n]; the layout changes are made once, outside it) and
    to_jax(run()) is its result in the op's output layout. None when the op has no plain
    torch equivalent (lhs dilation, other ranks)."""
    import torch

    prm = o["params"]
    if o["primitive"] == "conv_general_dilated":
        dn = prm["dimension_numbers"]
        if len(dn.lhs_spec) != 4 or any(d != 1 for d in prm["lhs_dilation"]):
            return None
        x = torch.tensor(np.ascontiguousarray(np.transpose(lhs, dn.lhs_spec)))
        k = torch.tensor(np.ascontiguousarray(np.transpose(rhs, dn.rhs_spec)))
        (pt, pb), (pl, pr) = prm["padding"]
        sym = pt == pb and pl == pr
        kw = dict(stride=tuple(prm["window_strides"]), padding=(pt, pl) if sym else 0,
                  dilation=tuple(prm["rhs_dilation"]), groups=prm["feature_group_count"])
        if not sym:  # asymmetric padding: padded once, outside the timed call
            x = torch.nn.functional.pad(x, (pl, pr, pt, pb))

        def to_jax(y):  # NCHW -> the op's out_spec layout
            return np.transpose(y.numpy(), np.argsort(dn.out_spec))
        return (lambda: torch.nn.functional.conv2d(x, k, **kw)), to_jax
    (lc, rc), (lb, rb) = prm["dimension_numbers"]
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    bshape = [lhs.shape[d] for d in lb]
    m, kd = math.prod(lhs.shape[d] for d in lf), math.prod(lhs.shape[d] for d in lc)
    n = math.prod(rhs.shape[d] for d in rf)
    bt = math.prod(bshape)
    x = torch.tensor(np.ascontiguousarray(
        np.transpose(lhs, list(lb) + lf + list(lc)).reshape(bt, m, kd)))
    y = torch.tensor(np.ascontiguousarray(
        np.transpose(rhs, list(rb) + list(rc) + rf).reshape(bt, kd, n)))
    out_shape = bshape + [lhs.shape[d] for d in lf] + [rhs.shape[d] for d in rf]
    return (lambda: torch.bmm(x, y)), (lambda r: r.numpy().reshape(out_shape))


def dense_ms(fn, args, *, seconds: float = 0.05, torch_too: bool = True):
    """(ours, torch's) milliseconds of one call's matrix products / convolutions, each shape
    alone, summed with their counts, and the number of op groups."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.train.flops import jaxpr_ops

    ops = jaxpr_ops(fn, *args)
    rng = np.random.default_rng(0)
    ours = theirs = 0.0
    for o in ops:
        a, w = (jnp.asarray(rng.standard_normal(v.shape).astype(v.dtype))
                for v in (o["lhs"], o["rhs"]))
        f = jax.jit(lambda x, y, p=o["bind"], k=o["params"]: p.bind(x, y, **k))
        jax.block_until_ready(f(a, w))
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, w))
        reps = max(3, min(50, int(seconds / max(time.perf_counter() - t0, 1e-6))))
        ours += o["count"] * _median_ms(lambda: jax.block_until_ready(f(a, w)), reps)
        if torch_too:
            t = torch_op(o, np.asarray(a), np.asarray(w))
            if t is None:
                raise NotImplementedError(f"no torch equivalent of {o['primitive']} {o['params']}")
            theirs += o["count"] * _median_ms(t[0], reps)
    return ours, theirs, len(ops)


def profile_ms(jf, args, calls: int = 3) -> dict:
    """Per call: thread-ms of XLA:CPU's convolution thunks (`ynn_fusion*`) and of all other
    thunks of the jitted `jf(*args)`, from a `jax.profiler` trace of `calls` calls (CPU only)."""
    import glob
    import tempfile

    import jax
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    jax.block_until_ready(jf(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                jax.block_until_ready(jf(*args))
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    conv = rest = 0.0
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for ev in line.events:
                name = names.get(ev.metadata_id, "")
                if name.startswith(("ThunkExecutor", "$")) or not name:
                    continue  # the executor's own spans and Python frames enclose the thunks
                if name.startswith("ynn_fusion"):
                    conv += ev.duration_ps
                else:
                    rest += ev.duration_ps
    return dict(conv_ms=conv / 1e9 / calls, rest_ms=rest / 1e9 / calls)


class CallTimer:
    """Forward-hook timer of a torch module: wall ms of each forward call."""

    def __init__(self, module):
        self.ms, self._t = [], None
        self._h = [module.register_forward_pre_hook(self._pre),
                   module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t = time.perf_counter()

    def _post(self, *_):
        self.ms.append(1e3 * (time.perf_counter() - self._t))

    def remove(self):
        for h in self._h:
            h.remove()


def peer_call_ms(peer, prompts, steps=STEPS) -> dict:
    """Median forward ms of the peer's decoder and first super-res UNet inside one pipeline call
    (after a warm-up call)."""
    import torch

    def run():
        with torch.inference_mode():
            peer(prompts, prior_num_inference_steps=steps["prior"],
                 decoder_num_inference_steps=steps["decoder"],
                 super_res_num_inference_steps=steps["super_res"],
                 prior_guidance_scale=GUIDANCE["prior"], decoder_guidance_scale=GUIDANCE["decoder"],
                 generator=torch.Generator().manual_seed(0), output_type="np")
    run()
    timers = {"decoder": CallTimer(peer.decoder), "super_res": CallTimer(peer.super_res_first)}
    run()
    for t in timers.values():
        t.remove()
    return {k: statistics.median(t.ms) for k, t in timers.items()}


def our_calls(pipe, prompts):
    """{network: (jitted fn, args)} of our pipeline's decoder (guided batch) and first super-res
    UNet, on the inputs their samplers give them."""
    import jax
    import jax.numpy as jnp

    n = len(prompts)
    cond, uncond = pipe.text_conditioning(prompts)
    emb = jnp.zeros((n, cond["text_embed"].shape[1]))
    dc, du = pipe._decoder_inputs(emb, cond, uncond)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), dc, du)
    s = pipe.decoder.config.unet.sample_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2 * n, s, s, 3)), jnp.float32)
    t2 = jnp.full((2 * n,), 500, jnp.int32)
    out = {"decoder": (pipe._decoder_fn, (pipe.decoder.params, x, t2, both))}
    up = pipe.upsamplers[0]
    first_fn = pipe._sr_fns[0][0]
    s = up.sample_size
    xs = jnp.asarray(rng.standard_normal((n, s, s, 3)), jnp.float32)
    c = dict(low_res=xs)
    if up.noise_level_cond:
        c["noise_level"] = jnp.zeros((n,), jnp.int32)
    out["super_res"] = (first_fn, (up.first.params, xs, jnp.full((n,), 500, jnp.int32), c))
    return out


def run(size: str, batch: int, reps: int = 10) -> dict:
    import jax
    import torch

    from peers import UnCLIPArch

    torch.set_num_threads(os.cpu_count())
    peer, ours, info = build_pipelines(UnCLIPArch(**SIZES[size]))
    prompts = [f"a photo of thing number {i}" for i in range(batch)]
    res = dict(size=size, batch=batch, threads=os.cpu_count(), device=jax.devices()[0].device_kind,
               **info, nets={})
    for name, (fn, args) in our_calls(ours, prompts).items():
        jf = jax.jit(fn)
        call = _median_ms(lambda: jax.block_until_ready(jf(*args)), reps)
        d_ours, d_torch, groups = dense_ms(fn, args)
        res["nets"][name] = dict(ours_call_ms=call, ours_dense_ms=d_ours, torch_dense_ms=d_torch,
                                 op_groups=groups)
        if jax.devices()[0].platform == "cpu":
            prof = profile_ms(jf, args)
            res["nets"][name].update(ours_incall_conv_ms=prof["conv_ms"],
                                     ours_incall_rest_ms=prof["rest_ms"])
        print(f"{name}: ours {call:.1f} ms, dense {d_ours:.1f} ms (torch's on the same shapes "
              f"{d_torch:.1f} ms, {groups} shapes)", flush=True)
    for name, ms in peer_call_ms(peer, prompts).items():
        res["nets"][name]["torch_call_ms"] = ms
    return res


def table(res) -> str:
    rows = ["| network | ours call ms | ours dense ms | ours rest ms | torch call ms | "
            "torch dense ms | torch rest ms | call torch / ours | dense torch / ours | "
            "ours in-call conv thread-ms | ours in-call rest thread-ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["nets"].items():
        oc, od, tc, td = (r[k] for k in ("ours_call_ms", "ours_dense_ms", "torch_call_ms",
                                         "torch_dense_ms"))
        rows.append(f"| {name} | {oc:.1f} | {od:.1f} | {oc - od:.1f} | {tc:.1f} | {td:.1f} | "
                    f"{tc - td:.1f} | {tc / oc:.2f}x | {td / od:.2f}x | "
                    + " | ".join(f"{r[k]:.1f}" if k in r else "—"
                                 for k in ("ours_incall_conv_ms", "ours_incall_rest_ms")) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=[k for k, v in SIZES.items() if v], default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10, help="timed calls of each of our networks")
    ap.add_argument("--out", default="", help="append a JSON line with the results here")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.reps < 1:
        ap.error("--batch and --reps must be >= 1")
    res = run(a.size, a.batch, a.reps)
    print(table(res))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
