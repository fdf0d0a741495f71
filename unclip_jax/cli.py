"""The `unclip-jax` command line.

Every bad input ends in one line on stderr, `unclip-jax <command>: error: <message>`, and a
non-zero exit (2 for a bad argument, 1 for anything found later), printed in one place (`main`).
Arguments are checked as they are parsed (the `type=` functions below) and outputs before any
loading, sampling or training work (`_check_out_file`, `_check_out_dir`, `_check_workdir`).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

#: `sample` writes a grid of at most this many images (more: --out-dir, one PNG per image)
GRID_MAX_IMAGES = 256
#: `sample --batch-size` default: images per pipeline call
DEFAULT_BATCH_SIZE = 8
#: the seeds of JAX's `jax.random.key`: a signed 64-bit integer
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 63 - 1
#: the most prompts of each `eval` set (it holds every set's images in memory)
EVAL_MAX = 10_000


class UsageError(Exception):
    """A bad command line, raised by the parser instead of printing usage and exiting."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, printed by main(), not usage + message + exit
        raise UsageError(self.prog, message)


# ------------------------------------------------------------------------------ argument types
def _int_in(lo: int | None = None, hi: int | None = None, what: str = ""):
    """An argparse type: an integer in [lo, hi] (None: unbounded on that side)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                need = "a positive integer" if lo == 1 else f"an integer >= {lo}"
            else:
                need = f"an integer from {_num(lo)} to {_num(hi)}"
            raise argparse.ArgumentTypeError(f"must be {need}{what}, got {text}")
        return value
    parse.__name__ = "integer"
    return parse


def _num(n: int) -> str:
    for base, name in ((2 ** 63, "2**63"), (2 ** 64, "2**64")):
        if abs(n) in (base, base - 1):
            return ("-" if n < 0 else "") + name + (" - 1" if abs(n) == base - 1 else "")
    return str(n)


_positive = _int_in(1)
_seed = _int_in(SEED_MIN, SEED_MAX, " (a signed 64-bit integer, what jax.random.key takes)")
_seed_nonneg = _int_in(0, SEED_MAX, " (a non-negative 64-bit integer: it also seeds numpy's "
                                    "SeedSequence)")


def _per_step(parse_one, what: str, example: str):
    """An argparse type: one value (for every upsampler step) or a comma list of them (one per
    step of the cascade, in order)."""
    def parse(text: str):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1:
            return parse_one(parts[0])
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected {what} or a comma list of them, one per "
                                             f"upsampler step (e.g. {example}), got {text!r}")
        values = []
        for i, part in enumerate(parts, 1):
            try:
                values.append(parse_one(part))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"entry {i} of {text!r} (one per upsampler "
                                                 f"step): {e}") from None
        return tuple(values)
    parse.__name__ = what
    return parse


def _method(text: str) -> str:
    from unclip_jax.diffusion.sampler import METHODS

    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(METHODS)}, got {text!r}")
    return text


_positive_per_step = _per_step(_positive, "a positive integer", "27,15")
_method_per_step = _per_step(_method, "a sampling method (ddpm or ddim)", "ddim,ddpm")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _temperature(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 (the AR prior's softmax "
                                         f"temperature), got {text}")
    return value


def _guidance(text: str) -> float:
    """A classifier-free guidance scale w (out_u + w (out_c - out_u)): 1 is unguided."""
    value = _finite(text)
    if value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be >= 1, got {text}: it is the classifier-free guidance scale w in "
            f"out_uncond + w * (out_cond - out_uncond), 1 = no guidance, larger = more")
    return value


def _text(text: str) -> str:
    from unclip_jax.pipeline import check_text

    try:
        return check_text(text, "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------------------ outputs first
def _probe_dir(d: str, what: str) -> None:
    """Can a file be created in the directory `d`? (Tried, not guessed: os.access lies to root
    and on network file systems.) Leaves nothing behind."""
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".unclip-jax-write-test-")
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {d} ({e.strerror or type(e).__name__})") \
            from None
    os.close(fd)
    os.remove(tmp)


def _check_out_file(path: str, flag: str) -> None:
    """`path` can be written as a file: not a directory, its directory exists and is writable."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a directory: give a file name "
                                f"(e.g. {os.path.join(path, 'grid.png')})")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag} {path}: its directory {parent} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} exists and is not writable")
    _probe_dir(parent, f"{flag} {path}")


