"""Our stages -> a diffusers UnCLIPPipeline directory (the inverse of the importers).

    unclip-jax export --workdir W --out DIR        # stages trained here
    unclip-jax export --pipeline P --out DIR       # an imported pipeline, written back

writes what ``UnCLIPPipeline.save_pretrained`` writes: ``model_index.json`` (its text_proj entry
the one today's diffusers can use: see ``TEXT_PROJ_NOTE``); ``text_encoder/``
(transformers ``CLIPTextModelWithProjection``: config.json + model.safetensors);
``tokenizer/`` (``save_pretrained``); ``prior/`` (``PriorTransformer`` with clip_mean /
clip_std), ``text_proj/`` (``UnCLIPTextProjModel``) + ``decoder/`` (``UNet2DConditionModel``),
``super_res_first/`` and ``super_res_last/`` (``UNet2DModel``), each config.json +
diffusion_pytorch_model.safetensors; and the three ``*_scheduler/scheduler_config.json``
(``UnCLIPScheduler``). Safetensors only; no torch, transformers or diffusers is imported (the
tokenizer is saved by its own class).

One mechanism for every weight: the importers write each tensor through a writer,
``writer.set(flax path, torch key, layout)`` (``hf_clip._text_tower``,
``diffusers_prior.write_prior``, ``diffusers_unet._write_unet`` / ``write_text_proj``).
Here the same functions run against a ``torch_io.ParamRecorder``, and every recorded entry is
written back through the inverse of its layout (``torch_io.invert``: linear, conv2d, identity
and the ``Layout`` reshapes / permutations). Configs go the same way back: each one is written
in diffusers' / transformers' terms and read back with the importer's own reader
(``unet_config_from_diffusers``, ``prior_config_from_diffusers``, ``clip_config_from_hf``,
``decoder_config_from_diffusers``); an option that does not read back as it is (``patch_size``,
``output_skip``, ``coord_input``, ``noise_level_cond``, ...) is one diffusers cannot express, and
the export is refused naming the stage, the option and its value, before anything is written.
Before writing, every state dict is imported again by the importer and compared with our params
bit for bit.

What UnCLIPPipeline holds, and so what is refused: one diffusion prior predicting x0 and
un-normalising with clip_mean / clip_std (``embedding_norm='meanstd'``; no AR prior: a workdir's
``ar_prior/`` is left out, saying so), a decoder predicting a learned-range variance (the
pipeline splits its output in halves), exactly one upsampler step, the cosine schedule,
epsilon or x0 prediction (UnCLIPScheduler has no v / EDM), fixed_small_log or learned_range
variances (fixed_small is written as fixed_small_log: the same ancestral sampler), and widths
that fit together as the pipeline passes them on (CLIP text width = the prior's embedding width
= the decoder's; the tokenizer's length = the prior's text tokens). The upsampler of a workdir
(one network for every step) is written as both ``super_res_first`` and ``super_res_last``
(the pipeline runs ``super_res_last`` at the final step only), so the pipeline samples what ours
samples. Not expressible in the files and so only noted: a recorded sampling method other than
DDPM (UnCLIPScheduler is ancestral), DDIM's eta, and the recorded guidance scales (the
pipeline's call arguments).

The output is written into a temporary sibling directory and renamed to ``out_dir`` at the end;
an existing non-empty ``out_dir`` is refused, and nothing is left behind on an error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import numpy as np

from unclip_jax.convert import torch_io
from unclip_jax.diffusion import StageSampling

__all__ = ["ExportError", "export_components", "export_workdir", "export_pipeline",
           "check_components", "text_encoder_config", "prior_config", "unet_config",
           "text_proj_config", "scheduler_config", "model_index"]

#: the diffusers / transformers versions written when they are not installed (the ones the
#: files were checked against)
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.24.0"
_COND, _PLAIN = "UNet2DConditionModel", "UNet2DModel"
_WEIGHTS = {"text_encoder": "model.safetensors"}
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_SAFETENSORS_META = {"format": "pt"}  # what torch's save_pretrained writes; transformers checks it
#: loader arguments transformers saves into tokenizer_config.json after from_pretrained
_TOKENIZER_LOAD_KEYS = ("is_local", "local_files_only")
#: the components of an UnCLIPPipeline and their (library, class)
_INDEX = {
    "decoder": ("diffusers", _COND), "decoder_scheduler": ("diffusers", "UnCLIPScheduler"),
    "prior": ("diffusers", "PriorTransformer"), "prior_scheduler": ("diffusers", "UnCLIPScheduler"),
    "super_res_first": ("diffusers", _PLAIN), "super_res_last": ("diffusers", _PLAIN),
    "super_res_scheduler": ("diffusers", "UnCLIPScheduler"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    # diffusers cannot load its deprecated UnCLIPTextProjModel by name any more: its own
    # save_pretrained writes ["diffusers", ...], which from_pretrained then refuses even when the
    # module is passed in, and Karlo's ["unclip", ...] names a pipeline package that moved. Under
    # its package now, from_pretrained(DIR, text_proj=UnCLIPTextProjModel.from_pretrained(DIR,
    # subfolder="text_proj")) loads the directory (TEXT_PROJ_NOTE).
    "text_proj": ("deprecated", "UnCLIPTextProjModel"),
}
TEXT_PROJ_NOTE = ("diffusers loads text_proj only when it is passed in: UnCLIPPipeline."
                  "from_pretrained(DIR, text_proj=UnCLIPTextProjModel.from_pretrained(DIR, "
                  "subfolder='text_proj')), UnCLIPTextProjModel from "
                  "diffusers.pipelines.deprecated.unclip.text_proj")


class ExportError(ValueError):
    """A stage diffusers' UnCLIPPipeline cannot express, or an output that cannot be written."""


