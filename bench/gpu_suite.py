"""The open GPU rows of docs/PERFORMANCE.md (Karlo-size sampling against diffusers, training MFU)
in one call on one H100 / H200, within a 9-minute budget:

    python bench/gpu_suite.py --out $OUT/gpu_suite.json      # GPU: Karlo sizes
    python bench/gpu_suite.py --dry-run --out /tmp/dry.json  # CPU: the same code, tiny sizes

Parts, each in its own process (its own device memory, peak-memory counters and compilation
cache, started empty so compile times are cold) and with its own time budget:

- sampling: `bench_pipeline.run_bench` at Karlo's size (random weights), batch 8, steps 25/25/7,
  ours in bfloat16 against diffusers' UnCLIPPipeline in float16 on the same weights: images/s
  of both and their ratio (ours / theirs), peak device memory of both (jax's
  `peak_bytes_in_use`, torch's `max_memory_allocated`), our compile time, the fraction of the
  peak-FLOP/s limit each reaches, per-stage times.
- mfu_prior, mfu_decoder: `bench_mfu.sweep`, the training step at Karlo's size over a short
  list of (scan, remat, batch) points (PROFILES below); the best point (most examples/s = best
  MFU), the largest batch that ran and the smallest that did not fit.

A part's process is stopped at its budget (what it had measured is kept: each part writes its
figures as it goes); a part that fails (an OOM, no diffusers, a torch without CUDA) is recorded
with its error and the suite goes on. Writes ONE results file (--out, JSON: every figure, the
command, the machine, each part's status / error / wall and CPU seconds) and the Markdown
tables next to it (same name, .md), also printed.

--dry-run: the same parts through the same functions on the CPU (JAX_PLATFORMS=cpu, torch
without CUDA), float32, at tiny sizes: bench_pipeline's fast-test stack with a few sampling
steps, bench_mfu at configs' `tiny` size (two points on the prior, one on the decoder, 1-2
steps). CI runs it (tests/test_gpu_suite.py); its figures only show that the code runs.
Exit status: 0 when every part is ok, else 1 (the files are written either way).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_startup import child_env  # noqa: E402  (no jax, torch or bench_pipeline imported)

#: What each part runs and its time budget (s). GPU: one H100 / H200, 9 minutes in all; the MFU
#: points in the order they are tried (the budget decides how many run): (scan_layers, remat,
#: batch); scan applies to the prior only.
PROFILES = {
    "gpu": dict(
        total_budget_s=540,
        sampling=dict(budget_s=250, size="karlo", batch=8, repeats=2, steps=None),
        mfu_prior=dict(budget_s=120, stage="prior", size="karlo", steps=5, points=[
            (True, "none", 256), (True, "dots", 512), (True, "none", 512),
            (True, "dots", 1024)]),
        mfu_decoder=dict(budget_s=145, stage="decoder", size="karlo", steps=5, points=[
            (False, "none", 32), (False, "full", 64), (False, "none", 64),
            (False, "full", 128)]),
    ),
    "dry": dict(
        total_budget_s=600,
        # our decoder gives these random weights non-finite pixels at 2-3 steps (diffusers'
        # does not; at 5 steps both are finite)
        sampling=dict(budget_s=300, size="fast-test", batch=2, repeats=1,
                      steps=dict(prior=2, decoder=5, super_res=2)),
        # the sweep's two points on the prior; one on the decoder (its step alone compiles in
        # 11-18 s on the 2-core CPU)
        mfu_prior=dict(budget_s=150, stage="prior", size="tiny", steps=2, points=[
            (False, "none", 2), (True, "full", 4)]),
        mfu_decoder=dict(budget_s=150, stage="decoder", size="tiny", steps=1, points=[
            (False, "none", 2)]),
    ),
}
PARTS = ("sampling", "mfu_prior", "mfu_decoder")
GRACE_S = 15  # a part's process is killed this long after its budget (its own checks stop it)


# ---------------------------------------------------------------- the parts (child processes)
def run_sampling(spec: dict, publish) -> tuple[str, dict, str | None]:
    import bench_pipeline

    res = bench_pipeline.run_bench(spec["size"], spec["batch"], repeats=spec["repeats"],
                                   steps=spec["steps"], peak=spec.get("peak_flops"),
                                   catch_peer=True, progress=lambda r: publish(dict(r)))
    bench_pipeline.report(res)
    err = res.get("peer_error")
    return ("partial" if err else "ok"), res, err


def run_mfu(spec: dict, publish, deadline: float) -> tuple[str, dict, str | None]:
    import bench_mfu

    rows = []

    def summary():
        ran = [r for r in rows if r.get("step_s")]
        oom = [r["batch"] for r in rows if r.get("error") == "OOM"]
        big = max(ran, key=lambda r: r["batch"]) if ran else None
        return dict(stage=spec["stage"], size=spec["size"], steps=spec["steps"], rows=rows,
                    best=bench_mfu.best_row(rows),
                    largest_batch_ran=None if big is None else {
                        k: big[k] for k in ("batch", "remat", "scan")},
                    smallest_oom_batch=min(oom) if oom else None)

    def on_row(r):
        rows.append(r)
        publish(summary())

    points = [tuple(p) for p in spec["points"]]
    bench_mfu.sweep(spec["stage"], spec["size"], points, steps=spec["steps"],
                    peak=spec.get("peak_flops"), budget_s=max(0.0, deadline - time.time()),
                    on_row=on_row)
    res = summary()
    if res["best"] is None:
        errors = [r.get("error") or r.get("skipped") for r in rows]
        return "failed", res, "no point ran: " + "; ".join(str(e) for e in errors)
    return "ok", res, None


def child_main(part: str, spec: dict, out: str, deadline: float) -> int:
    """Run one part, writing {status, result, error} to `out` after every measured phase."""
    state = dict(part=part, status="running", result=None, error=None)

    def save():
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, out)

    def publish(result):
        state["result"] = result
        save()

    save()
    try:
        import jax

        state["device"] = dict(kind=jax.devices()[0].device_kind,
                               platform=jax.devices()[0].platform, count=jax.device_count())
        if part == "sampling":
            status, result, err = run_sampling(spec, publish)
        else:
            status, result, err = run_mfu(spec, publish, deadline)
        state.update(status=status, result=result, error=err)
    except Exception as e:  # noqa: BLE001 -- recorded; the suite goes on with the next part
        import traceback

        state.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                     traceback=traceback.format_exc()[-4000:])
    save()
    return 0


# ---------------------------------------------------------------- the suite (parent process)
def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax", "torch",
                 "diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _nvidia_smi() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def _run_part(part: str, spec: dict, budget_s: float, dry: bool, tmp: str) -> dict:
    """The part in a child process, its output streamed with a [part] prefix; killed at
    budget_s + GRACE_S. -> the part's record for the results file."""
    out = os.path.join(tmp, f"{part}.json")
    env = child_env(os.path.join(tmp, f"xla_cache_{part}"), None)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's CPU threads beside other jobs
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if dry:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    elif part == "sampling":  # jax allocates as it goes: torch shares the device
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    set_env = {k: env[k] for k in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "OMP_WAIT_POLICY",
                                   "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS") if k in env}
    started = time.time()
    deadline = started + budget_s
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, "--child-out", out,
           "--child-spec", json.dumps(spec), "--child-deadline", f"{deadline:.3f}"]
    cpu0 = _children_cpu()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    tail: deque[str] = deque(maxlen=40)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(f"[{part}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=budget_s + GRACE_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started above
        rc = proc.wait()
    reader.join(timeout=10)
    rec = dict(status="failed", budget_s=budget_s, wall_s=time.time() - started,
               cpu_s=_children_cpu() - cpu0, spec=spec, env=set_env, result=None, error=None)
    try:
        with open(out, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    rec.update({k: state[k] for k in ("status", "result", "error", "traceback", "device")
                if k in state})
    if timed_out:
        kept = ("the figures measured by then are kept" if rec["result"]
                else "nothing was measured by then")
        rec.update(status="timeout", error=f"stopped at its time budget ({budget_s:.0f} s + "
                                           f"{GRACE_S} s); {kept}")
    elif rc != 0 or rec["status"] == "running":
        rec.update(status="failed", error=f"the part's process exited with {rc}: "
                                          + " | ".join(list(tail)[-5:]))
    return rec


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_suite(argv: list[str], args) -> dict:
    mode = "dry" if args.dry_run else "gpu"
    profile = PROFILES[mode]
    total = args.budget_s or profile["total_budget_s"]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in PARTS:
            raise SystemExit(f"unknown part {p!r}; parts: {', '.join(PARTS)}")
    results = dict(
        suite="bench/gpu_suite.py", mode=mode,
        command=shlex.join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd())]
                           + argv),
        cwd=os.getcwd(), python=sys.executable,
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), total_budget_s=total,
        machine=dict(nvidia_smi=_nvidia_smi(), cpu_count=os.cpu_count(),
                     load_avg_before=os.getloadavg()[0], versions=_versions()),
        parts={})
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        for part in parts:
            spec = dict(profile[part])
            budget = spec.pop("budget_s")
            if args.peak_tflops:
                spec["peak_flops"] = args.peak_tflops * 1e12
            left = total - (time.time() - t0)
            if left < 20:
                results["parts"][part] = dict(status="skipped", spec=spec, result=None,
                                              error=f"the suite's {total:.0f} s were spent")
                continue
            budget = min(budget, left - GRACE_S)
            print(f"== {part}: budget {budget:.0f} s", flush=True)
            rec = _run_part(part, spec, budget, args.dry_run, tmp)
            results["parts"][part] = rec
            print(f"== {part}: {rec['status']} in {rec['wall_s']:.1f} s"
                  + (f" ({rec['error']})" if rec.get("error") else ""), flush=True)
    devices = [r["device"] for r in results["parts"].values() if r.get("device")]
    results["machine"]["device"] = devices[0] if devices else None
    results["machine"]["load_avg_after"] = os.getloadavg()[0]
    results["wall_s"] = time.time() - t0
    results["cpu_s"] = sum(r.get("cpu_s", 0.0) for r in results["parts"].values())
    return results


