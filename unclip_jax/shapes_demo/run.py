"""`unclip-jax demo`: the main job on the embedded default.

Trains a miniature unCLIP stack on the procedural shapes world — a BPE tokenizer, CLIP, the
prior, the decoder (32x32) and an upsampler (32->64) — on CPU, then generates images for fixed
prompts and measures them. Writes into WORKDIR: grid.png (prompt under each image), report.md,
metrics.json, and each stage's checkpoints. Re-running reuses what is trained.
"""
from __future__ import annotations

import os
import time

STAGES = ("clip", "prior", "decoder", "upsampler")


def configs_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "configs")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"the configs/ directory was not found next to the package "
                                f"({path}); run from a checkout of unclip_jax")
    return path


def _done(stage_dir: str, total: int) -> bool:
    ck = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(ck):
        return False
    steps = [int(n) for n in os.listdir(ck) if n.isdigit()]
    return bool(steps) and max(steps) >= total


def demo_config(stage: str, workdir: str, size: str = "demo", extra=()):
    from unclip_jax.train.config import load_config

    over = [f"data.cache_dir={os.path.join(workdir, 'data')}", "data.num_examples=4000",
            "checkpoint.every=500", "checkpoint.keep=2", *extra]
    if stage == "clip":
        over.append(f"tokenizer={os.path.join(workdir, 'tokenizer')}")
    return load_config(os.path.join(configs_dir(), f"{stage}.py") + f":size={size}", over)


def prepare_data(workdir: str, cfg) -> None:
    """The shapes data (cached) and a tokenizer trained on its captions."""
    from unclip_jax.data.sources import shapes_arrays
    from unclip_jax.data.tokenizer import train_tokenizer

    tok = os.path.join(workdir, "tokenizer")
    d = shapes_arrays(int(cfg.data.num_examples), int(cfg.data.seed), 64,
                      cache_dir=os.path.join(workdir, "data"))
    if not os.path.exists(os.path.join(tok, "tokenizer.json")):
        caps = [c for cs in d["captions"] for c in cs]
        train_tokenizer(caps, tok, vocab_size=int(cfg.model.text.vocab_size),
                        context_length=int(cfg.model.text.max_position_embeddings))


def train_stack(workdir: str, size: str = "demo", extra=(), progress: bool = True) -> dict:
    """Train (or reuse) every stage; returns seconds spent per stage."""
    from unclip_jax.stages import train_stage

    os.makedirs(workdir, exist_ok=True)
    times = {}
    for stage in STAGES:
        cfg = demo_config(stage, workdir, size, extra)
        if stage == "clip":
            t = time.time()
            prepare_data(workdir, cfg)
            times["data"] = time.time() - t
        if _done(os.path.join(workdir, stage), int(cfg.total_steps)):
            print(f"[{stage}] already trained in {workdir}/{stage}; reusing it", flush=True)
            continue
        t = time.time()
        train_stage(cfg, workdir, progress=progress)
        times[stage] = time.time() - t
    return times


def run_demo(workdir: str = "workdir/demo", seed: int = 0, size: str = "demo",
             extra=(), eval_sizes=(64, 32, 32), progress: bool = True) -> dict:
    from unclip_jax.data import shapes
    from unclip_jax.shapes_demo.evaluate import evaluate, write_json
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.shapes_demo.report import write_report
    from unclip_jax.viz import save_grid

    t0 = time.time()
    times = train_stack(workdir, size, extra, progress)
    pipe = UnCLIPPipeline.from_workdir(workdir, progress=False)
    prompts = [p["prompt"] for p in shapes.prompts_for_eval()]
    t = time.time()
    images = pipe.generate(prompts * 2, seed=seed)  # guidance: what each stage records
    grid = save_grid(os.path.join(workdir, "grid.png"), images, prompts * 2, cols=8, cell=96,
                     title="unclip_jax shapes demo: generated from the prompts under each image")
    times["generate_grid"] = time.time() - t
    t = time.time()
    res = evaluate(pipe, n_single=eval_sizes[0], n_two=eval_sizes[1], n_heldout=eval_sizes[2],
                   seed=seed)
    times["eval"] = time.time() - t
    times["total"] = time.time() - t0
    res["seconds"] = times
    write_json(os.path.join(workdir, "metrics.json"), res)
    write_report(os.path.join(workdir, "report.md"), res, grid="grid.png")
    print(f"wrote {grid}, {workdir}/report.md and {workdir}/metrics.json "
          f"({times['total']:.0f}s)", flush=True)
    return res