def _version(dist: str, default: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return default


def _dumps(d: Mapping[str, Any]) -> str:
    """JSON as diffusers and transformers write their configs: sorted, indent 2, a newline."""
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# where a problem is: the stage's name and the prefix of its options' names
@dataclasses.dataclass(frozen=True)
class _Where:
    label: str         # "the decoder (W/decoder)" or "decoder"
    model: str = ""    # prefix of model options ("model.", "model.unet.", "model.text.")
    diffusion: str = "diffusion."
    sampling: str = "sampling."


def _problem(where: _Where, option: str, value, why: str) -> str:
    return f"{where.label}: {option}={value!r} {why}"


def _view(cfg, drop=()) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k not in drop}


def _compare(ours: dict, back: dict, where: _Where, prefix: str, what: str,
             hints: Mapping[str, str]) -> list[str]:
    """The options whose value does not read back from what we write: diffusers cannot express
    them."""
    out = []
    for k in ours:
        if ours[k] != back.get(k):
            why = hints.get(k) or (f"has no counterpart in {what} (written and read back it "
                                   f"becomes {back.get(k)!r})")
            out.append(_problem(where, prefix + k, _plain(ours[k]), why))
    return out


def _plain(v):
    return tuple(v) if isinstance(v, list) else v


# ---------------------------------------------------------------------------------------------
# configs: ours -> diffusers' / transformers'
_RUNTIME = ("dtype", "param_dtype", "attention_impl", "remat", "remat_policy", "scan_layers")


def text_encoder_config(cfg) -> dict[str, Any]:
    """A CLIPTextConfig (with its projection_dim) -> transformers' CLIPTextConfig config.json
    of a CLIPTextModelWithProjection."""
    return {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
        "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "dtype": "float32",
        "eos_token_id": int(cfg.eos_token_id), "hidden_act": cfg.hidden_act,
        "hidden_size": int(cfg.hidden_size), "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": int(cfg.intermediate_size),
        "layer_norm_eps": float(cfg.layer_norm_eps),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "num_attention_heads": int(cfg.num_heads), "num_hidden_layers": int(cfg.num_layers),
        "pad_token_id": cfg.pad_token_id,
        "projection_dim": None if cfg.projection_dim is None else int(cfg.projection_dim),
        "transformers_version": _version("transformers", TRANSFORMERS_VERSION),
        "vocab_size": int(cfg.vocab_size),
    }


def prior_config(cfg) -> dict[str, Any]:
    """A PriorConfig -> diffusers' PriorTransformer config.json."""
    return {
        "_class_name": "PriorTransformer",
        "_diffusers_version": _version("diffusers", DIFFUSERS_VERSION),
        "added_emb_type": cfg.added_emb_type,
        "additional_embeddings": int(cfg.additional_embeddings),
        "attention_head_dim": int(cfg.head_dim), "clip_embed_dim": cfg.clip_embed_dim,
        "dropout": float(cfg.dropout), "embedding_dim": int(cfg.embedding_dim),
        "embedding_proj_dim": cfg.embedding_proj_dim,
        "embedding_proj_norm_type": cfg.embedding_proj_norm_type,
        "encoder_hid_proj_type": cfg.encoder_hid_proj_type, "norm_in_type": cfg.norm_in_type,
        "num_attention_heads": int(cfg.num_heads), "num_embeddings": int(cfg.num_text_tokens),
        "num_layers": int(cfg.num_layers), "time_embed_act_fn": cfg.time_embed_act_fn,
        "time_embed_dim": cfg.time_embed_dim,
    }


def _uses_attention(cfg) -> bool:
    return any(cfg.attention_levels) or cfg.mid_block == "attention"


def _head_dims(cfg):
    """attention_head_dim as diffusers writes it: one int when every level's is the same."""
    down = cfg.head_dims_down()
    if len(set(down)) == 1 and cfg.up_attention_head_dim is None \
            and cfg.mid_attention_head_dim in (None, down[-1]):
        return int(down[0])
    return [int(h) for h in down]


def _lpb(cfg):
    layers = cfg.layers
    return int(layers[0]) if len(set(layers)) == 1 else [int(n) for n in layers]