# ---------------------------------------------------------------- the Markdown tables
def _f(v, fmt="{:.3f}", none="—"):
    return none if v is None else fmt.format(v)


def markdown(r: dict) -> str:
    dev = (r["machine"].get("device") or {})
    lines = [f"# bench/gpu_suite.py ({r['mode']}): {dev.get('kind', '?')} x "
             f"{dev.get('count', '?')}", "",
             f"`{r['command']}` — {r['started']}, {r['wall_s']:.0f} s wall "
             f"(budget {r['total_budget_s']:.0f} s), parts' CPU {r['cpu_s']:.0f} s; "
             + ", ".join(f"{k} {v}" for k, v in r["machine"]["versions"].items()), ""]
    if r["machine"].get("nvidia_smi"):
        lines += [f"nvidia-smi: {r['machine']['nvidia_smi']}", ""]
    lines += ["| part | status | wall (s) | budget (s) | error |", "|---|---|---|---|---|"]
    for name, p in r["parts"].items():
        lines.append(f"| {name} | {p['status']} | {_f(p.get('wall_s'), '{:.0f}')} | "
                     f"{_f(p.get('budget_s'), '{:.0f}')} | {p.get('error') or ''} |")
    s = (r["parts"].get("sampling") or {}).get("result")
    if s and s.get("ours_s"):
        steps = "/".join(str(v) for v in s["steps"].values())
        lines += ["", f"## Sampling: size {s['size']} ({s['n_params'] / 1e6:.0f} M parameters), "
                  f"batch {s['batch']}, steps {steps}, same random weights", "",
                  f"| | unclip_jax ({s['dtype']}) | diffusers ({s['peer_dtype']}, "
                  f"{s['peer_device']}) | ours / theirs |", "|---|---|---|---|"]
        ratio = s.get("ratio")
        lines.append(f"| images/s | {_f(s.get('ours_images_per_s'))} | "
                     f"{_f(s.get('peer_images_per_s'))} | {_f(ratio, '{:.2f}x')} |")
        lines.append(f"| s per batch | {_f(s.get('ours_s'))} | {_f(s.get('peer_s'))} | |")
        lines.append(f"| peak device memory (GiB) | {_f(s.get('ours_peak_gib'), '{:.2f}')} | "
                     f"{_f(s.get('peer_peak_gib'), '{:.2f}')} | "
                     f"{_f(s.get('peak_memory_ratio'), '{:.2f}x')} |")
        lines.append(f"| compile (s, first call − warm call) | {_f(s.get('compile_s'), '{:.1f}')}"
                     " | — | |")
        lines.append(f"| fraction of the peak-FLOP/s limit | "
                     f"{_f(s.get('fraction_of_limit'), '{:.1%}')} | "
                     f"{_f(s.get('peer_fraction_of_limit'), '{:.1%}')} | |")
        if s.get("flops_per_image"):
            lines.append(f"| model GFLOP per image (limit: "
                         f"{_f(s.get('limit_s_per_image'), '{:.4f}')} s per image) | "
                         f"{s['flops_per_image'] / 1e9:.4g} | | |")
        if s.get("stages_s"):
            lines.append("| our stages (s) | " + ", ".join(
                f"{k} {v:.3f}" for k, v in s["stages_s"].items()) + " | | |")
    mfu = [(n, p["result"]) for n, p in r["parts"].items()
           if n.startswith("mfu_") and p.get("result")]
    if mfu:
        lines += ["", "## Training-step MFU (bf16 compute at Karlo's size; float32 in the dry "
                  "run)", "",
                  "| stage | size | batch | remat | scan | step (ms) | examples/s | TFLOP/s | MFU "
                  "| temp (GiB) | compile (s) | note |", "|---|---|---|---|---|---|---|---|---|"
                  "---|---|---|"]
        for _, m in mfu:
            best = m.get("best")
            for row in m["rows"]:
                note = row.get("error") or (f"skipped: {row['skipped']}" if row.get("skipped")
                                            else "")
                if best is not None and row.get("step_s") and all(
                        row.get(k) == best.get(k) for k in ("batch", "remat", "scan")):
                    note = "**best**"
                st = row.get("step_s")
                lines.append(
                    f"| {row['stage']} | {row['size']} | {row['batch']} | {row['remat']} | "
                    f"{row['scan']} | {_f(st and st * 1e3, '{:.1f}')} | "
                    f"{_f(row.get('examples_per_s'), '{:.1f}')} | "
                    f"{_f(row.get('tflops_per_s'), '{:.4g}')} | {_f(row.get('mfu'), '{:.1%}')} | "
                    f"{_f(row.get('temp_gib'), '{:.2f}')} | {_f(row.get('compile_s'), '{:.1f}')}"
                    f" | {note} |")
        lines.append("")
        for name, m in mfu:
            big, b = m.get("largest_batch_ran"), m.get("best")
            lines.append(
                f"- {m['stage']}: best batch {b['batch']}, remat {b['remat']}, scan {b['scan']}: "
                f"MFU {_f(b.get('mfu'), '{:.1%}')}; largest batch that ran {big['batch']} "
                f"(remat {big['remat']}); smallest that did not fit: "
                f"{m.get('smallest_oom_batch') or 'none tried'}" if b else
                f"- {m['stage']}: no point ran")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].rstrip(":"))
    ap.add_argument("--dry-run", "--cpu-dry", action="store_true",
                    help="the same parts on the CPU at tiny sizes (CI)")
    ap.add_argument("--out", default="gpu_suite.json",
                    help="the results file (JSON); the Markdown goes next to it (.md)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: "
                    + ", ".join(PARTS))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the whole suite's time budget (default: 540 on a GPU)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak dense TFLOP/s where train/flops.py does not know "
                         "it (CPU: no fraction of the limit, no MFU without it)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", help=argparse.SUPPRESS)
    ap.add_argument("--child-deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child, json.loads(args.child_spec), args.child_out,
                          args.child_deadline)
    results = run_suite(argv, args)
    md = markdown(results)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    md_path = os.path.splitext(out)[0] + ".md"
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    print("\n" + md + f"\nwrote {out} and {md_path}", flush=True)
    return 0 if all(p["status"] == "ok" for p in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
