"""Where a training step's time goes, per demo stage: model FLOPs per step, the compiled step's
steady-state time, the trainer's loop time around it (host overhead), the achieved FLOP/s next
to two references measured in the same run — XLA:CPU's best FLOP/s on the stage's dominant
conv / matmul shapes alone, and the same training step in PyTorch — as a markdown table.

    python bench/bench_stage_steps.py [--stages clip,prior,decoder,upsampler] [--steps N]

Each stage is read from `configs/<stage>.py:size=demo` at run time (shapes, patch size,
prediction, batch: whatever the config says) and trained by the real trainer
(`unclip_jax.stages.build_stage` + `unclip_jax.train.trainer.train`) for (1 + windows) x K steps
(K = ceil(steps / windows)) into a scratch directory, on the shapes data. The trainer's own
windows (its steps/s between two log steps: batches made on the host,
`make_array_from_process_local_data`, the step, a metrics fetch per window) are the *loop* time.
Between two windows, with the trainer's clock paused (its `on_log` hook), the bench times K
steps of each of, in rotating order:

  step     the trainer's compiled step `(state, batch, frozen) -> state` on a copy of its state
           (packed on one device: train/packed.py) and its last batch, block_until_ready at the
           end (no host work)
  update   the step's second half alone, as the step runs it (trainer.make_update): optimizer,
           EMA and metric norms on fixed gradients (grad = step - update)
  host     the loop's host work alone: K batches from the stage's `batches` and their device
           arrays (jax.make_array_from_process_local_data), as the trainer makes them
  torch    the same training step in PyTorch (`torch_peer` of bench/stage_steps_torch.py: the same network and sizes built
           from the stage's config, the same batch, AdamW + clipping + EMA; the loss may be a
           plain MSE where ours is fancier: printed per stage)
  ops      each dominant conv / matmul shape of the loss's forward jaxpr alone under jax.jit
           (`flops.jaxpr_ops`: grouped by shape, ranked by FLOPs), and a 1024^3 matmul
  matmuls  every conv / matmul shape of the gradient computation's jaxpr (forward and
           backward; --cover of its FLOPs, at most --max-ops shapes) alone, times its count
           per step, summed: the step's time if everything else were free

and with --before also the pre-fix step and update (the per-parameter state layout, as
`pack_state=False` runs) and host batches (tokenization without the token cache). Every figure
of a stage comes from these interleaved windows (loop, step, update, host, torch, ops, matmuls,
loop, ...): medians over the windows after a warm-up one; "loop - step" and "before / after"
are medians of window-by-window (adjacent in time) differences / ratios. FLOPs are the
trainer's (`_model_flops_per_device`: 3 x the loss's forward matrix products / convolutions,
frozen CLIP inside the prior's and decoder's loss counted as trained). The prior and the
decoder need a trained CLIP: the CLIP stage's run provides it (or a 2-step CLIP run when clip is
not benchmarked, or --workdir W with W/clip). torch runs with OMP_WAIT_POLICY=PASSIVE unless
set (see --omp-wait-policy). Prints the tables of docs/PERFORMANCE.md; --out appends JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: the PyTorch peers
STAGES = ("clip", "prior", "decoder", "upsampler")


def _load():
    return "%.2f %.2f %.2f" % os.getloadavg()


def _n_params(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# the probe: what runs between the trainer's windows

class Probe:
    def __init__(self, stage, config, *, k: int, windows: int, top_ops: int, torch_on: bool,
                 channels_last: bool, before: bool = False, cover: float = 0.99,
                 max_ops: int = 60):
        self.before, self.cover, self.max_ops = before, cover, max_ops
        self.stage, self.config, self.k, self.windows = stage, config, k, windows
        self.top_ops, self.torch_on, self.channels_last = top_ops, torch_on, channels_last
        self.calls = 0
        self.times: dict[str, list[float]] = {}
        self.loop_ms: list[float] = []
        self.info: dict = {}

    def _setup_before(self, probe, mesh):
        """The pre-fix step, update and host batches, to time interleaved with the current ones:
        the per-parameter state layout (the trainer with pack_state=False) and tokenization
        without the token cache."""
        import jax
        import jax.numpy as jnp

        from unclip_jax.train.optim import make_optimizer
        from unclip_jax.train.sharding import get_rules
        from unclip_jax.train.trainer import make_train_step, make_update

        stage, cfg, packing = self.stage, self.config, probe.get("packing")
        if packing is None:
            return
        rules = get_rules(cfg.sharding if isinstance(cfg.sharding, str) else list(cfg.sharding))
        tx, schedule = make_optimizer(cfg.optimizer, int(cfg.total_steps),
                                      stage.trainable(probe["params"]))
        with jax.set_mesh(mesh):
            self.b_state = jax.jit(packing.unpack_state)(self.state)
            self.b_step = jax.jit(make_train_step(stage, tx, schedule, cfg, mesh, rules),
                                  donate_argnums=(0,)).lower(
                self.b_state, self.batch, self.frozen).compile()
            self.b_upd_state = jax.tree.map(jnp.copy, self.b_state)
            self.b_grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), self.b_state.params)
            self.b_update = jax.jit(make_update(tx, schedule, cfg), donate_argnums=(0,)).lower(
                self.b_upd_state, self.b_grads).compile()

    # -- set up on the first call -------------------------------------------------------------
    def _setup(self, probe):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from unclip_jax.train import flops as flops_lib
        from unclip_jax.train.sharding import make_mesh

        stage, cfg = self.stage, self.config
        self.step_fn, self.batch, self.frozen = probe["step_fn"], probe["batch"], probe["frozen"]
        self.state = jax.tree.map(jnp.copy, probe["state"])
        params = probe["params"]  # the per-parameter tree (the state may be packed)
        packing = probe.get("packing")
        self.info["step_flops"] = probe["step_flops"]
        self.info["params"] = _n_params(params)
        self.info["leaves"] = len(jax.tree.leaves(params))
        self.info["packed"] = packing is not None
        self.info["state_buffers"] = len(jax.tree.leaves(self.state))

        # the step's second half alone (trainer.make_update, as the step runs it): optimizer,
        # EMA and the metric norms on fixed gradients (grad = step - update)
        mesh = make_mesh(dict(cfg.mesh))
        with jax.set_mesh(mesh):
            self.grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), self.state.params)
            self.upd_state = jax.tree.map(jnp.copy, self.state)
            self.update_c = jax.jit(probe["update"], donate_argnums=(0,)).lower(
                self.upd_state, self.grads).compile()
        if self.before:
            self._setup_before(probe, mesh)

        # the loop's host work alone: the stage's next batch and its device arrays, as the
        # trainer makes them (from a step far from the trainer's own)
        from unclip_jax.train.sharding import batch_sharding

        self.bsh = batch_sharding(mesh)
        self.host_gen = stage.batches(batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                                      start_step=100_000, process_index=0, process_count=1)

        # the forward loss's dominant ops, each alone
        loss0 = lambda p, b, f: stage.loss(p, b, jax.random.key(0), f)[0]  # noqa: E731
        ops = flops_lib.jaxpr_ops(loss0, params, self.batch, self.frozen)
        fwd = sum(o["total_flops"] for o in ops)
        self.info["fwd_flops"] = fwd
        if hasattr(stage, "conditioning") and self.frozen is not None and "image" in self.batch:
            self.info["frozen_fwd_flops"] = flops_lib.jaxpr_flops(
                lambda f, b: stage.conditioning(f, b), self.frozen, self.batch)
        self.ops = []
        rng = np.random.default_rng(0)
        for o in ops[:self.top_ops]:
            a = jnp.asarray(rng.standard_normal(o["lhs"].shape), o["lhs"].dtype)
            w = jnp.asarray(rng.standard_normal(o["rhs"].shape), o["rhs"].dtype)
            prim, prm = o["bind"], o["params"]
            fn = jax.jit(lambda x, y, prim=prim, prm=prm: prim.bind(x, y, **prm))
            self.ops.append(dict(name=_op_name(o), flops=o["flops"],
                                 share=o["total_flops"] / fwd if fwd else 0.0,
                                 count=o["count"], fn=fn, args=(a, w)))
        big = jnp.asarray(rng.standard_normal((1024, 1024)), jnp.float32)
        self.ops.append(dict(name="matmul 1024x1024 @ 1024x1024 (peak reference)",
                             flops=2.0 * 1024 ** 3, share=None, count=None,
                             fn=jax.jit(lambda x, y: x @ y), args=(big, big)))
        for op in self.ops:  # compile, warm up, and pick repetitions filling ~0.1 s
            op["reps"] = _reps(op["fn"], op["args"], 0.1, 3)

        # every matrix product / convolution of the step's gradient computation (forward and
        # backward, frozen CLIP forward only: the jaxpr of value_and_grad(loss)), each shape
        # alone: their time summed over a step is what the step would take if everything else
        # (elementwise work, norms, layout changes, the update) were free
        gfn = jax.value_and_grad(lambda p, b, f: stage.loss(p, b, jax.random.key(0), f)[0])
        gops = flops_lib.jaxpr_ops(gfn, params, self.batch, self.frozen)
        total = sum(o["total_flops"] for o in gops)
        self.gops, acc = [], 0.0
        for o in gops:
            if acc >= self.cover * total or len(self.gops) >= self.max_ops:
                break
            acc += o["total_flops"]
            args = tuple(jnp.asarray(rng.standard_normal(v.shape).astype(v.dtype))
                         for v in (o["lhs"], o["rhs"]))
            prim, prm = o["bind"], o["params"]
            fn = jax.jit(lambda x, y, prim=prim, prm=prm: prim.bind(x, y, **prm))
            self.gops.append(dict(fn=fn, args=args, count=o["count"],
                                  reps=_reps(fn, args, 0.004, 1)))
        self.info.update(grad_jaxpr_flops=total, grad_ops_covered=acc / total if total else 0.0,
                         grad_op_groups=len(self.gops), grad_op_groups_all=len(gops))

        if self.torch_on:
            from stage_steps_torch import torch_peer

            host = {k: np.asarray(v) for k, v in self.batch.items()}
            try:
                self.torch_step, n_torch, what = torch_peer(stage, cfg, host,
                                                            channels_last=self.channels_last)
                self.info["torch_params"], self.info["torch_what"] = n_torch, what
                trained = stage.trainable(params)
                self.info["params_trained"] = self.info["params"] if trained is None else int(
                    sum(np.prod(p.shape) for p, t in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(trained)) if t))
            except NotImplementedError as e:
                self.torch_step = None
                self.info["torch_what"] = f"no peer: {e}"
        # warm-up of everything timed
        for name, fn in self.methods():
            fn(1)

    def methods(self):
        import jax

        k = self.k

        def looped(attr, fn, *args):  # n calls of fn on the state held in self.<attr>
            def run(n=k):
                s = getattr(self, attr)
                for _ in range(n):
                    s, _m = fn(s, *args)
                jax.block_until_ready(s)
                setattr(self, attr, s)
            return run

        step = looped("state", self.step_fn, self.batch, self.frozen)
        update = looped("upd_state", self.update_c, self.grads)

        def host(n=k):
            import numpy as np

            arrays = None
            for _ in range(n):
                hb, _skipped = next(self.host_gen)
                arrays = {key: jax.make_array_from_process_local_data(self.bsh, np.asarray(v))
                          for key, v in hb.items()}
            jax.block_until_ready(arrays)

        out = [("step", step), ("update", update), ("host", host)]
        if self.before and getattr(self, "b_step", None) is not None:
            step_before = looped("b_state", self.b_step, self.batch, self.frozen)
            update_before = looped("b_upd_state", self.b_update, self.b_grads)
            out += [("step_before", step_before), ("update_before", update_before)]
        if self.before:
            def host_before(n=k):
                import warnings

                from unclip_jax.data.tokenizer import tokenize
                from unclip_jax.stages import clip as clip_mod, conditioning, decoder

                def old_tokenize_captions(tokenizer, captions, context_length):
                    # tokenize_captions before the token cache: two tokenizer passes, no cache
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ids, mask = tokenize(tokenizer, list(captions), context_length)
                    return ids, mask.astype(bool)

                mods = (clip_mod, conditioning, decoder)
                saved = [m.tokenize_captions for m in mods]
                for m in mods:
                    m.tokenize_captions = old_tokenize_captions
                try:
                    host(n)
                finally:
                    for m, f in zip(mods, saved):
                        m.tokenize_captions = f

            out.append(("host_before", host_before))
        if self.torch_on and getattr(self, "torch_step", None) is not None:
            def torch_(n=k):
                for _ in range(n):
                    self.torch_step.step()
            out.append(("torch", torch_))
        for i, op in enumerate(self.ops):
            def run(n=None, op=op):
                r = op["reps"] if n is None or n != 1 else 1
                y = None
                for _ in range(r):
                    y = op["fn"](*op["args"])
                jax.block_until_ready(y)
            out.append((f"op{i}", run))
        out.append(("matmuls", lambda n=None: self._matmuls()))
        return out

    def _matmuls(self):
        """ms of one step's matrix products / convolutions, each shape alone, summed."""
        import jax

        total = 0.0
        for op in self.gops:
            t0 = time.perf_counter()
            y = None
            for _ in range(op["reps"]):
                y = op["fn"](*op["args"])
            jax.block_until_ready(y)
            total += (time.perf_counter() - t0) / op["reps"] * op["count"]
        return 1000.0 * total

    def on_log(self, step, metrics, probe):
        self.calls += 1
        self.loop_ms.append(1000.0 / metrics["steps_per_s"])
        if self.calls == 1:
            t0 = time.perf_counter()
            self._setup(probe)
            self.info["setup_s"] = time.perf_counter() - t0
            return
        methods = self.methods()
        r = (self.calls - 2) % len(methods)  # rotate the order window by window
        for name, fn in methods[r:] + methods[:r]:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            n = self.ops[int(name[2:])]["reps"] if name.startswith("op") else self.k
            self.times.setdefault(name, []).append(out if name == "matmuls"
                                                   else 1000.0 * dt / n)
        self.info.setdefault("load", []).append(os.getloadavg()[0])

    # -- results -------------------------------------------------------------------------------
    def result(self) -> dict:
        med = {k: statistics.median(v) for k, v in self.times.items()}
        loop = statistics.median(self.loop_ms[1:]) if len(self.loop_ms) > 1 else float("nan")
        flops = self.info.get("step_flops") or float("nan")
        ops = []
        for i, op in enumerate(self.ops):
            ms = med.get(f"op{i}", float("nan"))
            ops.append(dict(name=op["name"], share=op["share"], count=op["count"], ms=ms,
                            gflops=op["flops"] / ms / 1e6))
        shape_ops = [o for o in ops if o["share"] is not None]
        best = max(shape_ops, key=lambda o: o["gflops"]) if shape_ops else None
        # paired figures: window i of one method against window i of another (adjacent in
        # time), robust to the machine's load drifting between windows
        step_w = self.times.get("step", [])
        loops = self.loop_ms[1:]
        host_paired = (statistics.median([a - b for a, b in zip(loops, step_w)])
                       if loops and step_w else float("nan"))
        ratios = [b / a for a, b in zip(step_w, self.times.get("step_before", []))]
        before_ratio = (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None
        return dict(
            stage=self.stage.name, batch=int(self.config.batch_size),
            gflop=flops / 1e9, step_ms=med.get("step"), loop_ms=loop,
            host_ms=host_paired, batches_ms=med.get("host"), before_ratio=before_ratio,
            matmuls_ms=med.get("matmuls"),
            grad_ms=med["step"] - med["update"] if "update" in med else None,
            update_ms=med.get("update"), torch_ms=med.get("torch"),
            achieved=flops / med["step"] / 1e6 if med.get("step") else float("nan"),
            roofline=best, peak=ops[-1] if ops else None, ops=ops, windows=len(self.loop_ms) - 1,
            k=self.k, raw=self.times, raw_loop=self.loop_ms,
            before={k: med.get(f"{k}_before") for k in ("step", "update", "host")}, **{
                k: v for k, v in self.info.items() if k != "load"},
            load=self.info.get("load", []))


def _reps(fn, args, seconds: float, least: int) -> int:
    """Compile and warm up fn(*args); the repetitions that fill about `seconds`."""
    import jax

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return max(least, min(200, int(seconds / max(time.perf_counter() - t0, 1e-6))))


def _op_name(o) -> str:
    lhs, rhs = o["lhs"].shape, o["rhs"].shape
    if o["primitive"] == "conv_general_dilated":
        dn = o["params"]["dimension_numbers"]
        k = [rhs[i] for i in dn.rhs_spec[2:]]
        cin, cout = rhs[dn.rhs_spec[1]], rhs[dn.rhs_spec[0]]
        st = o["params"]["window_strides"]
        return (f"conv {'x'.join(map(str, k))} {cin}->{cout} on "
                f"[{', '.join(map(str, lhs))}]" + (f" stride {st[0]}" if max(st) > 1 else ""))
    (lc, rc), (lb, rb) = o["params"]["dimension_numbers"]
    return f"dot [{', '.join(map(str, lhs))}] x [{', '.join(map(str, rhs))}]" + (
        f" (batch {list(lb)})" if lb else "")


# ---------------------------------------------------------------------------------------------

def stage_config(stage: str, scratch: str, total: int, log_every: int, clip_dir: str,
                 num_examples: int):
    from unclip_jax.train.config import load_config

    over = [f"data.cache_dir={os.path.join(scratch, 'data')}",
            f"data.num_examples={num_examples}", f"total_steps={total}",
            f"log_every={log_every}", "checkpoint.every=1000000", "checkpoint.async_save=False",
            "sample_every=0"]
    if stage in ("prior", "decoder"):
        over.append(f"clip_dir={clip_dir}")
    return load_config(os.path.join(HERE, "configs", f"{stage}.py") + ":size=demo", over)


def describe(cfg) -> str:
    """The shapes that decide a stage's cost, as its config says them."""
    m = cfg.model
    if cfg.stage == "clip":
        return (f"text {m.text.hidden_size} x {m.text.num_layers}, vision {m.vision.hidden_size} x "
                f"{m.vision.num_layers} at {m.vision.image_size} px / {m.vision.patch_size}")
    if cfg.stage == "prior":
        return f"{m.num_layers} layers x {m.num_heads} x {m.head_dim}, {m.num_text_tokens} tokens"
    u = m.unet if cfg.stage == "decoder" else m
    s = (f"{tuple(u.block_out_channels)} at {u.sample_size} px, {u.layers_per_block} res/level"
         f", patch {u.get('patch_size', 1)}")
    if cfg.stage == "decoder":
        s += f", {cfg.diffusion.prediction}"
    return s


def table(results) -> str:
    h = ("| stage | batch | GFLOP/step | JAX step ms | JAX loop ms (host overhead) | "
         "achieved GFLOP/s | roofline GFLOP/s (dominant shape) | torch step ms | "
         "torch/JAX ratio |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        rf = r["roofline"]
        roof = f"{rf['gflops']:.0f} ({rf['name']})" if rf else "—"
        tm = r.get("torch_ms")
        rows.append(
            f"| {r['stage']} | {r['batch']} | {r['gflop']:.2f} | {r['step_ms']:.1f} | "
            f"{r['loop_ms']:.1f} ({r['host_ms']:+.1f}) | {r['achieved']:.1f} | {roof} | "
            + (f"{tm:.1f} | {tm / r['step_ms']:.2f}x |" if tm else "— | — |"))
    return h + "\n".join(rows)


def detail(results) -> str:
    out = ["| stage | step ms | update ms (optimizer + EMA + norms, alone) | grad ms (step - "
           "update) | its convs / matmuls, each shape alone, summed ms (share of the grad "
           "jaxpr's FLOPs timed) | the rest ms (step - update - convs / matmuls) | loop - step ms "
           "(paired) | host batches ms (alone) | params (leaves) | torch params | frozen CLIP "
           "share of FLOPs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fz = r.get("frozen_fwd_flops")
        out.append(
            f"| {r['stage']} | {r['step_ms']:.1f} | {r['update_ms']:.2f} | {r['grad_ms']:.1f} | "
            f"{r['matmuls_ms']:.1f} ({r['grad_ops_covered']:.0%}) | "
            f"{r['grad_ms'] - r['matmuls_ms']:.1f} | "
            f"{r['host_ms']:+.1f} | {r['batches_ms']:.2f} | "
            f"{r['params']:,} ({r['leaves']}) | "
            + (f"{r['torch_params']:,}" if r.get("torch_params") else "—") + " | "
            + (f"{fz / r['fwd_flops']:.0%}" if fz else "—") + " |")
    out += ["", "| stage | op (forward, batch included) | share of the step's FLOPs | runs/step "
            "| ms | GFLOP/s |", "|---|---|---|---|---|---|"]
    for r in results:
        for o in r["ops"]:
            share = f"{o['share']:.0%}" if o["share"] is not None else "—"
            cnt = f"{o['count']:g}" if o["count"] is not None else "—"
            out.append(f"| {r['stage']} | {o['name']} | {share} | {cnt} | {o['ms']:.3f} | "
                       f"{o['gflops']:.0f} |")
    return "\n".join(out)


def before_after(results) -> str:
    out = ["| stage | step ms, per-parameter state (before) | step ms, packed (after) | before / "
           "after, paired windows: median (range) | update ms before | update ms after | state "
           "buffers after | host batches ms, uncached tokens (before) | host batches ms (after) |",
           "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d=1: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in results:
        b = r.get("before") or {}
        br = r.get("before_ratio")
        out.append(f"| {r['stage']} | {f(b.get('step'))} | {f(r['step_ms'])} | "
                   + (f"{br[0]:.3f} ({br[1]:.2f}-{br[2]:.2f}) | " if br else "— | ")
                   + f"{f(b.get('update'), 2)} | {f(r['update_ms'], 2)} | {r['state_buffers']} | "
                   + f"{f(b.get('host'), 2)} | {f(r['batches_ms'], 2)} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--steps", type=int, default=30,
                    help="measured steps per method and stage (split over --windows)")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--top-ops", type=int, default=3, help="dominant op shapes timed alone")
    ap.add_argument("--cover", type=float, default=0.95,
                    help="time the gradient jaxpr's conv / matmul shapes up to this share of "
                         "its FLOPs ...")
    ap.add_argument("--max-ops", type=int, default=40, help="... and at most this many shapes")
    ap.add_argument("--num-examples", type=int, default=512, help="shapes examples rendered")
    ap.add_argument("--workdir", default="", help="a workdir holding clip/ (else trained here)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--before", action="store_true",
                    help="also time the pre-fix step / update (per-parameter state) and host "
                         "batches (no token cache), interleaved (one more compile per stage)")
    ap.add_argument("--channels-last", action="store_true", help="torch UNets channels_last")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for torch's OpenMP threads unless set ('' = leave "
                         "OpenMP's default, active spinning: on cores shared with other jobs it "
                         "made torch's 2-thread step ~20x slower)")
    ap.add_argument("--out", default="", help="append the results as JSON lines here")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}; expected some of {STAGES}")

    if args.omp_wait_policy:  # before torch loads OpenMP
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    import jax
    import torch

    torch.set_num_threads(2)
    from unclip_jax.stages import build_stage
    from unclip_jax.train.trainer import train

    k = max(2, math.ceil(args.steps / args.windows))
    total = k * (1 + args.windows)
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind} x {jax.device_count()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}; "
          f"{args.windows} windows of {k} steps; load {_load()}",
          flush=True)
    results = []
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_stage_steps_") as scratch:
        clip_dir = os.path.join(args.workdir, "clip") if args.workdir else \
            os.path.join(scratch, "clip")
        if not args.workdir and "clip" not in stages and {"prior", "decoder"} & set(stages):
            cfg = stage_config("clip", scratch, 2, 1, clip_dir, args.num_examples)
            train(build_stage(cfg, scratch), cfg, scratch, progress=False)
        for name in STAGES:
            if name not in stages:
                continue
            t0 = time.time()
            cfg = stage_config(name, scratch, total, k, clip_dir, args.num_examples)
            work = scratch if name == "clip" and not args.workdir else os.path.join(scratch, "w")
            stage = build_stage(cfg, work)
            probe = Probe(stage, cfg, k=k, windows=args.windows, top_ops=args.top_ops,
                          torch_on=not args.no_torch, channels_last=args.channels_last,
                          before=args.before, cover=args.cover, max_ops=args.max_ops)
            train(stage, cfg, work, progress=False, on_log=probe.on_log)
            r = probe.result()
            r["config"] = describe(cfg)
            r["seconds"] = time.time() - t0
            results.append(r)
            print(f"[{name}] {r['config']}; batch {r['batch']}: step {r['step_ms']:.1f} ms, "
                  f"loop {r['loop_ms']:.1f} ms, grad {r['grad_ms']:.1f}, update "
                  f"{r['update_ms']:.2f}, host batches {r['batches_ms']:.2f}, torch "
                  f"{r.get('torch_ms') or float('nan'):.1f} ms; "
                  f"{r['gflop']:.2f} GFLOP/step; {r['seconds']:.0f} s (probe set-up "
                  f"{r.get('setup_s', 0):.0f} s); load {_load()}",
                  flush=True)
            if r.get("torch_params"):
                ours = r.get("params")
                print(f"[{name}] params: ours {ours:,}, torch {r['torch_params']:,}"
                      + ("" if ours == r["torch_params"] else "  (DIFFERENT)"), flush=True)
            print(f"[{name}] torch: {r.get('torch_what')}", flush=True)
            print(f"[{name}] state buffers {r['state_buffers']} (packed: {r['packed']}); grad "
                  f"jaxpr {r['grad_jaxpr_flops'] / 1e9:.2f} GFLOP in {r['grad_op_groups_all']} "
                  f"conv / matmul shapes, {r['grad_op_groups']} timed "
                  f"({r['grad_ops_covered']:.0%} of its FLOPs)", flush=True)
    print(f"\nload average at the end: {_load()}; total {time.time() - t_all:.0f} s\n")
    print(table(results))
    print()
    print(detail(results))
    if args.before:
        print()
        print(before_after(results))
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({k: v for k, v in r.items()}, default=str) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