def unet_config(cfg, cls: str) -> dict[str, Any]:
    """A UNetConfig -> diffusers' UNet2DConditionModel (the decoder) or UNet2DModel (the
    super-res UNets) config.json. Options diffusers has no word for are left out (the read-back
    check then names them)."""
    version = _version("diffusers", DIFFUSERS_VERSION)
    n = cfg.num_levels
    common = {
        "_diffusers_version": version, "act_fn": "silu",
        "block_out_channels": [int(c) for c in cfg.block_out_channels],
        "center_input_sample": False, "downsample_padding": 1, "dropout": float(cfg.dropout),
        "flip_sin_to_cos": bool(cfg.flip_sin_to_cos), "freq_shift": cfg.freq_shift,
        "in_channels": int(cfg.in_channels), "layers_per_block": _lpb(cfg),
        "mid_block_scale_factor": cfg.mid_output_scale, "norm_eps": float(cfg.norm_eps),
        "norm_num_groups": int(cfg.norm_groups), "num_class_embeds": None,
        "out_channels": int(cfg.out_channels),
        "resnet_time_scale_shift": cfg.resnet_time_scale_shift,
        "sample_size": None if cfg.sample_size is None else int(cfg.sample_size),
        "time_embedding_dim": cfg.time_embed_dim, "time_embedding_type": "positional",
    }
    if cls == _COND:
        down = ["SimpleCrossAttnDownBlock2D" if a else
                ("ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D")
                for a in cfg.attention_levels]
        up = ["SimpleCrossAttnUpBlock2D" if a else
              ("ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D")
              for a in reversed(cfg.attention_levels)]
        mid = {"attention": "UNetMidBlock2DSimpleCrossAttn", "resnet": "UNetMidBlock2D",
               "none": None}.get(cfg.mid_block, "UNetMidBlock2D")
        return dict(common, **{
            "_class_name": _COND, "addition_embed_type": None,
            "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None,
            "attention_head_dim": _head_dims(cfg), "attention_type": "default",
            "class_embed_type": "identity" if cfg.time_cond else None,
            "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "cross_attention_dim": None if cfg.context_dim is None else int(cfg.context_dim),
            "cross_attention_norm": None, "down_block_types": down,
            "dual_cross_attention": False, "encoder_hid_dim": None,
            "encoder_hid_dim_type": None, "mid_block_only_cross_attention": None,
            "mid_block_type": mid, "num_attention_heads": None, "only_cross_attention": False,
            "projection_class_embeddings_input_dim": None,
            "resnet_out_scale_factor": float(cfg.resnet_output_scale),
            "resnet_skip_time_act": bool(cfg.resnet_skip_time_act),
            "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None,
            "time_embedding_act_fn": None, "timestep_post_act": None,
            "transformer_layers_per_block": 1, "up_block_types": up,
            "upcast_attention": False, "use_linear_projection": False,
        })
    block = "ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D"
    up_block = "ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"
    attention = cfg.mid_block == "attention"
    return dict(common, **{
        "_class_name": _PLAIN, "add_attention": attention,
        "attention_head_dim": int(cfg.head_dim_mid()) if attention else 8,
        "attn_norm_num_groups": int(cfg.attn_norm_groups or cfg.norm_groups)
        if attention and cfg.attn_norm else None,
        "class_embed_type": "identity" if cfg.time_cond else None,
        "down_block_types": [block] * n, "downsample_type": "conv",
        "mid_block_type": None if cfg.mid_block == "none" else "UNetMidBlock2D",
        "num_train_timesteps": None, "up_block_types": [up_block] * n, "upsample_type": "conv",
    })


def text_proj_config(cfg) -> dict[str, Any]:
    """A DecoderConfig's CLIP conditioning -> diffusers' UnCLIPTextProjModel config.json."""
    return {"_class_name": "UnCLIPTextProjModel",
            "_diffusers_version": _version("diffusers", DIFFUSERS_VERSION),
            "clip_embeddings_dim": int(cfg.clip_embed_dim),
            "clip_extra_context_tokens": int(cfg.clip_extra_context_tokens),
            "cross_attention_dim": int(cfg.unet.context_dim),
            "time_embed_dim": int(cfg.unet.emb_dim)}


_PREDICTION = {"eps": "epsilon", "x0": "sample"}
_VARIANCE = {"fixed_small_log": "fixed_small_log", "fixed_small": "fixed_small_log",
             "learned_range": "learned_range"}


def scheduler_config(sampling: StageSampling) -> dict[str, Any]:
    """A StageSampling -> diffusers' UnCLIPScheduler scheduler_config.json (what it can say:
    check_components refuses the rest)."""
    d = sampling.diffusion
    return {"_class_name": "UnCLIPScheduler",
            "_diffusers_version": _version("diffusers", DIFFUSERS_VERSION),
            "beta_schedule": "squaredcos_cap_v2", "clip_sample": sampling.clip_x0 is not None,
            "clip_sample_range": 1.0 if sampling.clip_x0 is None else float(sampling.clip_x0),
            "num_train_timesteps": int(d.num_train_steps),
            "prediction_type": _PREDICTION.get(d.prediction, d.prediction),
            "variance_type": _VARIANCE.get(d.variance, d.variance)}


def model_index(tokenizer) -> dict[str, Any]:
    """model_index.json of an UnCLIPPipeline as diffusers writes it; the tokenizer entry is its
    own class (what diffusers' save_pretrained records)."""
    d = {"_class_name": "UnCLIPPipeline",
         "_diffusers_version": _version("diffusers", DIFFUSERS_VERSION)}
    d.update({k: list(v) for k, v in _INDEX.items()})
    d["tokenizer"] = ["transformers", type(tokenizer).__name__]
    return d


