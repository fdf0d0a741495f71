"""diffusers UNets (and UnCLIP's text_proj) -> our UNet / Decoder params.

Supported (the Karlo / diffusers UnCLIP family):
  UNet2DConditionModel (decoder): down ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D,
    mid UNetMidBlock2DSimpleCrossAttn (or UNetMidBlock2D / none), up SimpleCrossAttnUpBlock2D /
    ResnetUpsampleBlock2D; or DownBlock2D / UpBlock2D (conv samplers) throughout;
    class_embed_type None or "identity".
  UNet2DModel (super-res): ResnetDownsampleBlock2D / ResnetUpsampleBlock2D (or DownBlock2D /
    UpBlock2D), mid UNetMidBlock2D with or without attention.
Anything else raises ValueError naming the block type or option.

`convert_*` return the `params` collection as a nested dict of float32 numpy arrays:
`model.apply({"params": params}, ...)`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from unclip_jax.convert import torch_io
from unclip_jax.convert.torch_io import CheckpointMismatchError, ParamWriter  # noqa: F401
from unclip_jax.models.decoder import Decoder, DecoderConfig, decoder_init_inputs
from unclip_jax.models.unet import UNet, UNetConfig, init_inputs

_COND = "UNet2DConditionModel"
_PLAIN = "UNet2DModel"

# down / up block type -> (has attention, BigGAN res-block sampling)
_COND_DOWN = {"ResnetDownsampleBlock2D": (False, True), "SimpleCrossAttnDownBlock2D": (True, True),
              "DownBlock2D": (False, False)}
_COND_UP = {"ResnetUpsampleBlock2D": (False, True), "SimpleCrossAttnUpBlock2D": (True, True),
            "UpBlock2D": (False, False)}
_PLAIN_DOWN = {"ResnetDownsampleBlock2D": (False, True), "DownBlock2D": (False, False)}
_PLAIN_UP = {"ResnetUpsampleBlock2D": (False, True), "UpBlock2D": (False, False)}


def _require(cfg: Mapping[str, Any], key: str, allowed, default):
    v = cfg.get(key, default)
    ok = v in allowed if isinstance(allowed, (tuple, list, set)) else v == allowed
    if not ok:
        raise ValueError(f"unsupported diffusers UNet option {key}={v!r} (supported: {allowed!r})")
    return v


def _blocks(cfg, key, table, default):
    types = cfg.get(key, default)
    out = []
    for bt in types:
        name = bt[7:] if bt.startswith("UNetRes") else bt
        if name not in table:
            raise ValueError(f"unsupported diffusers block type {bt!r} in {key} (supported: "
                             f"{sorted(table)})")
        out.append(table[name])
    return out


def _levels(cfg, down_table, up_table, n):
    down = _blocks(cfg, "down_block_types", down_table, ())
    up = _blocks(cfg, "up_block_types", up_table, ())
    if len(down) != n or len(up) != n:
        raise ValueError(f"{len(down)} down / {len(up)} up block types for {n} block_out_channels")
    attn = [a for a, _ in down]
    if [a for a, _ in reversed(up)] != attn:
        raise ValueError("unsupported: up blocks whose attention does not mirror the down blocks "
                         f"({cfg.get('down_block_types')} / {cfg.get('up_block_types')})")
    updown = {u for _, u in down} | {u for _, u in up}
    if len(updown) != 1:
        raise ValueError("unsupported: mixing res-block sampling (Resnet*/SimpleCrossAttn* blocks) "
                         "with conv sampling (DownBlock2D/UpBlock2D) in "
                         f"{cfg.get('down_block_types')} / {cfg.get('up_block_types')}")
    if not updown.pop() and n > 1:
        _require(cfg, "downsample_padding", 1, 1)
    return tuple(attn), all(u for _, u in down)


def _common_checks(cfg):
    _require(cfg, "act_fn", ("silu", "swish"), "silu")
    _require(cfg, "time_embedding_type", "positional", "positional")
    _require(cfg, "center_input_sample", False, False)
    _require(cfg, "resnet_time_scale_shift", ("default", "scale_shift"), "default")
    _require(cfg, "num_class_embeds", None, None)
    _require(cfg, "class_embed_type", (None, "identity"), None)
    if cfg.get("norm_num_groups", 32) is None:
        raise ValueError("unsupported diffusers UNet option norm_num_groups=None")


def _sample_size(v):
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"unsupported diffusers UNet option sample_size={v!r} (square only)")
        v = v[0]
    return int(v)


def unet_config_from_diffusers(config: Mapping[str, Any], class_name: str | None = None,
                               **overrides) -> UNetConfig:
    """UNetConfig of a diffusers UNet2DConditionModel / UNet2DModel config dict (config.json).

    `class_name` defaults to the dict's `_class_name` (else inferred from
    `cross_attention_dim`). `overrides` (dtype, param_dtype, attention_impl, remat, ...) are set
    on the result.
    """
    cfg = dict(config)
    cls = class_name or cfg.get("_class_name") or (_COND if "cross_attention_dim" in cfg else _PLAIN)
    if cls not in (_COND, _PLAIN):
        raise ValueError(f"unsupported diffusers model class {cls!r} (supported: {_COND}, {_PLAIN})")
    _common_checks(cfg)
    boc = tuple(int(c) for c in cfg.get("block_out_channels", ()))
    n = len(boc)
    groups = int(cfg.get("norm_num_groups", 32))
    eps = float(cfg.get("norm_eps", 1e-5))
    shift = cfg.get("resnet_time_scale_shift", "default")
    mid_scale = float(cfg.get("mid_block_scale_factor", 1.0))
    common = dict(
        in_channels=int(cfg.get("in_channels", 3 if cls == _PLAIN else 4)),
        out_channels=int(cfg.get("out_channels", 3 if cls == _PLAIN else 4)),
        block_out_channels=boc,
        sample_size=_sample_size(cfg.get("sample_size")),
        norm_groups=groups, norm_eps=eps, dropout=float(cfg.get("dropout", 0.0)),
        resnet_time_scale_shift=shift,
        mid_output_scale=mid_scale,
        time_embed_dim=cfg.get("time_embedding_dim"),
        time_cond=cfg.get("class_embed_type") == "identity",
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
    )
    if cls == _COND:
        for key in ("encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type",
                    "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
                    "cross_attention_norm", "num_attention_heads"):
            _require(cfg, key, None, None)
        _require(cfg, "class_embeddings_concat", False, False)
        _require(cfg, "conv_in_kernel", 3, 3)
        _require(cfg, "conv_out_kernel", 3, 3)
        _require(cfg, "attention_type", "default", "default")
        _require(cfg, "mid_block_only_cross_attention", (None, False), None)
        oca = cfg.get("only_cross_attention", False)
        if (oca if isinstance(oca, bool) else any(oca)):
            raise ValueError(f"unsupported diffusers UNet option only_cross_attention={oca!r}")
        attn, updown = _levels(cfg, _COND_DOWN, _COND_UP, n)
        mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        mids = {"UNetMidBlock2DSimpleCrossAttn": "attention", "UNetMidBlock2D": "resnet", None: "none"}
        if mid_type not in mids:
            raise ValueError(f"unsupported diffusers block type {mid_type!r} in mid_block_type "
                             f"(supported: {[m for m in mids if m]} or None)")
        mid = mids[mid_type]
        hd = cfg.get("attention_head_dim", 8)
        hd_t = tuple(int(h) if h is not None else boc[i] for i, h in enumerate(hd)) \
            if isinstance(hd, (list, tuple)) else None
        xd = cfg.get("cross_attention_dim", 1280)
        if isinstance(xd, (list, tuple)):
            if len(set(xd)) != 1:
                raise ValueError(f"unsupported diffusers UNet option cross_attention_dim={xd!r} "
                                 "(one width for every level)")
            xd = xd[0]
        lpb = cfg.get("layers_per_block", 2)
        uses_attn = any(attn) or mid == "attention"
        return UNetConfig(
            **common,
            layers_per_block=tuple(lpb) if isinstance(lpb, (list, tuple)) else int(lpb),
            attention_levels=attn, mid_block=mid,
            attention_head_dim=hd_t if hd_t is not None else int(hd),
            # diffusers' up blocks index the per-level tuple in down order
            up_attention_head_dim=hd_t if hd_t is not None and len(set(hd_t)) > 1 else None,
            attn_norm=True, attn_norm_groups=None, attn_norm_eps=1e-5,
            resnet_skip_time_act=bool(cfg.get("resnet_skip_time_act", False)),
            resnet_output_scale=float(cfg.get("resnet_out_scale_factor", 1.0)),
            mid_attn_output_scale=1.0,
            resblock_updown=updown,
            context_dim=int(xd) if uses_attn else None,
            **overrides)
    # UNet2DModel
    attn, updown = _levels(cfg, _PLAIN_DOWN, _PLAIN_UP, n)
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2D")
    add_attention = bool(cfg.get("add_attention", True))
    mid = "none" if mid_type is None else ("attention" if add_attention else "resnets")
    hd = cfg.get("attention_head_dim", 8)
    hd = int(hd) if hd is not None else boc[-1]
    lpb = cfg.get("layers_per_block", 2)
    attn_groups = cfg.get("attn_norm_num_groups")
    return UNetConfig(
        **common,
        layers_per_block=int(lpb),
        attention_levels=attn, mid_block=mid,
        attention_head_dim=hd, mid_attention_head_dim=hd,
        # UNetMidBlock2D: GroupNorm before attention only with attn_norm_num_groups or "default"
        attn_norm=attn_groups is not None or shift == "default",
        attn_norm_groups=int(attn_groups) if attn_groups is not None else None,
        attn_norm_eps=eps,
        mid_attn_output_scale=mid_scale,
        resblock_updown=updown,
        context_dim=None,
        **overrides)


# ----------------------------------------------------------------------------------------------
# parameter naming

_RENAME = {"time_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm",
           "ctx_k": "add_k_proj", "ctx_v": "add_v_proj", "to_out": "to_out.0",
           "time_embed": "time_embedding", "norm_out": "conv_norm_out"}


def _unet_torch_key(path: tuple[str, ...]):
    """Flax param path -> (diffusers state-dict key, layout transform)."""
    *mods, leaf = path
    dense = "dense" in mods
    mods = [m for m in mods if m != "dense"]
    out: list[str] = []
    if mods and (mods[0].startswith("down_") or mods[0].startswith("up_")):
        side, i = mods[0].split("_")
        out += [f"{side}_blocks", i]
        mods = mods[1:]
    elif mods and mods[0] == "mid":
        out.append("mid_block")
        mods = mods[1:]
    if mods:
        head = mods[0]
        if head.startswith("res_"):
            out += ["resnets", head[4:]]
            mods = mods[1:]
        elif head.startswith("attn_"):
            out += ["attentions", head[5:]]
            mods = mods[1:]
        elif head in ("downsample", "upsample"):
            out += [f"{head}rs", "0"]
            mods = mods[1:]
    out += [_RENAME.get(m, m) for m in mods]
    if leaf == "kernel":
        transform = torch_io.linear if dense else torch_io.conv2d
        out.append("weight")
    elif leaf == "scale":
        transform = torch_io.identity
        out.append("weight")
    else:
        transform = torch_io.identity
        out.append(leaf)
    return ".".join(out), transform


def _abstract_params(model: nn.Module, args, kwargs=None):
    def init():
        return nn.meta.unbox(model.init(jax.random.key(0), *args, **(kwargs or {})))["params"]
    return jax.eval_shape(init)


def _leaves(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix


def _write_unet(writer: ParamWriter, template, prefix=()):
    for path in _leaves(template):
        key, transform = _unet_torch_key(path)
        writer.set(prefix + path, key, transform)


def convert_unet(state_dict: Mapping[str, Any], config: UNetConfig, what: str = "diffusers UNet"):
    """diffusers UNet state dict -> our `params` (nested dict of numpy arrays)."""
    if config.noise_level_cond:
        raise ValueError("diffusers UNets have no noise-level embedding (noise_level_cond=True)")
    sd = torch_io.to_numpy(state_dict)
    x, t, kw = init_inputs(config)
    template = _abstract_params(UNet(config), (x, t), kw)
    writer = ParamWriter(template, sd, what)
    _write_unet(writer, template)
    return writer.finish()


# ----------------------------------------------------------------------------------------------
# decoder (UNet2DConditionModel + UnCLIPTextProjModel)

def decoder_config_from_diffusers(unet_config: Mapping[str, Any], text_proj_config: Mapping[str, Any],
                                  **overrides) -> DecoderConfig:
    """DecoderConfig from the decoder UNet's and UnCLIPTextProjModel's config dicts."""
    ucfg = unet_config_from_diffusers(unet_config, class_name=unet_config.get("_class_name", _COND),
                                      **overrides)
    if not ucfg.time_cond:
        raise ValueError("the unCLIP decoder UNet needs class_embed_type='identity'")
    tp = dict(text_proj_config)
    xd = int(tp["cross_attention_dim"])
    if ucfg.context_dim is None:
        raise ValueError("the decoder UNet has no attention, so no context for text_proj")
    if xd != ucfg.context_dim:
        raise ValueError(f"text_proj cross_attention_dim {xd} != UNet cross_attention_dim "
                         f"{ucfg.context_dim}")
    if int(tp["time_embed_dim"]) != ucfg.emb_dim:
        raise ValueError(f"text_proj time_embed_dim {tp['time_embed_dim']} != UNet time embedding "
                         f"width {ucfg.emb_dim}")
    return DecoderConfig(unet=ucfg, clip_embed_dim=int(tp.get("clip_embeddings_dim", 768)),
                         text_hidden_dim=None,
                         clip_extra_context_tokens=int(tp.get("clip_extra_context_tokens", 4)))


_TEXT_PROJ = {
    ("image_to_time",): "clip_image_embeddings_project_to_time_embeddings",
    ("text_to_time",): "embedding_proj",
    ("image_to_tokens",): "clip_extra_context_tokens_proj",
    ("text_proj",): "encoder_hidden_states_proj",
}


def _tokens_layout(n: int, ctx: int) -> tuple[torch_io.Layout, torch_io.Layout]:
    """(kernel, bias) layouts of the image -> n context tokens projection: torch lays the n
    tokens out interleaved (row c * n + j is channel c of token j); ours are contiguous (row
    j * ctx + c). A tensor of another shape passes unpermuted (the shape check then names it)."""
    def kernel(w):
        if w.ndim == 2 and w.shape[0] == n * ctx:
            w = w.reshape(ctx, n, -1).transpose(1, 0, 2).reshape(n * ctx, -1)
        return torch_io.linear(w)

    def kernel_back(k):
        w = torch_io.linear_to_torch(k)
        return w.reshape(n, ctx, -1).transpose(1, 0, 2).reshape(n * ctx, -1)

    def bias(b):
        return b.reshape(ctx, n).T.reshape(-1) if b.shape == (n * ctx,) else b

    def bias_back(b):
        return np.ascontiguousarray(b.reshape(n, ctx).T.reshape(-1))

    return (torch_io.Layout(kernel, kernel_back, f"{n} context tokens x {ctx}: kernel"),
            torch_io.Layout(bias, bias_back, f"{n} context tokens x {ctx}: bias"))


def write_text_proj(w, config: DecoderConfig) -> None:
    """Every (flax path, UnCLIPTextProjModel key, layout) entry of the decoder's CLIP
    conditioning, written with `w` (a ParamWriter importing; a torch_io.ParamRecorder for the
    exporter)."""
    w.set(("null_image_embed",), "learned_classifier_free_guidance_embeddings")
    tokens = _tokens_layout(config.clip_extra_context_tokens, config.unet.context_dim)
    for (name,), key in _TEXT_PROJ.items():
        kernel, bias = tokens if name == "image_to_tokens" else (torch_io.linear, torch_io.identity)
        w.set((name, "dense", "kernel"), f"{key}.weight", kernel)
        w.set((name, "dense", "bias"), f"{key}.bias", bias)
    w.set(("text_norm", "scale"), "text_encoder_hidden_states_norm.weight")
    w.set(("text_norm", "bias"), "text_encoder_hidden_states_norm.bias")


def convert_decoder(unet_state_dict: Mapping[str, Any], text_proj_state_dict: Mapping[str, Any],
                    config: DecoderConfig):
    """diffusers decoder UNet + UnCLIPTextProjModel state dicts -> our Decoder `params`."""
    usd = torch_io.to_numpy(unet_state_dict)
    tsd = torch_io.to_numpy(text_proj_state_dict)
    template = _abstract_params(Decoder(config), decoder_init_inputs(config))
    uw = ParamWriter(template["unet"], usd, "diffusers decoder UNet")
    _write_unet(uw, template["unet"])
    rest = {k: v for k, v in template.items() if k != "unet"}
    tw = ParamWriter(rest, tsd, "diffusers UnCLIPTextProjModel")
    write_text_proj(tw, config)
    out = tw.finish()
    out["unet"] = uw.finish()
    return out


# ----------------------------------------------------------------------------------------------
# save_pretrained directories

def _read_config(path: str) -> dict[str, Any]:
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def load_diffusers_unet(path: str, **overrides) -> tuple[UNetConfig, dict]:
    """(config, params) of a diffusers UNet2DConditionModel / UNet2DModel save_pretrained dir."""
    config = unet_config_from_diffusers(_read_config(path), **overrides)
    return config, convert_unet(torch_io.load_state_dict(path), config,
                                what=f"diffusers UNet {path}")


def load_diffusers_decoder(unet_path: str, text_proj_path: str, **overrides) -> tuple[DecoderConfig, dict]:
    """(config, params) of an UnCLIP pipeline's `decoder` and `text_proj` save_pretrained dirs."""
    config = decoder_config_from_diffusers(_read_config(unet_path), _read_config(text_proj_path),
                                           **overrides)
    return config, convert_decoder(torch_io.load_state_dict(unet_path),
                                   torch_io.load_state_dict(text_proj_path), config)

