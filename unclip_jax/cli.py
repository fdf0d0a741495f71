"""The `unclip-jax` command line."""
from __future__ import annotations

import argparse
import os
import sys


def _load_pipeline(args, progress=True):
    from unclip_jax.pipeline import UnCLIPPipeline

    if bool(getattr(args, "pipeline", None)) == bool(getattr(args, "workdir", None)):
        raise ValueError("give either --pipeline (a diffusers UnCLIP directory) or --workdir "
                         "(stages trained with unclip-jax train / demo)")
    if args.pipeline:
        return UnCLIPPipeline.from_diffusers(args.pipeline, progress=progress)
    return UnCLIPPipeline.from_workdir(args.workdir, progress=progress)


def _check_prompts(prompts):
    for p in prompts:
        if p and not p.strip():
            raise ValueError("a prompt is only whitespace; use '' for an unconditional sample")


def _cmd_sample(args) -> int:
    from unclip_jax.viz import save_grid

    prompts = args.prompt
    _check_prompts(prompts)
    pipe = _load_pipeline(args, progress=not args.quiet)
    kw = dict(prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
              super_res_steps=args.super_res_steps, prior_guidance=args.prior_guidance,
              decoder_guidance=args.decoder_guidance)
    if args.rerank:
        if getattr(pipe, "clip", None) is None:
            raise ValueError("--rerank needs the CLIP image tower: use --workdir")
        from unclip_jax.manipulate import rerank

        rows = []
        for _ in range(args.num):
            rows.append(rerank(pipe, prompts, args.rerank, seed=args.seed + len(rows), **kw))
        images = __import__("numpy").stack(rows, 1).reshape(-1, *rows[0].shape[1:])
    else:
        images = pipe.generate(prompts, seed=args.seed, num_images_per_prompt=args.num, **kw)
    captions = [p for p in prompts for _ in range(args.num)]
    save_grid(args.out, images, captions, cols=min(len(images), 4 if args.num == 1 else args.num))
    print(f"wrote {len(images)} images ({images.shape[1]}x{images.shape[2]}) to {args.out}")
    return 0


def _cmd_train(args) -> int:
    from unclip_jax.stages import build_stage
    from unclip_jax.train.config import load_config
    from unclip_jax.train.trainer import train

    config = load_config(args.config, args.overrides)
    res = train(build_stage(config, args.workdir), config, args.workdir,
                stop_at_step=args.stop_at, progress=not args.quiet)
    last = res.history[-1] if res.history else {}
    print(f"[{config.stage}] step {res.step}/{config.total_steps}"
          + (f", loss {last['loss']:.4f}" if "loss" in last else "")
          + f"; checkpoints in {args.workdir}/{config.stage}")
    return 0


def _cmd_eval(args) -> int:
    import os

    from unclip_jax.shapes_demo.evaluate import evaluate, write_json
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.shapes_demo.report import write_report

    pipe = UnCLIPPipeline.from_workdir(args.workdir, progress=False)
    res = evaluate(pipe, n_single=args.single, n_two=args.two, n_heldout=args.heldout,
                   seed=args.seed)
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


def _manipulator(args):
    from unclip_jax.manipulate import Manipulator
    from unclip_jax.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_workdir(args.workdir, progress=False)
    return Manipulator(pipe, steps=args.steps, guidance=args.guidance)


def _cmd_variations(args) -> int:
    from unclip_jax.images import load_image
    from unclip_jax.viz import save_grid

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


def _cmd_demo(args) -> int:
    from unclip_jax.shapes_demo.run import run_demo

    run_demo(args.workdir, seed=args.seed)
    return 0