# ---------------------------------------------------------------------------------------------
# what reads back (the importers' readers) and what the pipeline needs
def _unet_view(cfg, *, plain: bool) -> dict[str, Any]:
    """The options that make a UNet what it is, in effective terms (unused ones left out)."""
    d = _view(cfg, _RUNTIME + ("attention_head_dim", "up_attention_head_dim",
                               "mid_attention_head_dim", "attn_norm", "attn_norm_groups",
                               "attn_norm_eps", "mid_attn_output_scale", "context_dim"))
    d["layers_per_block"] = list(cfg.layers)
    attn = cfg.attention_levels
    if any(attn):
        d["attention_head_dim"] = [h for h, a in zip(cfg.head_dims_down(), attn) if a]
        d["up_attention_head_dim"] = [h for h, a in zip(cfg.head_dims_up(), reversed(attn)) if a]
    if cfg.mid_block == "attention":
        d["mid_attention_head_dim"] = cfg.head_dim_mid()
        d["mid_attn_output_scale"] = cfg.mid_attn_output_scale
    if _uses_attention(cfg):
        d["attn_norm"] = cfg.attn_norm
        if cfg.attn_norm:
            d["attn_norm_groups"] = cfg.attn_norm_groups or cfg.norm_groups
            d["attn_norm_eps"] = cfg.attn_norm_eps
        if not plain:
            d["context_dim"] = cfg.context_dim
    return d


_UNET_HINTS = {
    "patch_size": "has no counterpart in diffusers' UNets (they take pixels, not p x p "
                  "patches folded into channels)",
    "output_skip": "has no counterpart in diffusers' UNets (they do not add input channels to "
                   "their output)",
    "coord_input": "has no counterpart in diffusers' UNets (they take no coordinate channels)",
    "noise_level_cond": "has no counterpart in UnCLIPPipeline (it calls the super-res UNets "
                        "without a noise level)",
    "time_cond": "has no counterpart in UnCLIPPipeline's super-res UNets (it passes them no "
                 "class labels)",
}


def _check_unet(cfg, cls: str, where: _Where) -> list[str]:
    from unclip_jax.convert.diffusers_unet import unet_config_from_diffusers

    what = f"diffusers' {cls}"
    try:
        back = unet_config_from_diffusers(unet_config(cfg, cls))
    except ValueError as e:
        # the config we write is refused by the reader: name the first option that differs
        # from a supported one (the reader's message says which)
        return [f"{where.label}: its UNet has no counterpart in {what} ({e})"]
    return _compare(_unet_view(cfg, plain=cls == _PLAIN), _unet_view(back, plain=cls == _PLAIN),
                    where, where.model, what, _UNET_HINTS)


def _check_sampling(s: StageSampling, where: _Where, *, prior: bool) -> tuple[list[str], list[str]]:
    """(problems, notes) of a stage's diffusion and sampling as an UnCLIPScheduler."""
    d = s.diffusion
    p, notes = [], []
    if d.schedule not in ("cosine", "squaredcos_cap_v2"):
        p.append(_problem(where, where.diffusion + "schedule", d.schedule,
                          "is not UnCLIPScheduler's (only the cosine schedule, "
                          "squaredcos_cap_v2)"))
    if prior and d.prediction != "x0":
        p.append(_problem(where, where.diffusion + "prediction", d.prediction,
                          "is not what UnCLIPPipeline's prior predicts (x0: 'sample')"))
    elif d.prediction not in _PREDICTION:
        p.append(_problem(where, where.diffusion + "prediction", d.prediction,
                          "has no counterpart in UnCLIPScheduler (prediction_type 'epsilon' or "
                          "'sample' only: eps or x0)"))
    if d.variance not in _VARIANCE:
        p.append(_problem(where, where.diffusion + "variance", d.variance,
                          "has no counterpart in UnCLIPScheduler (variance_type "
                          "'fixed_small_log' or 'learned_range')"))
    if s.method != "ddpm":
        notes.append(f"{where.label} records {where.sampling}method={s.method!r}; "
                     f"UnCLIPScheduler samples DDPM (ancestral)")
    if s.guidance is not None and not prior:
        notes.append(f"{where.label} records {where.sampling}guidance={s.guidance}; in diffusers "
                     f"it is the pipeline call's decoder_guidance_scale")
    return p, notes


_CHANNEL_HINT = ("UnCLIPPipeline samples 3-channel images and splits a UNet's output into "
                 "halves exactly when its scheduler's variance is learned_range")


def _check_channels(cfg, s: StageSampling, where: _Where, in_channels: int) -> list[str]:
    p = []
    if cfg.in_channels != in_channels:
        p.append(_problem(where, where.model + "in_channels", cfg.in_channels,
                          f"is not what UnCLIPPipeline feeds this UNet ({in_channels})"))
    want = 6 if s.diffusion.variance == "learned_range" else 3
    if cfg.out_channels != want:
        p.append(_problem(where, where.model + "out_channels", cfg.out_channels,
                          f"does not fit variance={s.diffusion.variance!r} ({want} channels): "
                          + _CHANNEL_HINT))
    return p


