"""Read a diffusers UnCLIPPipeline directory (e.g. kakaobrain/karlo-v1-alpha, saved locally) into
our configs and params: text encoder, tokenizer, prior (+ clip_mean/clip_std), text_proj +
decoder, super_res_first, super_res_last and the three scheduler configs."""
from __future__ import annotations

import json
import os
from typing import Any

from unclip_jax.diffusion import DiffusionConfig, StageSampling

PIPELINE_CLASSES = ("UnCLIPPipeline",)
COMPONENTS = ("tokenizer", "text_encoder", "prior", "prior_scheduler", "text_proj", "decoder",
              "decoder_scheduler", "super_res_first", "super_res_last", "super_res_scheduler")


class NotAPipelineError(ValueError):
    """The directory is not a diffusers UnCLIP pipeline."""


def scheduler_to_diffusion(cfg: dict[str, Any]) -> StageSampling:
    """A diffusers UnCLIPScheduler / DDPMScheduler config -> our DiffusionConfig + clip range."""
    schedule = cfg.get("beta_schedule", "squaredcos_cap_v2")
    variance = cfg.get("variance_type", "fixed_small_log")
    diffusion = DiffusionConfig(
        schedule=schedule, num_train_steps=int(cfg.get("num_train_timesteps", 1000)),
        prediction=cfg.get("prediction_type", "epsilon"), variance=variance,
        beta_start=float(cfg.get("beta_start", 1e-4)), beta_end=float(cfg.get("beta_end", 0.02)))
    clip = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else None
    return StageSampling(diffusion, clip)


def _json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAPipelineError(f"{path} is not valid JSON ({e})") from None


def check_pipeline_dir(path: str) -> dict[str, Any]:
    """Return model_index.json of a diffusers UnCLIP pipeline, or raise NotAPipelineError."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        raise NotAPipelineError(f"{path} is not a directory")
    if not os.path.exists(index):
        raise NotAPipelineError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    info = _json(index)
    cls = info.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise NotAPipelineError(f"{path} holds a diffusers {cls}, not an UnCLIPPipeline")
    missing = [c for c in COMPONENTS if c != "super_res_last" and not os.path.isdir(
        os.path.join(path, c))]
    if missing:
        raise NotAPipelineError(f"{path} is missing pipeline components: {', '.join(missing)}")
    return info


def load_components(path: str) -> dict[str, Any]:
    """Load every component of a diffusers UnCLIP pipeline directory.

    Returns a dict with: tokenizer, text_encoder (config, params), prior (config, params),
    decoder (config, params), super_res_first (config, params), super_res_last (config, params)
    or None, and prior/decoder/super_res StageSampling.
    """
    from unclip_jax.convert.diffusers_prior import load_diffusers_prior
    from unclip_jax.convert.diffusers_unet import load_diffusers_decoder, load_diffusers_unet
    from unclip_jax.convert.hf_clip import load_hf_clip
    from unclip_jax.data.tokenizer import load_tokenizer

    check_pipeline_dir(path)
    sub = lambda name: os.path.join(path, name)  # noqa: E731
    kind, text_cfg, text_params = load_hf_clip(sub("text_encoder"), kind="text")
    last = sub("super_res_last")
    return dict(
        tokenizer=load_tokenizer(sub("tokenizer")),
        text_encoder=(text_cfg, text_params),
        prior=load_diffusers_prior(sub("prior"), sub("prior_scheduler")),
        decoder=load_diffusers_decoder(sub("decoder"), sub("text_proj")),
        super_res_first=load_diffusers_unet(sub("super_res_first")),
        super_res_last=load_diffusers_unet(last) if os.path.isdir(last) else None,
        prior_sampling=scheduler_to_diffusion(_json(os.path.join(sub("prior_scheduler"),
                                                                 "scheduler_config.json"))),
        decoder_sampling=scheduler_to_diffusion(_json(os.path.join(sub("decoder_scheduler"),
                                                                   "scheduler_config.json"))),
        super_res_sampling=scheduler_to_diffusion(_json(os.path.join(
            sub("super_res_scheduler"), "scheduler_config.json"))),
    )