def _check_out_dir(path: str, flag: str) -> None:
    """`path` is (or can be made, in an existing directory) a writable directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path} exists and is not a directory")
    if not os.path.isdir(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{flag} {path}: its directory {parent} does not exist")
        _probe_dir(parent, f"{flag} {path}")
    else:
        _probe_dir(path, f"{flag} {path}")


def _check_workdir(path: str, flag: str = "--workdir", *subdirs: str) -> None:
    """A workdir to write into: a writable directory, or one that can be created (its nearest
    existing ancestor is a writable directory); `subdirs` of it that exist must be writable."""
    if "://" in path:  # gs:// and other remote file systems: the trainer's Orbax checks them
        return
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{flag} {path} exists and is not a directory")
        _probe_dir(path, f"{flag} {path}")
        for sub in subdirs:
            d = os.path.join(path, sub)
            if os.path.isdir(d):
                _probe_dir(d, f"{flag} {path}")
            elif os.path.exists(d):
                raise NotADirectoryError(f"{flag} {path}: {d} exists and is not a directory")
        return
    up = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise NotADirectoryError(f"{flag} {path}: {up} is a file, not a directory")
    _probe_dir(up, f"{flag} {path}")


def _load_pipeline(args, progress=True):
    from unclip_jax.pipeline import UnCLIPPipeline

    if bool(getattr(args, "pipeline", None)) == bool(getattr(args, "workdir", None)):
        raise ValueError("give either --pipeline (a diffusers UnCLIP directory) or --workdir "
                         "(stages trained with unclip-jax train / demo)")
    if args.pipeline:
        return UnCLIPPipeline.from_diffusers(args.pipeline, clip=getattr(args, "clip", None),
                                             progress=progress)
    return UnCLIPPipeline.from_workdir(args.workdir, progress=progress)


def _check_source(args, *, tower: bool, text: bool) -> None:
    """Before any loading: exactly one of --pipeline / --workdir, --clip only with --pipeline,
    and a --pipeline directory that can do what is asked (`text`: text-to-image, which an
    UnCLIPImageVariationPipeline cannot; `tower`: a CLIP image tower, which an UnCLIPPipeline
    gets from --clip), read from its configs alone."""
    from unclip_jax.convert.diffusers_pipeline import (VARIATION_CLASS, check_pipeline_dir,
                                                       decoder_clip_dim)
    from unclip_jax.pipeline import no_prior_message
    from unclip_jax.workdir import IMAGE_TOWER_KINDS, check_image_tower_dir

    if bool(args.pipeline) == bool(args.workdir):
        raise ValueError("give either --pipeline (a diffusers UnCLIPPipeline or "
                         "UnCLIPImageVariationPipeline directory) or --workdir (stages trained "
                         "with unclip-jax train / demo)")
    clip = getattr(args, "clip", None)
    if clip and not args.pipeline:
        raise ValueError("--clip goes with --pipeline: a workdir's own CLIP stage is its image "
                         "tower")
    if not args.pipeline:
        return
    variation = check_pipeline_dir(args.pipeline)["_class_name"] == VARIATION_CLASS
    if text and variation:
        raise ValueError(f"--pipeline {no_prior_message(args.pipeline)}")
    if tower and not variation and not clip:
        raise ValueError(f"--pipeline {args.pipeline} is an UnCLIPPipeline, which has no CLIP "
                         f"image tower: pass --clip DIR, {IMAGE_TOWER_KINDS}")
    if clip:
        got, want = check_image_tower_dir(clip).embed_dim, decoder_clip_dim(args.pipeline)
        if got != want:
            raise ValueError(f"--clip {clip} makes {got}-dim image embeddings, but the decoder "
                             f"of --pipeline {args.pipeline} takes {want}-dim CLIP image "
                             f"embeddings")


def _check_ar_prior(args) -> None:
    """--prior ar needs a workdir with a trained AR prior: one line saying how to get one."""
    from unclip_jax.workdir import has_checkpoints, stage_dir

    if args.pipeline:
        raise ValueError("--prior ar needs --workdir with a trained AR prior (a diffusers "
                         "pipeline has none)")
    if args.workdir and not has_checkpoints(stage_dir(args.workdir, "ar_prior")):
        raise ValueError(f"{args.workdir} has no trained ar_prior stage: train it with "
                         f"`unclip-jax train --config configs/ar_prior.py:size=... "
                         f"--workdir {args.workdir}`")


def _check_prompts(prompts):
    for p in prompts:
        if p and not p.strip():
            raise ValueError("a prompt is only whitespace; use '' for an unconditional sample")


def _check_grid_size(n: int, flag: str, hint: str) -> None:
    if n > GRID_MAX_IMAGES:
        raise ValueError(f"{flag}: {n} images are more than one grid holds "
                         f"(at most {GRID_MAX_IMAGES}){hint}")


def _cmd_sample(args) -> int:
    import json

    from PIL import Image
    from tqdm.auto import tqdm

    from unclip_jax.viz import save_grid

    prompts = args.prompt
    _check_prompts(prompts)
    total = len(prompts) * args.num
    grid = args.out if args.out is not None else (None if args.out_dir else "grid.png")
    if grid is not None:  # before any loading or sampling
        _check_out_file(grid, "--out")
        _check_grid_size(total, "--out", ": write one PNG per image as they are made with "
                                         "--out-dir DIR (no grid unless --out is given too)")
    if args.out_dir:
        _check_out_dir(args.out_dir, "--out-dir")
    if args.prior == "ar":
        _check_ar_prior(args)
    if args.clip and not args.rerank:
        raise ValueError("--clip is the CLIP image tower that --rerank N scores with: give it "
                         "with --rerank")
    _check_source(args, tower=bool(args.rerank), text=True)
    pipe = _load_pipeline(args, progress=not args.quiet)
    kw = dict(prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
              super_res_steps=args.super_res_steps, prior_guidance=args.prior_guidance,
              decoder_guidance=args.decoder_guidance, super_res_method=args.super_res_method,
              prior=args.prior, ar_temperature=args.ar_temperature, ar_top_k=args.ar_top_k)
    if args.rerank:
        from unclip_jax.manipulate import rerank_batches

        chunks = rerank_batches(pipe, prompts, args.rerank, num_images_per_prompt=args.num,
                                batch_size=args.batch_size, seed=args.seed, **kw)
    else:
        chunks = pipe.generate_batches(prompts, num_images_per_prompt=args.num,
                                       batch_size=args.batch_size, seed=args.seed, **kw)
    width = max(3, len(str(args.num - 1)))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "prompts.json"), "w", encoding="utf-8") as f:
            json.dump({"prompts": prompts, "num_images_per_prompt": args.num, "seed": args.seed,
                       "files": f"P-{'I' * width}.png: image I of prompt P (0-based)"}, f,
                      indent=1)
    kept, size = [], None
    calls = -(-total * max(1, args.rerank) // args.batch_size)  # pipeline calls
    with tqdm(total=total, desc=f"sample (batches of {args.batch_size})", unit="image",
              disable=args.quiet or calls < 2) as bar:
        for start, images in chunks:
            size = images.shape[1:3]
            for i, im in enumerate(images, start):
                if args.out_dir:
                    p, j = divmod(i, args.num)
                    Image.fromarray(im).save(os.path.join(
                        args.out_dir, f"{p:03d}-{j:0{width}d}.png"), format="PNG")
                if grid is not None:
                    kept.append(im)
            bar.update(len(images))
    where = []
    if args.out_dir:
        where.append(f"{args.out_dir}/ (one PNG per image)")
    if grid is not None:
        captions = [p for p in prompts for _ in range(args.num)]
        save_grid(grid, kept, captions, cols=min(total, 4 if args.num == 1 else args.num))
        where.append(grid)
    print(f"wrote {total} images ({size[0]}x{size[1]}) to {' and '.join(where)}")
    return 0


def _cmd_train(args) -> int:
    from unclip_jax.stages import build_stage
    from unclip_jax.train.config import load_config
    from unclip_jax.train.trainer import check_config, stage_dir_name, train

    config = load_config(args.config, args.overrides)
    check_config(config)  # before the stage is built: building one may write into the workdir
    where = stage_dir_name(config)
    _check_workdir(args.workdir, "--workdir", where)
    res = train(build_stage(config, args.workdir), config, args.workdir,
                stop_at_step=args.stop_at, progress=not args.quiet)
    last = res.history[-1] if res.history else {}
    print(f"[{config.stage}] step {res.step}/{config.total_steps}"
          + (f", loss {last['loss']:.4f}" if "loss" in last else "")
          + f"; checkpoints in {args.workdir}/{where}")
    return 0


def _cmd_eval(args) -> int:
    import os

    from unclip_jax.shapes_demo.evaluate import evaluate, write_json
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.shapes_demo.report import write_report

    _check_workdir(args.workdir)  # it writes metrics.json and report.md there
    pipe = UnCLIPPipeline.from_workdir(args.workdir, progress=False)
    res = evaluate(pipe, n_single=args.single, n_two=args.two, n_heldout=args.heldout,
                   seed=args.seed, batch=args.batch_size)
    write_json(os.path.join(args.workdir, "metrics.json"), res)
    grid = "grid.png" if os.path.exists(os.path.join(args.workdir, "grid.png")) else ""
    write_report(os.path.join(args.workdir, "report.md"), res, grid=grid)
    f = res["faithfulness"]
    print(f"CLIP top-1 t2i {res['retrieval']['clip_top1_text_to_image']:.2f}; prior cosine "
          f"{res['prior']['prior_cosine']:.3f} (text baseline "
          f"{res['prior']['text_embedding_cosine_baseline']:.3f}); faithfulness csp single "
          f"{f['single']['csp']:.2f} two {f['two']['csp']:.2f} heldout {f['heldout']['csp']:.2f}; "
          f"wrote {args.workdir}/report.md")
    return 0


def _cmd_compare(args) -> int:
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.shapes_demo.compare import VARIANTS, compare, table, write_outputs

    _check_workdir(args.workdir)  # it writes compare.{json,md,png} there
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else VARIANTS
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown variant {bad[0]!r}; choose from "
                         f"{', '.join(VARIANTS)}")
    if "ar_prior" in variants:
        _check_ar_prior(argparse.Namespace(pipeline=None, workdir=args.workdir))
    pipe = UnCLIPPipeline.from_workdir(args.workdir, progress=False)
    res = compare(pipe, variants=variants, n_single=args.single, n_two=args.two,
                  n_heldout=args.heldout, n_diversity=args.diversity,
                  per_prompt=args.per_prompt, grid_prompts=args.grid_prompts, seed=args.seed,
                  batch=args.batch_size, progress=not args.quiet)
    paths = write_outputs(args.workdir, res)
    print(table(res))
    print(f"wrote {paths['md']}, {paths['json']} and {paths['png']}")
    return 0


def _manipulator(args):
    from unclip_jax.manipulate import Manipulator

    return Manipulator(_load_pipeline(args, progress=False), steps=args.steps,
                       guidance=args.guidance)


def _cmd_variations(args) -> int:
    from unclip_jax.images import load_image
    from unclip_jax.viz import save_grid

    _check_out_file(args.out, "--out")
    _check_grid_size(args.num + 1, "--num", "")
    _check_source(args, tower=True, text=False)
    img = load_image(args.image)
    m = _manipulator(args)
    out = m.variations(img, n=args.num, eta=args.eta, seed=args.seed)
    save_grid(args.out, [_fit(img, out.shape[1])] + list(out),
              ["input"] + [f"eta={args.eta}"] * len(out), cols=len(out) + 1)
    print(f"wrote {len(out)} variations to {args.out}")
    return 0


def _cmd_interpolate(args) -> int:
    from unclip_jax.images import load_image
    from unclip_jax.viz import save_grid

    _check_out_file(args.out, "--out")
    _check_grid_size(args.num, "--num", "")
    _check_source(args, tower=True, text=False)
    a, b = load_image(args.image_a), load_image(args.image_b)
    m = _manipulator(args)
    out = m.interpolate(a, b, steps=args.num, noise=args.noise, seed=args.seed)
    caps = [f"{t:.2f}" for t in __import__("numpy").linspace(0, 1, len(out))]
    save_grid(args.out, out, caps, cols=len(out))
    print(f"wrote {len(out)} interpolated images to {args.out}")
    return 0


def _cmd_textdiff(args) -> int:
    from unclip_jax.images import load_image
    from unclip_jax.viz import save_grid

    _check_prompts([args.to, getattr(args, "from")])
    _check_out_file(args.out, "--out")
    _check_grid_size(args.num, "--num", "")
    _check_source(args, tower=True, text=False)
    img = load_image(args.image)
    m = _manipulator(args)
    out = m.textdiff(img, getattr(args, "from"), args.to, steps=args.num,
                     max_theta=args.max_theta, seed=args.seed)
    caps = [f"theta={t:.2f}" for t in __import__("numpy").linspace(0, args.max_theta, len(out))]
    save_grid(args.out, out, caps, cols=len(out))
    print(f"wrote {len(out)} images to {args.out}")
    return 0


def _fit(img, size):
    from unclip_jax.images import center_crop_resize

    return center_crop_resize(img, size)


def _cmd_export(args) -> int:
    from unclip_jax.convert.export_diffusers import (
        check_out_dir, export_pipeline, export_workdir)

    if bool(args.pipeline) == bool(args.workdir):
        raise ValueError("give either --workdir (stages trained here) or --pipeline (a diffusers "
                         "UnCLIP directory, written back)")
    check_out_dir(args.out)  # before anything loads
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if args.workdir:
        export_workdir(args.workdir, args.out, log=log)
    else:
        export_pipeline(args.pipeline, args.out, log=log)
    return 0


def _cmd_demo(args) -> int:
    from unclip_jax.shapes_demo.run import run_demo

    _check_workdir(args.workdir)
    run_demo(args.workdir, seed=args.seed)
    return 0


_NO_CACHE_HELP = ("don't turn on unclip-jax's persistent compilation cache ($UNCLIP_JAX_CACHE_DIR, "
                  "else $XDG_CACHE_HOME/unclip_jax/xla or ~/.cache/unclip_jax/xla; the same as "
                  "UNCLIP_JAX_COMPILATION_CACHE=0). A cache JAX is configured with "
                  "(JAX_COMPILATION_CACHE_DIR) stays")


_CLIP_HELP = ("with --pipeline: the CLIP image tower, a transformers CLIP (CLIPModel or "
              "CLIPVisionModelWithProjection) or an UnCLIPImageVariationPipeline directory")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="unclip-jax", description="unCLIP (DALL-E 2) in JAX/Flax")
    p.add_argument("--no-compile-cache", action="store_true", help=_NO_CACHE_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="text -> image with a diffusers UnCLIP pipeline directory")
    s.add_argument("--pipeline", help="a local diffusers UnCLIPPipeline directory")
    s.add_argument("--workdir", help="a workdir of stages trained here (e.g. workdir/demo)")
    s.add_argument("--rerank", type=_int_in(0), default=0,
                   help="draw N candidates per image and keep the best by CLIP score (a "
                        "workdir's CLIP, or --clip with --pipeline; 0 = off)")
    s.add_argument("--clip", help=_CLIP_HELP + " (for --rerank)")
    s.add_argument("--prompt", required=True, action="append", type=_text,
                   help="a prompt (repeat for several); '' is the unconditional prompt")
    s.add_argument("--num", type=_positive, default=1, help="images per prompt")
    s.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE,
                   help="images per pipeline call (memory stays flat whatever --num is; image i "
                        "is drawn from fold_in(key(seed), i), so any batch size gives the same "
                        f"images up to float rounding; default {DEFAULT_BATCH_SIZE})")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--out", default=None,
                   help=f"PNG grid to write (default grid.png; at most {GRID_MAX_IMAGES} images)")
    s.add_argument("--out-dir", default=None,
                   help="write one PNG per image into this directory as they are made "
                        "(P-III.png: image III of prompt P; prompts.json); no grid unless --out")
    s.add_argument("--prior-steps", type=_positive, default=25)
    s.add_argument("--decoder-steps", type=_positive, default=25)
    s.add_argument("--super-res-steps", type=_positive_per_step, default=7,
                   help="sampling steps of every upsampler, or a comma list with one per step of "
                        "the cascade (e.g. 27,15); default 7")
    s.add_argument("--super-res-method", type=_method_per_step, default=None,
                   help="ddpm or ddim for every upsampler, or a comma list with one per step; "
                        "default: what each upsampler records")
    s.add_argument("--prior", choices=["diffusion", "ar"], default="diffusion",
                   help="which prior draws the CLIP image embedding: the diffusion prior "
                        "(WORKDIR/prior) or the autoregressive one (WORKDIR/ar_prior, --workdir "
                        "only); default diffusion")
    s.add_argument("--ar-temperature", type=_temperature, default=None,
                   help="the AR prior's softmax temperature (> 0); default: what it records")
    s.add_argument("--ar-top-k", type=_positive, default=None,
                   help="sample the AR prior's codes from the k most likely buckets; default: "
                        "what it records (all)")
    s.add_argument("--prior-guidance", type=_guidance, default=None,
                   help="classifier-free guidance scale (>= 1; 1 = none); default: what the "
                        "prior records (its config's sampling.guidance: 2 for the demo's), "
                        "else 4 (Karlo's)")
    s.add_argument("--decoder-guidance", type=_guidance, default=None,
                   help="classifier-free guidance scale (>= 1; 1 = none); default: what the "
                        "decoder records (its config's sampling.guidance), 8 for a diffusers "
                        "pipeline")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_sample)

    t = sub.add_parser("train", help="train one stage (clip, prior, decoder, upsampler)",
                       description="Train a stage. Override any config key with "
                                   "--config.KEY=VALUE (e.g. --config.optimizer.lr=3e-4).")
    t.add_argument("--config", required=True, help="configs/<stage>.py[:size=...]")
    t.add_argument("--workdir", required=True,
                   help="checkpoints go to WORKDIR/<stage>/ (WORKDIR/<config.stage_dir>/ when "
                        "set, e.g. upsampler2)")
    t.add_argument("--stop-at", type=_int_in(0), default=None,
                   help="stop (with a checkpoint) at this step; the same command resumes "
                        "(0: save the initial, e.g. imported, state and train nothing)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="measure a trained shapes-world stack (writes report.md)")
    e.add_argument("--workdir", required=True)
    e.add_argument("--seed", type=_seed_nonneg, default=0)
    size = _int_in(1, EVAL_MAX, " (eval holds every set's images in memory)")
    e.add_argument("--single", type=size, default=64, help="single-object prompts")
    e.add_argument("--two", type=size, default=32, help="two-object prompts")
    e.add_argument("--heldout", type=size, default=32, help="held-out-combination prompts")
    e.add_argument("--batch-size", type=_positive, default=64,
                   help="prompts per sampling call (the numbers are those of this batch size: "
                        "each chunk of prompts draws from its own key; default 64)")
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("compare", help="the paper's comparison of priors on a trained shapes "
                                       "stack (writes compare.md / .json / .png)")
    c.add_argument("--workdir", required=True)
    c.add_argument("--variants", default="",
                   help="comma list of diffusion_prior, ar_prior, text_embedding, caption_only "
                        "(default: all four)")
    c.add_argument("--seed", type=_seed_nonneg, default=0)
    c.add_argument("--single", type=size, default=64, help="single-object prompts")
    c.add_argument("--two", type=size, default=32, help="two-object prompts")
    c.add_argument("--heldout", type=size, default=32, help="held-out-combination prompts")
    c.add_argument("--diversity", type=size, default=8,
                   help="prompts whose samples measure diversity")
    c.add_argument("--per-prompt", type=_int_in(2, 16), default=4,
                   help="samples per diversity prompt")
    c.add_argument("--grid-prompts", type=_int_in(1, 16), default=8,
                   help="prompts (columns) of compare.png")
    c.add_argument("--batch-size", type=_positive, default=64,
                   help="prompts per sampling call (default 64)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_cmd_compare)

    def manip(name, help_):
        m = sub.add_parser(name, help=help_)
        m.add_argument("--workdir", help="a workdir of stages trained here (e.g. workdir/demo)")
        m.add_argument("--pipeline", help="a local diffusers UnCLIPPipeline (with --clip) or "
                                          "UnCLIPImageVariationPipeline directory")
        m.add_argument("--clip", help=_CLIP_HELP)
        m.add_argument("--out", default=f"{name}.png")
        m.add_argument("--seed", type=_seed, default=0)
        m.add_argument("--steps", type=_positive, default=25, help="DDIM steps")
        m.add_argument("--guidance", type=_guidance, default=1.0,
                       help="decoder classifier-free guidance scale (>= 1; 1 = none, exact "
                            "inversion)")
        m.add_argument("--num", type=_int_in(2) if name == "interpolate" else _positive,
                       default=5)
        return m

    v = manip("variations", "variations of an image (DDIM inversion, then eta > 0)")
    v.add_argument("--image", required=True)
    v.add_argument("--eta", type=_finite, default=1.0)
    v.set_defaults(func=_cmd_variations)
    i = manip("interpolate", "interpolate between two images' CLIP embeddings")
    i.add_argument("--image-a", required=True)
    i.add_argument("--image-b", required=True)
    i.add_argument("--noise", choices=["interpolate", "fixed"], default="interpolate")
    i.set_defaults(func=_cmd_interpolate)
    td = manip("textdiff", "edit an image towards a text difference")
    td.add_argument("--image", required=True)
    td.add_argument("--from", default="", type=_text, help="the text describing the image now")
    td.add_argument("--to", required=True, type=_text, help="the text to move towards")
    td.add_argument("--max-theta", type=_finite, default=0.5)
    td.set_defaults(func=_cmd_textdiff)

    x = sub.add_parser("export", help="write a workdir's stages (or a diffusers pipeline) as a "
                                      "diffusers UnCLIPPipeline directory")
    x.add_argument("--workdir", help="a workdir of stages trained here (e.g. workdir/demo)")
    x.add_argument("--pipeline", help="a diffusers UnCLIPPipeline directory, read and written back")
    x.add_argument("--out", required=True,
                   help="the directory to write (must not exist, or be empty)")
    x.add_argument("--quiet", action="store_true", help="no progress lines")
    x.set_defaults(func=_cmd_export)

    d = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    d.add_argument("--workdir", default="workdir/demo")
    d.add_argument("--seed", type=_seed_nonneg, default=0)
    d.set_defaults(func=_cmd_demo)
    for command in sub.choices.values():  # also after the command: `unclip-jax sample --no-...`
        command.add_argument("--no-compile-cache", action="store_true", default=argparse.SUPPRESS,
                             help=_NO_CACHE_HELP)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from unclip_jax.host_memory import keep_freed_memory

    keep_freed_memory()  # before XLA allocates: freed step memory is reused, not faulted back in
    from unclip_jax.train.config import split_overrides

    parser = build_parser()
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    prog = "unclip-jax"
    try:
        args = parser.parse_args(rest)
        prog = f"unclip-jax {args.command}"
        args.overrides = overrides
        from unclip_jax import compile_cache

        if args.no_compile_cache:
            compile_cache.disable_compilation_cache()
        else:  # before anything compiles: a second run loads the compiled programs from disk
            compile_cache.enable_compilation_cache()
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            FloatingPointError) as e:  # FloatingPointError: a diverged training run
        if isinstance(e, UsageError):
            prog = e.prog
        message = " ".join(str(e).split())  # one line, whatever the exception says
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