def check_components(components: Mapping[str, Any], where: Mapping[str, _Where] | None = None
                     ) -> tuple[list[str], list[str]]:
    """(problems, notes) of exporting `components` (load_components' dict; params may be None:
    configs alone are checked). Every problem names the stage, the option and its value."""
    from unclip_jax.convert.diffusers_prior import prior_config_from_diffusers
    from unclip_jax.convert.diffusers_unet import decoder_config_from_diffusers
    from unclip_jax.convert.hf_clip import clip_config_from_hf

    w = {k: _Where(k) for k in ("text_encoder", "prior", "decoder", "super_res_first",
                                "super_res_last", "tokenizer")}
    w.update(where or {})
    problems: list[str] = []
    notes: list[str] = []
    if components.get("prior") is None:
        problems.append(f"{w['prior'].label}: there is none (an UnCLIPImageVariationPipeline?); "
                        f"UnCLIPPipeline needs a diffusion prior")
        return problems, notes
    text_cfg = components["text_encoder"][0]
    prior_cfg = components["prior"][0]
    dec_cfg = components["decoder"][0]
    sr_first = components["super_res_first"]
    if sr_first is None:
        problems.append(f"{w['super_res_first'].label}: there is none; UnCLIPPipeline always "
                        f"runs an upsampler (super_res_first / super_res_last)")
    sr = [("super_res_first", sr_first)]
    if components.get("super_res_last") is not None:
        sr.append(("super_res_last", components["super_res_last"]))

    # the text encoder
    tw = w["text_encoder"]
    if text_cfg.projection_dim is None:
        problems.append(_problem(tw, tw.model + "projection_dim", None,
                                 "leaves no text projection; UnCLIPPipeline's text encoder is "
                                 "a CLIPTextModelWithProjection"))
    else:
        back = clip_config_from_hf(text_encoder_config(text_cfg))
        problems += _compare(_view(text_cfg, _RUNTIME), _view(back, _RUNTIME), tw, tw.model,
                             "transformers' CLIPTextConfig", {})
    # the prior
    pw = w["prior"]
    if prior_cfg.embedding_norm != "meanstd":
        problems.append(_problem(pw, pw.model + "embedding_norm", prior_cfg.embedding_norm,
                                 "has no counterpart in diffusers' PriorTransformer (it "
                                 "un-normalises with clip_mean / clip_std only: 'meanstd')"))
    else:
        back = prior_config_from_diffusers(prior_config(prior_cfg))
        drop = _RUNTIME + ("clip_x0", "embedding_scale")
        problems += _compare(_view(prior_cfg, drop), _view(back, drop), pw, pw.model,
                             "diffusers' PriorTransformer", {})
    sp, sn = _check_sampling(components["prior_sampling"], pw, prior=True)
    problems += sp
    notes += sn
    # the decoder: its UNet, its CLIP conditioning, its sampling
    dw = w["decoder"]
    unet_where = dataclasses.replace(dw, model=dw.model + "unet.")
    problems += _check_unet(dec_cfg.unet, _COND, unet_where)
    problems += _check_channels(dec_cfg.unet, components["decoder_sampling"], unet_where, 3)
    if dec_cfg.text_dim != dec_cfg.clip_embed_dim:
        problems.append(_problem(dw, dw.model + "text_hidden_dim", dec_cfg.text_hidden_dim,
                                 f"differs from clip_embed_dim={dec_cfg.clip_embed_dim}: "
                                 f"diffusers' UnCLIPTextProjModel projects text hidden states "
                                 f"of the CLIP embedding's width"))
    try:
        back = decoder_config_from_diffusers(unet_config(dec_cfg.unet, _COND),
                                             text_proj_config(dec_cfg))
        if back.text_norm_eps != dec_cfg.text_norm_eps:
            problems.append(_problem(dw, dw.model + "text_norm_eps", dec_cfg.text_norm_eps,
                                     f"is not UnCLIPTextProjModel's ({back.text_norm_eps})"))
    except ValueError:
        pass  # the UNet check above names it
    sp, sn = _check_sampling(components["decoder_sampling"], dw, prior=False)
    problems += sp
    notes += sn
    # the upsampler(s)
    for name, comp in sr:
        if comp is None:
            continue
        uw = w[name]
        problems += _check_unet(comp[0], _PLAIN, uw)
        if comp[0].time_cond:
            problems.append(_problem(uw, uw.model + "time_cond", True, _UNET_HINTS["time_cond"]))
        problems += _check_channels(comp[0], components["super_res_sampling"], uw, 6)
    if sr_first is not None:
        sp, sn = _check_sampling(components["super_res_sampling"], w["super_res_first"],
                                 prior=False)
        problems += sp
        notes += sn
    # widths and lengths as the pipeline passes them on
    problems += _check_fit(components, text_cfg, prior_cfg, dec_cfg, w)
    return problems, notes


def _context_length(tokenizer, text_cfg) -> int:
    """The text length our pipeline uses (UnCLIPPipeline.context_length)."""
    return min(int(text_cfg.max_position_embeddings),
               int(getattr(tokenizer, "model_max_length", 10 ** 9)))


