"""The `unclip-jax` command line."""
from __future__ import annotations

import argparse
import os
import sys


def _cmd_sample(args) -> int:
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.viz import save_grid

    prompts = args.prompt
    pipe = UnCLIPPipeline.from_diffusers(args.pipeline, progress=not args.quiet)
    images = pipe.generate(prompts, seed=args.seed, prior_steps=args.prior_steps,
                           decoder_steps=args.decoder_steps, super_res_steps=args.super_res_steps,
                           prior_guidance=args.prior_guidance,
                           decoder_guidance=args.decoder_guidance,
                           num_images_per_prompt=args.num)
    captions = [p for p in prompts for _ in range(args.num)]
    save_grid(args.out, images, captions, cols=min(len(images), 4 if args.num == 1 else args.num))
    print(f"wrote {len(images)} images ({images.shape[1]}x{images.shape[2]}) to {args.out}")
    return 0


def _cmd_train(args) -> int:
    from unclip_jax.train.config import load_config
    from unclip_jax.train.trainer import train

    config = load_config(args.config, args.overrides)
    res = train(config, args.workdir, stop_at_step=args.stop_at, progress=not args.quiet)
    last = res.history[-1] if res.history else {}
    print(f"[{config.stage}] step {res.step}/{config.total_steps}"
          + (f", loss {last['loss']:.4f}" if "loss" in last else "")
          + f"; checkpoints in {args.workdir}/{config.stage}")
    return 0


def _cmd_demo(args) -> int:
    from unclip_jax.demo import run_demo

    run_demo(args.workdir, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unclip-jax", description="unCLIP (DALL-E 2) in JAX/Flax")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="text -> image with a diffusers UnCLIP pipeline directory")
    s.add_argument("--pipeline", required=True, help="a local diffusers UnCLIPPipeline directory")
    s.add_argument("--prompt", required=True, action="append",
                   help="a prompt (repeat for several); '' is the unconditional prompt")
    s.add_argument("--num", type=int, default=1, help="images per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="grid.png", help="PNG grid to write")
    s.add_argument("--prior-steps", type=int, default=25)
    s.add_argument("--decoder-steps", type=int, default=25)
    s.add_argument("--super-res-steps", type=int, default=7)
    s.add_argument("--prior-guidance", type=float, default=4.0)
    s.add_argument("--decoder-guidance", type=float, default=8.0)
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

    d = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    d.add_argument("--workdir", default="workdir/demo")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        print(f"unclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
