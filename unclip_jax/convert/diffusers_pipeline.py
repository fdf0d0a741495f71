"""Read a diffusers UnCLIPPipeline directory (e.g. kakaobrain/karlo-v1-alpha, saved locally) into
our configs and params: text encoder, tokenizer, prior (+ clip_mean/clip_std), text_proj +
decoder, super_res_first, super_res_last and the three scheduler configs. An
UnCLIPImageVariationPipeline directory (e.g. fusing/karlo-image-variations-diffusers) has the
same parts without the prior, and a CLIP image encoder + its CLIPImageProcessor instead (read by
`unclip_jax.workdir.load_image_tower`)."""
from __future__ import annotations

import json
import os
from typing import Any

from unclip_jax.diffusion import DiffusionConfig, StageSampling

#: an UnCLIPImageVariationPipeline: no prior; a CLIP image encoder and its preprocessing
VARIATION_CLASS = "UnCLIPImageVariationPipeline"
PIPELINE_CLASSES = ("UnCLIPPipeline", VARIATION_CLASS)
#: an UnCLIPPipeline's components (super_res_last may be absent)
COMPONENTS = ("tokenizer", "text_encoder", "prior", "prior_scheduler", "text_proj", "decoder",
              "decoder_scheduler", "super_res_first", "super_res_last", "super_res_scheduler")
#: each pipeline class's components
CLASS_COMPONENTS = {
    "UnCLIPPipeline": COMPONENTS,
    VARIATION_CLASS: ("tokenizer", "text_encoder", "feature_extractor", "image_encoder",
                      "text_proj", "decoder", "decoder_scheduler", "super_res_first",
                      "super_res_last", "super_res_scheduler"),
}


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
    """Return model_index.json of a diffusers UnCLIPPipeline or UnCLIPImageVariationPipeline
    directory, or raise NotAPipelineError (not a directory, no model_index.json, another class,
    missing components)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        raise NotAPipelineError(f"{path} is not a directory")
    if not os.path.exists(index):
        raise NotAPipelineError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    info = _json(index)
    cls = info.get("_class_name") if isinstance(info, dict) else None
    if cls not in PIPELINE_CLASSES:
        raise NotAPipelineError(f"{path} holds a diffusers {cls}, not an UnCLIPPipeline or an "
                                f"{VARIATION_CLASS}")
    missing = [c for c in CLASS_COMPONENTS[cls] if c != "super_res_last" and not os.path.isdir(
        os.path.join(path, c))]
    if missing:
        raise NotAPipelineError(f"{path} is missing pipeline components: {', '.join(missing)}")
    return info


def decoder_clip_dim(path: str) -> int:
    """The width of the CLIP image embeddings the pipeline's decoder takes (its text_proj's
    clip_embeddings_dim), from the config alone."""
    cfg = os.path.join(path, "text_proj", "config.json")
    if not os.path.exists(cfg):
        raise NotAPipelineError(f"{path} has no text_proj/config.json (the decoder's CLIP "
                                f"embedding projection)")
    return int(_json(cfg).get("clip_embeddings_dim", 768))


def load_components(path: str) -> dict[str, Any]:
    """Load every component of a diffusers UnCLIP pipeline directory.

    Returns a dict with: class (the pipeline's class name), tokenizer, text_encoder (config,
    params), prior (config, params; None for an UnCLIPImageVariationPipeline), decoder (config,
    params), super_res_first (config, params), super_res_last (config, params) or None, and
    prior (None without a prior) / decoder / super_res StageSampling. An
    UnCLIPImageVariationPipeline's image encoder is read by `workdir.load_image_tower(path)`.
    """
    from unclip_jax.convert.diffusers_prior import load_diffusers_prior
    from unclip_jax.convert.diffusers_unet import load_diffusers_decoder, load_diffusers_unet
    from unclip_jax.convert.hf_clip import load_hf_clip
    from unclip_jax.data.tokenizer import load_tokenizer

    cls = check_pipeline_dir(path)["_class_name"]
    has_prior = cls != VARIATION_CLASS
    sub = lambda name: os.path.join(path, name)  # noqa: E731
    kind, text_cfg, text_params = load_hf_clip(sub("text_encoder"), kind="text")
    last = sub("super_res_last")
    return dict(
        **{"class": cls},
        tokenizer=load_tokenizer(sub("tokenizer")),
        text_encoder=(text_cfg, text_params),
        prior=load_diffusers_prior(sub("prior"), sub("prior_scheduler")) if has_prior else None,
        decoder=load_diffusers_decoder(sub("decoder"), sub("text_proj")),
        super_res_first=load_diffusers_unet(sub("super_res_first")),
        super_res_last=load_diffusers_unet(last) if os.path.isdir(last) else None,
        prior_sampling=scheduler_to_diffusion(_json(os.path.join(
            sub("prior_scheduler"), "scheduler_config.json"))) if has_prior else None,
        decoder_sampling=scheduler_to_diffusion(_json(os.path.join(sub("decoder_scheduler"),
                                                                   "scheduler_config.json"))),
        super_res_sampling=scheduler_to_diffusion(_json(os.path.join(
            sub("super_res_scheduler"), "scheduler_config.json"))),
    )