def _check_fit(components, text_cfg, prior_cfg, dec_cfg, w) -> list[str]:
    p = []
    pw, dw, tw = w["prior"], w["decoder"], w["text_encoder"]
    width = int(text_cfg.hidden_size)
    proj = text_cfg.projection_dim
    hid_in = prior_cfg.embedding_dim if prior_cfg.encoder_hid_proj_type == "linear" \
        else prior_cfg.width
    if hid_in != width:
        p.append(_problem(pw, pw.model + ("embedding_dim" if prior_cfg.encoder_hid_proj_type ==
                                          "linear" else "width"), hid_in,
                          f"does not take the CLIP text encoder's hidden states (width {width})"))
    if proj is not None and prior_cfg.text_embed_dim != proj:
        p.append(_problem(pw, pw.model + "embedding_proj_dim", prior_cfg.text_embed_dim,
                          f"does not take the CLIP text embedding (projection_dim {proj})"))
    if prior_cfg.out_dim != dec_cfg.clip_embed_dim:
        p.append(_problem(dw, dw.model + "clip_embed_dim", dec_cfg.clip_embed_dim,
                          f"does not take the prior's image embeddings (width "
                          f"{prior_cfg.out_dim})"))
    if proj is not None and dec_cfg.clip_embed_dim != proj:
        p.append(_problem(dw, dw.model + "clip_embed_dim", dec_cfg.clip_embed_dim,
                          f"differs from the CLIP text embedding's width {proj}: "
                          f"UnCLIPTextProjModel projects both with clip_embeddings_dim"))
    if dec_cfg.text_dim != width:
        p.append(_problem(dw, dw.model + "text_hidden_dim", dec_cfg.text_dim,
                          f"does not take the CLIP text encoder's hidden states (width {width})"))
    length = _context_length(components["tokenizer"], text_cfg)
    if prior_cfg.num_text_tokens != length:
        p.append(_problem(pw, pw.model + "num_text_tokens", prior_cfg.num_text_tokens,
                          f"differs from the text length the pipeline tokenizes to ({length}: "
                          f"the tokenizer's model_max_length and CLIP's "
                          f"max_position_embeddings)"))
    return p


