"""Start-to-first-image time of `unclip-jax sample` in a fresh process: the first run on a
machine (compiles, fills the persistent compilation cache), the second (loads the compiled
programs from the cache) and one with the cache off (--no-compile-cache).

    python bench/bench_startup.py --size small
    python bench/bench_startup.py --size small --min-compile-time 1   # JAX's default threshold

Builds a diffusers UnCLIPPipeline of random weights on disk once (the PyTorch peers of
tests/peers.py; needs the test extras), then runs `python -m unclip_jax.cli sample --pipeline
DIR ...` (what the `unclip-jax` script runs) as separate processes, each timed by wall clock
from start to exit (imports, weight import, compilation, sampling, the PNG). Each process gets a
fresh cache directory through UNCLIP_JAX_CACHE_DIR; a JAX cache configured in this shell
(JAX_COMPILATION_CACHE_DIR, JAX_PERSISTENT_CACHE_*) is removed from the children's environment.
Prints the three times and the ratios; appends one JSON line to --out (if given).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the PyTorch peers live with the tests


def child_env(cache_dir: str, min_compile_time: str | None) -> dict[str, str]:
    """This environment for a child process with its own compilation cache `cache_dir` (the
    JAX cache of this shell and UNCLIP_JAX_* removed) and the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "UNCLIP_JAX_"))
           and k != "JAX_ENABLE_COMPILATION_CACHE"}
    env["UNCLIP_JAX_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if min_compile_time is not None:
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = min_compile_time
    return env


def _cache_size(path: str) -> tuple[int, int]:
    if not os.path.isdir(path):
        return 0, 0
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith("-cache")]
    return len(files), sum(os.path.getsize(f) for f in files)


def _cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system, all threads) of one process."""
    cpu, t = _cpu_of_children(), time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, _cpu_of_children() - cpu
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {shlex.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return wall, cpu


def main():
    from bench_pipeline import SIZES  # this directory is on sys.path: a script

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=[s for s in SIZES if SIZES[s]], default="small")
    ap.add_argument("--pipeline-dir", default="",
                    help="where the random-weight pipeline is (built there if missing; "
                         "default: a temporary directory)")
    ap.add_argument("--steps", type=int, nargs=3, default=(25, 25, 7),
                    metavar=("PRIOR", "DECODER", "SUPER_RES"))
    ap.add_argument("--min-compile-time", default=None,
                    help="JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS for the children "
                         "(default: unclip_jax's choice)")
    ap.add_argument("--out", default="", help="append a JSON line with the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        pipe_dir = args.pipeline_dir or os.path.join(tmp, "pipeline")
        if not os.path.exists(os.path.join(pipe_dir, "model_index.json")):
            from peers import UnCLIPArch, unclip_pipeline

            t = time.perf_counter()
            unclip_pipeline(pipe_dir, UnCLIPArch(**SIZES[args.size]), seed=0)
            print(f"built the {args.size} random-weight pipeline in {pipe_dir} "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)
        cache = os.path.join(tmp, "xla")
        prior_steps, decoder_steps, sr_steps = args.steps
        cmd = [sys.executable, "-m", "unclip_jax.cli", "sample", "--pipeline", pipe_dir,
               "--prompt", "a red cube on a blue floor", "--quiet",
               "--prior-steps", str(prior_steps), "--decoder-steps", str(decoder_steps),
               "--super-res-steps", str(sr_steps)]
        print(f"command: UNCLIP_JAX_CACHE_DIR={cache} python "
              + shlex.join(cmd[1:] + ["--out", "OUT.png"]), flush=True)
        res = dict(size=args.size, steps=list(args.steps), min_compile_time=args.min_compile_time,
                   load_avg_before=os.getloadavg()[0])
        runs = [("first", "first process (empty cache)", cache, []),
                ("second", "second process (warm cache)", cache, []),
                ("off", "cache off (--no-compile-cache)", os.path.join(tmp, "xla_off"),
                 ["--no-compile-cache"])]
        for i, (key, name, cache_dir, extra) in enumerate(runs):
            out = ["--out", os.path.join(tmp, f"{i}.png")]
            res[f"{key}_s"], res[f"{key}_cpu_s"] = _run(
                cmd + out + extra, child_env(cache_dir, args.min_compile_time))
            note = ""
            if key == "first":
                res["cache_entries"], res["cache_bytes"] = _cache_size(cache)
                note = (f"  [cache: {res['cache_entries']} entries, "
                        f"{res['cache_bytes'] / 2 ** 20:.1f} MiB]")
            print(f"{name:32s} {res[f'{key}_s']:6.1f} s wall, {res[f'{key}_cpu_s']:6.1f} s CPU"
                  + note, flush=True)
        assert not os.path.exists(runs[2][2]), "--no-compile-cache wrote a cache"
        res["load_avg_after"] = os.getloadavg()[0]
        for what, unit in (("", "_s"), ("cpu_", "_cpu_s")):
            res[f"{what}first_over_second"] = res["first" + unit] / res["second" + unit]
            res[f"{what}off_over_second"] = res["off" + unit] / res["second" + unit]
        print(f"first / second: {res['first_over_second']:.2f}x wall, "
              f"{res['cpu_first_over_second']:.2f}x CPU; off / second: "
              f"{res['off_over_second']:.2f}x wall, {res['cpu_off_over_second']:.2f}x CPU; "
              f"load average {res['load_avg_before']:.1f} -> {res['load_avg_after']:.1f}")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