_NO_CACHE_HELP = ("don't turn on unclip-jax's persistent compilation cache ($UNCLIP_JAX_CACHE_DIR, "
                  "else $XDG_CACHE_HOME/unclip_jax/xla or ~/.cache/unclip_jax/xla; the same as "
                  "UNCLIP_JAX_COMPILATION_CACHE=0). A cache JAX is configured with "
                  "(JAX_COMPILATION_CACHE_DIR) stays")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unclip-jax", description="unCLIP (DALL-E 2) in JAX/Flax")
    p.add_argument("--no-compile-cache", action="store_true", help=_NO_CACHE_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="text -> image with a diffusers UnCLIP pipeline directory")
    s.add_argument("--pipeline", help="a local diffusers UnCLIPPipeline directory")
    s.add_argument("--workdir", help="a workdir of stages trained here (e.g. workdir/demo)")
    s.add_argument("--rerank", type=int, default=0,
                   help="draw N candidates per image and keep the best by CLIP score (--workdir)")
    s.add_argument("--prompt", required=True, action="append",
                   help="a prompt (repeat for several); '' is the unconditional prompt")
    s.add_argument("--num", type=int, default=1, help="images per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="grid.png", help="PNG grid to write")
    s.add_argument("--prior-steps", type=int, default=25)
    s.add_argument("--decoder-steps", type=int, default=25)
    s.add_argument("--super-res-steps", type=int, default=7)
    s.add_argument("--prior-guidance", type=float, default=4.0)
    s.add_argument("--decoder-guidance", type=float, default=None,
                   help="default: what the decoder records (its config's sampling.guidance); "
                        "8 for a diffusers pipeline")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_sample)

    t = sub.add_parser("train", help="train one stage (clip, prior, decoder, upsampler)",
                       description="Train a stage. Override any config key with "
                                   "--config.KEY=VALUE (e.g. --config.optimizer.lr=3e-4).")
    t.add_argument("--config", required=True, help="configs/<stage>.py[:size=...]")
    t.add_argument("--workdir", required=True, help="checkpoints go to WORKDIR/<stage>/")
    t.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) at this step; the same command resumes")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="measure a trained shapes-world stack (writes report.md)")
    e.add_argument("--workdir", required=True)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--single", type=int, default=64, help="single-object prompts")
    e.add_argument("--two", type=int, default=32, help="two-object prompts")
    e.add_argument("--heldout", type=int, default=32, help="held-out-combination prompts")
    e.set_defaults(func=_cmd_eval)

    def manip(name, help_):
        m = sub.add_parser(name, help=help_)
        m.add_argument("--workdir", required=True)
        m.add_argument("--out", default=f"{name}.png")
        m.add_argument("--seed", type=int, default=0)
        m.add_argument("--steps", type=int, default=25, help="DDIM steps")
        m.add_argument("--guidance", type=float, default=1.0,
                       help="decoder guidance (1 = none, exact inversion)")
        m.add_argument("--num", type=int, default=5)
        return m

    v = manip("variations", "variations of an image (DDIM inversion, then eta > 0)")
    v.add_argument("--image", required=True)
    v.add_argument("--eta", type=float, default=1.0)
    v.set_defaults(func=_cmd_variations)
    i = manip("interpolate", "interpolate between two images' CLIP embeddings")
    i.add_argument("--image-a", required=True)
    i.add_argument("--image-b", required=True)
    i.add_argument("--noise", choices=["interpolate", "fixed"], default="interpolate")
    i.set_defaults(func=_cmd_interpolate)
    td = manip("textdiff", "edit an image towards a text difference")
    td.add_argument("--image", required=True)
    td.add_argument("--from", default="", help="the text describing the image now")
    td.add_argument("--to", required=True, help="the text to move towards")
    td.add_argument("--max-theta", type=float, default=0.5)
    td.set_defaults(func=_cmd_textdiff)

    d = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    d.add_argument("--workdir", default="workdir/demo")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)
    for command in sub.choices.values():  # also after the command: `unclip-jax sample --no-...`
        command.add_argument("--no-compile-cache", action="store_true", default=argparse.SUPPRESS,
                             help=_NO_CACHE_HELP)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from unclip_jax.train.config import split_overrides

    parser = build_parser()
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    args.overrides = overrides
    from unclip_jax import compile_cache

    if args.no_compile_cache:
        compile_cache.disable_compilation_cache()
    else:  # before anything compiles: a second run loads the compiled programs from disk
        compile_cache.enable_compilation_cache()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            FloatingPointError) as e:  # FloatingPointError: a diverged training run
        print(f"unclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