def _refuse(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 \
            else ""
        raise ExportError(f"cannot export to diffusers: {problems[0]}{more}")


# ---------------------------------------------------------------------------------------------
# weights: the importers' entries, recorded and inverted
def _entries(write: Callable) -> list:
    rec = torch_io.ParamRecorder()
    write(rec)
    return rec.entries


def _text_state_dict(cfg, params) -> dict[str, np.ndarray]:
    from unclip_jax.convert import hf_clip

    def write(w):
        hf_clip._text_tower(w, cfg, "text_model.")
        hf_clip._dense(w, ("text_projection",), "text_projection", bias=False)
    return torch_io.torch_state_dict(params, _entries(write), "the CLIP text tower")


def _prior_state_dict(cfg, params) -> dict[str, np.ndarray]:
    from unclip_jax.convert.diffusers_prior import write_prior
    from unclip_jax.models.prior import unstack_block_params

    if cfg.scan_layers:  # one stacked block -> blocks_0 ... blocks_{n-1}
        params = unstack_block_params(params)
    return torch_io.torch_state_dict(params, _entries(lambda w: write_prior(w, cfg)), "the prior")


def _unet_state_dict(params, what: str) -> dict[str, np.ndarray]:
    from unclip_jax.convert.diffusers_unet import _write_unet

    return torch_io.torch_state_dict(params, _entries(lambda w: _write_unet(w, params)), what)


def _decoder_state_dicts(cfg, params):
    from unclip_jax.convert.diffusers_unet import write_text_proj

    rest = {k: v for k, v in params.items() if k != "unet"}
    return (_unet_state_dict(params["unet"], "the decoder UNet"),
            torch_io.torch_state_dict(rest, _entries(lambda w: write_text_proj(w, cfg)),
                                      "the decoder's CLIP conditioning"))


def _same(ours, back, what: str) -> None:
    """Our params and the importer's reading of what we wrote: the same tensors, bit for bit."""
    import jax

    a = {"/".join(str(getattr(k, "key", k)) for k in p): v
         for p, v in jax.tree_util.tree_leaves_with_path(ours)}
    b = {"/".join(str(getattr(k, "key", k)) for k in p): v
         for p, v in jax.tree_util.tree_leaves_with_path(back)}
    if set(a) != set(b):
        raise ExportError(f"{what}: the written tensors read back as another model "
                          f"({sorted(set(a) ^ set(b))[:3]})")
    for k in a:
        x, y = np.asarray(a[k], np.float32), np.asarray(b[k], np.float32)
        if x.shape != y.shape or not np.array_equal(x.view(np.uint32), y.view(np.uint32)):
            raise ExportError(f"{what}: tensor {k} does not read back bit for bit")


def _build(components: Mapping[str, Any]) -> dict[str, Any]:
    """Every file but the tokenizer's, in memory: {relative path: dict (JSON) or state dict},
    each state dict checked by importing it again."""
    from unclip_jax.convert.diffusers_prior import convert_prior, prior_config_from_diffusers
    from unclip_jax.convert.diffusers_unet import (
        convert_decoder, convert_unet, decoder_config_from_diffusers, unet_config_from_diffusers)
    from unclip_jax.convert.hf_clip import clip_config_from_hf, convert_clip_text
    from unclip_jax.models.prior import unstack_block_params

    files: dict[str, Any] = {}
    text_cfg, text_params = components["text_encoder"]
    c = text_encoder_config(text_cfg)
    sd = _text_state_dict(text_cfg, text_params)
    _same(text_params, convert_clip_text(sd, clip_config_from_hf(c), prefix="text_model."),
          "the text encoder")
    files["text_encoder/config.json"], files["text_encoder/model.safetensors"] = c, sd

    prior_cfg, prior_params = components["prior"]
    c = prior_config(prior_cfg)
    sched = scheduler_config(components["prior_sampling"])
    sd = _prior_state_dict(prior_cfg, prior_params)
    _same(unstack_block_params(prior_params) if prior_cfg.scan_layers else prior_params,
          convert_prior(sd, prior_config_from_diffusers(c, sched)), "the prior")
    files["prior/config.json"], files[f"prior/{_DIFFUSERS_WEIGHTS}"] = c, sd
    files["prior_scheduler/scheduler_config.json"] = sched

    dec_cfg, dec_params = components["decoder"]
    uc, tc = unet_config(dec_cfg.unet, _COND), text_proj_config(dec_cfg)
    usd, tsd = _decoder_state_dicts(dec_cfg, dec_params)
    _same(dec_params, convert_decoder(usd, tsd, decoder_config_from_diffusers(uc, tc)),
          "the decoder")
    files["decoder/config.json"], files[f"decoder/{_DIFFUSERS_WEIGHTS}"] = uc, usd
    files["text_proj/config.json"], files[f"text_proj/{_DIFFUSERS_WEIGHTS}"] = tc, tsd
    files["decoder_scheduler/scheduler_config.json"] = scheduler_config(
        components["decoder_sampling"])

    first = components["super_res_first"]
    last = components.get("super_res_last") or first  # one network: it takes the last step too
    for name, (cfg, params) in (("super_res_first", first), ("super_res_last", last)):
        c = unet_config(cfg, _PLAIN)
        sd = _unet_state_dict(params, f"the {name} UNet")
        _same(params, convert_unet(sd, unet_config_from_diffusers(c)), name)
        files[f"{name}/config.json"], files[f"{name}/{_DIFFUSERS_WEIGHTS}"] = c, sd
    files["super_res_scheduler/scheduler_config.json"] = scheduler_config(
        components["super_res_sampling"])
    files["model_index.json"] = model_index(components["tokenizer"])
    return files


# ---------------------------------------------------------------------------------------------
# the output directory: checked first, written into a sibling, renamed at the end
def check_out_dir(out_dir: str) -> str:
    """The absolute output path, if it can be written: it does not exist or is an empty
    directory, and its parent is a writable directory. ExportError / FileNotFoundError
    otherwise."""
    out = os.path.abspath(out_dir)
    if os.path.exists(out) or os.path.islink(out):
        if not os.path.isdir(out):
            raise ExportError(f"--out {out_dir} exists and is not a directory")
        if os.listdir(out):
            raise ExportError(f"--out {out_dir} exists and is not empty: give a new directory "
                              f"(nothing is overwritten)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--out {out_dir}: its directory {parent} does not exist")
    try:
        probe = tempfile.mkdtemp(prefix=".unclip-jax-write-test-", dir=parent)
    except OSError as e:
        raise ExportError(f"--out {out_dir}: cannot write in {parent} "
                          f"({e.strerror or type(e).__name__})") from None
    os.rmdir(probe)
    return out


def _write_files(files: Mapping[str, Any], tokenizer, context_length: int, root: str) -> None:
    from safetensors.numpy import save_file

    for rel, content in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if rel.endswith(".safetensors"):
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in content.items()}, path,
                      metadata=_SAFETENSORS_META)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(_dumps(content))
    tok_dir = os.path.join(root, "tokenizer")
    tokenizer.save_pretrained(tok_dir)
    # the length UnCLIPPipeline pads to is the tokenizer's: the one our pipeline uses; and the
    # loader's own arguments are not part of the tokenizer
    cfg_path = os.path.join(tok_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tok_cfg = json.load(f)
    tok_cfg["model_max_length"] = int(context_length)
    for k in _TOKENIZER_LOAD_KEYS:
        tok_cfg.pop(k, None)
    with open(cfg_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def export_components(components: Mapping[str, Any], out_dir: str, *,
                      where: Mapping[str, _Where] | None = None,
                      log: Callable[[str], None] | None = None) -> str:
    """Write `components` (``diffusers_pipeline.load_components``' dict: tokenizer,
    text_encoder, prior, decoder, super_res_first, super_res_last (None: super_res_first's
    network), prior/decoder/super_res_sampling; other keys are ignored) as a diffusers
    UnCLIPPipeline directory `out_dir`. Refused (ExportError, nothing written) when diffusers
    cannot express a part, naming it. Returns the absolute path written."""
    log = log or (lambda msg: None)
    out = check_out_dir(out_dir)
    problems, notes = check_components(components, where)
    _refuse(problems)
    for n in notes:
        log(f"note: {n}")
    files = _build(components)
    length = _context_length(components["tokenizer"], components["text_encoder"][0])
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.export-", dir=os.path.dirname(out))
    try:
        _write_files(files, components["tokenizer"], length, tmp)
        os.chmod(tmp, 0o755 & ~_umask())
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked); a file put there meanwhile stops the rename
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    count = sum(len(fs) for _, _, fs in os.walk(out))
    log(f"wrote {out} ({count} files, {size / 2 ** 20:.1f} MiB): a diffusers UnCLIPPipeline; "
        f"{TEXT_PROJ_NOTE}")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_pipeline(path: str, out_dir: str, *, log: Callable[[str], None] | None = None) -> str:
    """Read a diffusers UnCLIPPipeline directory with the importers and write it back."""
    from unclip_jax.convert.diffusers_pipeline import check_pipeline_dir, load_components

    check_out_dir(out_dir)
    if check_pipeline_dir(path)["_class_name"] != "UnCLIPPipeline":
        raise ValueError(f"{path} is an UnCLIPImageVariationPipeline: it has no prior, and "
                         f"export writes UnCLIPPipeline directories, which need one")
    (log or (lambda m: None))(f"reading the diffusers pipeline {path}")
    return export_components(load_components(path), out_dir, log=log)


def _workdir_where(workdir: str, upsampler: str) -> dict[str, _Where]:
    def at(name, stage, model):
        return _Where(f"the {stage} stage ({os.path.join(workdir, name)})", model)
    up = at(upsampler, "upsampler", "model.")
    return {"text_encoder": at("clip", "CLIP", "model.text."), "tokenizer": at("clip", "CLIP", ""),
            "prior": at("prior", "prior", "model."), "decoder": at("decoder", "decoder", "model."),
            "super_res_first": up, "super_res_last": up}


def _workdir_records(workdir: str) -> dict[str, Any]:
    """What a workdir's stage records say (configs and sampling, params None), with the
    tokenizer: enough to check the export before a checkpoint is read."""
    from unclip_jax.data.tokenizer import load_tokenizer
    from unclip_jax.workdir import (
        RecordError, has_checkpoints, read_record, stage_dir, upsampler_chain)

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir} is not a directory")
    for s in ("clip", "prior", "decoder"):
        if has_checkpoints(stage_dir(workdir, s)):
            continue
        if s == "prior" and has_checkpoints(stage_dir(workdir, "ar_prior")):
            raise ExportError(f"cannot export to diffusers: {workdir} has an autoregressive "
                              f"prior (ar_prior/) but no diffusion prior (prior/), and "
                              f"UnCLIPPipeline holds a diffusion PriorTransformer only")
        raise FileNotFoundError(f"{workdir} has no trained {s} stage ({stage_dir(workdir, s)})")
    recs = {s: read_record(stage_dir(workdir, s), expect=s) for s in ("clip", "prior", "decoder")}
    ups = [u for u in upsampler_chain(workdir) if has_checkpoints(stage_dir(workdir, u))]
    if not ups:
        raise ExportError(f"cannot export to diffusers: {workdir} has no trained upsampler "
                          f"(upsampler/), and UnCLIPPipeline always runs one (super_res_first "
                          f"/ super_res_last)")
    if len(ups) > 1:
        raise ExportError(f"cannot export to diffusers: {workdir} has a cascade of {len(ups)} "
                          f"upsamplers ({', '.join(ups)}), and UnCLIPPipeline holds one step "
                          f"(super_res_first / super_res_last)")
    up = read_record(stage_dir(workdir, ups[0]), expect="upsampler")
    clip = recs["clip"].model_config()
    tok = recs["clip"].paths.get("tokenizer")
    if not tok:
        raise RecordError(f"the CLIP stage in {workdir} records no tokenizer")
    return dict(
        tokenizer=load_tokenizer(tok),
        text_encoder=(clip.text.replace(projection_dim=clip.projection_dim), None),
        prior=(recs["prior"].model_config(), None), decoder=(recs["decoder"].model_config(), None),
        super_res_first=(up.model_config(), None), super_res_last=None,
        prior_sampling=recs["prior"].sampling, decoder_sampling=recs["decoder"].sampling,
        super_res_sampling=up.sampling)


def export_workdir(workdir: str, out_dir: str, *, log: Callable[[str], None] | None = None) -> str:
    """Write the stages trained in `workdir` (CLIP's text tower, its tokenizer, the prior, the
    decoder, the one upsampler; EMA params) as a diffusers UnCLIPPipeline directory. Every
    record is checked before a checkpoint is read; see the module docstring for what is
    refused."""
    from unclip_jax.workdir import has_checkpoints, load_stack, stage_dir

    log = log or (lambda msg: None)
    check_out_dir(out_dir)
    plan = _workdir_records(workdir)
    where = _workdir_where(workdir, "upsampler")
    problems, _ = check_components(plan, where)
    _refuse(problems)
    if has_checkpoints(stage_dir(workdir, "ar_prior")):
        log(f"note: {stage_dir(workdir, 'ar_prior')} is left out (UnCLIPPipeline has no "
            f"autoregressive prior)")
    log(f"loading the stages of {workdir}")
    st = load_stack(workdir)
    up = st.upsamplers[0]
    components = dict(
        tokenizer=st.tokenizer, text_encoder=(st.clip.text_config, st.clip.text_params),
        prior=(st.prior.config, st.prior.params), decoder=(st.decoder.config, st.decoder.params),
        super_res_first=(up.config, up.params), super_res_last=None,
        prior_sampling=st.prior.sampling, decoder_sampling=st.decoder.sampling,
        super_res_sampling=up.sampling)
    log("writing text_encoder, tokenizer, prior, text_proj + decoder, super_res_first / "
        "super_res_last (the upsampler) and the three UnCLIPSchedulers")
    return export_components(components, out_dir, where=where, log=log)
