"""transformers CLIP (CLIPModel, CLIPTextModel[WithProjection], CLIPVisionModel[WithProjection])
-> our ``unclip_jax.models.clip`` configs and params.

``load_hf_clip(path)`` reads a ``save_pretrained`` directory (config.json + model.safetensors or
pytorch_model.bin, the latter with ``weights_only=True``); nothing here imports transformers or
torch except to read a ``.bin`` file. Every tensor goes through ``torch_io.ParamWriter``, so a
checkpoint that does not fit the config raises ``CheckpointMismatchError`` naming the parameter
and both shapes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.convert import torch_io
from unclip_jax.convert.torch_io import CheckpointMismatchError, ParamWriter, conv2d, linear
from unclip_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, init_params

__all__ = ["clip_config_from_hf", "convert_clip_text", "convert_clip_vision", "convert_clip",
           "load_hf_clip", "hf_kind", "CheckpointMismatchError"]

# transformers' defaults (used for keys a config.json leaves out).
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                         projection_dim=512, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512,
                           num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                           image_size=224, patch_size=32, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5)
_HF_CLIP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)

_KINDS = {"clip": "clip", "clip_text_model": "text", "clip_vision_model": "vision"}
_ARCH_KINDS = {"CLIPModel": "clip", "CLIPTextModel": "text", "CLIPTextModelWithProjection": "text",
               "CLIPVisionModel": "vision", "CLIPVisionModelWithProjection": "vision"}


def _as_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    return dict(cfg)


def hf_kind(cfg: Any) -> str:
    """'clip' | 'text' | 'vision' for a transformers CLIP config (dict or config object)."""
    d = _as_dict(cfg)
    if d.get("model_type") in _KINDS:
        return _KINDS[d["model_type"]]
    for arch in d.get("architectures") or ():
        if arch in _ARCH_KINDS:
            return _ARCH_KINDS[arch]
    if "text_config" in d or "vision_config" in d or "text_config_dict" in d:
        return "clip"
    if "vocab_size" in d:
        return "text"
    if "image_size" in d or "patch_size" in d:
        return "vision"
    raise ValueError("cannot tell whether this is a CLIP, CLIP text or CLIP vision config"
                     f" (model_type={d.get('model_type')!r})")


def _square(v, name):
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"non-square {name} {v} is not supported")
        v = v[0]
    return int(v)


def _get(d, defaults, k):
    v = d.get(k)
    return defaults[k] if v is None else v


def _text_config(d: Mapping[str, Any], projection_dim="auto", **overrides) -> CLIPTextConfig:
    g = lambda k: _get(d, _HF_TEXT_DEFAULTS, k)  # noqa: E731
    eos = g("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    kw = dict(
        vocab_size=int(g("vocab_size")), hidden_size=int(g("hidden_size")),
        intermediate_size=int(g("intermediate_size")), num_layers=int(g("num_hidden_layers")),
        num_heads=int(g("num_attention_heads")),
        max_position_embeddings=int(g("max_position_embeddings")), hidden_act=g("hidden_act"),
        layer_norm_eps=float(g("layer_norm_eps")), eos_token_id=int(eos),
        bos_token_id=d.get("bos_token_id", _HF_TEXT_DEFAULTS["bos_token_id"]),
        pad_token_id=d.get("pad_token_id", _HF_TEXT_DEFAULTS["pad_token_id"]),
        projection_dim=g("projection_dim") if projection_dim == "auto" else projection_dim,
    )
    kw.update(overrides)
    return CLIPTextConfig(**kw)


def _vision_config(d: Mapping[str, Any], projection_dim="auto", **overrides) -> CLIPVisionConfig:
    g = lambda k: _get(d, _HF_VISION_DEFAULTS, k)  # noqa: E731
    kw = dict(
        hidden_size=int(g("hidden_size")), intermediate_size=int(g("intermediate_size")),
        num_layers=int(g("num_hidden_layers")), num_heads=int(g("num_attention_heads")),
        image_size=_square(g("image_size"), "image_size"),
        patch_size=_square(g("patch_size"), "patch_size"), num_channels=int(g("num_channels")),
        hidden_act=g("hidden_act"), layer_norm_eps=float(g("layer_norm_eps")),
        projection_dim=g("projection_dim") if projection_dim == "auto" else projection_dim,
    )
    kw.update(overrides)
    return CLIPVisionConfig(**kw)


def _sub(d: Mapping[str, Any], name: str) -> dict[str, Any]:
    sub = dict(d.get(f"{name}_config") or {})
    sub.update(d.get(f"{name}_config_dict") or {})   # legacy configs: *_config_dict wins
    return sub


def clip_config_from_hf(config: Any, kind: str | None = None, **overrides):
    """transformers CLIP config (dict or config object) -> our config.

    The result's type follows the HF config: CLIPConfig -> ``CLIPConfig``; CLIPTextConfig ->
    ``CLIPTextConfig``; CLIPVisionConfig -> ``CLIPVisionConfig``. ``kind='text'`` or
    ``'vision'`` on a full CLIPConfig extracts one tower, with the top-level projection_dim.
    ``overrides`` (dtype, param_dtype, attention_impl, ...) are applied to the tower configs.
    """
    d = _as_dict(config)
    src = hf_kind(d)
    kind = kind or src
    if src == "clip":
        proj = int(_get(d, _HF_CLIP_DEFAULTS, "projection_dim"))
        if kind == "text":
            return _text_config(_sub(d, "text"), projection_dim=proj, **overrides)
        if kind == "vision":
            return _vision_config(_sub(d, "vision"), projection_dim=proj, **overrides)
        if kind != "clip":
            raise ValueError(f"kind must be 'clip', 'text' or 'vision', got {kind!r}")
        return CLIPConfig(text=_text_config(_sub(d, "text"), **overrides),
                          vision=_vision_config(_sub(d, "vision"), **overrides),
                          projection_dim=proj,
                          logit_scale_init=float(_get(d, _HF_CLIP_DEFAULTS, "logit_scale_init_value")))
    if kind != src:
        raise ValueError(f"a CLIP {src} config cannot give a {kind!r} model")
    return (_text_config if src == "text" else _vision_config)(d, **overrides)


# ---------------------------------------------------------------------------------------------
# State-dict conversion
# ---------------------------------------------------------------------------------------------
def _norm(w: ParamWriter, path, key):
    w.set(path + ("scale",), f"{key}.weight")
    w.set(path + ("bias",), f"{key}.bias")


def _dense(w: ParamWriter, path, key, bias=True):
    w.set(path + ("dense", "kernel"), f"{key}.weight", linear)
    if bias:
        w.set(path + ("dense", "bias"), f"{key}.bias")


def _encoder(w: ParamWriter, dst: tuple, src: str, num_layers: int):
    for i in range(num_layers):
        s, d = f"{src}encoder.layers.{i}.", dst + (f"layers_{i}",)
        _norm(w, d + ("layer_norm1",), s + "layer_norm1")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _dense(w, d + ("self_attn", name), s + f"self_attn.{name}")
        _norm(w, d + ("layer_norm2",), s + "layer_norm2")
        _dense(w, d + ("mlp", "fc1"), s + "mlp.fc1")
        _dense(w, d + ("mlp", "fc2"), s + "mlp.fc2")


def _text_tower(w: ParamWriter, c: CLIPTextConfig, src: str):
    dst = ("text_model",)
    w.set(dst + ("token_embedding", "embedding"), src + "embeddings.token_embedding.weight")
    w.set(dst + ("position_embedding",), src + "embeddings.position_embedding.weight")
    _encoder(w, dst, src, c.num_layers)
    _norm(w, dst + ("final_layer_norm",), src + "final_layer_norm")


def _vision_tower(w: ParamWriter, c: CLIPVisionConfig, src: str):
    dst = ("vision_model",)
    w.set(dst + ("patch_embedding", "kernel"), src + "embeddings.patch_embedding.weight", conv2d)
    w.set(dst + ("class_embedding",), src + "embeddings.class_embedding")
    w.set(dst + ("position_embedding",), src + "embeddings.position_embedding.weight")
    _norm(w, dst + ("pre_layrnorm",), src + "pre_layrnorm")
    _encoder(w, dst, src, c.num_layers)
    _norm(w, dst + ("post_layernorm",), src + "post_layernorm")


def _detect_prefix(sd: Mapping[str, Any], tower: str, probe: str, prefix: str | None) -> str:
    if prefix is not None:
        return prefix
    if f"{tower}.{probe}" in sd:
        return f"{tower}."
    if probe in sd:
        return ""
    return f"{tower}."  # let the writer report the missing tensor


def _buffers(k: str) -> bool:
    return k.endswith("position_ids")  # non-persistent buffers some old checkpoints still hold


def _finish(w: ParamWriter, param_dtype: str, strict: bool, keep: Callable[[str], bool]):
    ignore = (lambda k: _buffers(k) or not keep(k))  # noqa: E731
    params = w.finish(strict_unused=strict, ignore_unused=ignore)
    pdt = jnp.dtype(param_dtype)
    return jax.tree.map(lambda a: jnp.asarray(a, pdt), params)


def convert_clip_text(state_dict: Mapping[str, Any], config: CLIPTextConfig,
                      prefix: str | None = None,
                      projection_key: str | None = "text_projection.weight",
                      strict: bool = True) -> dict:
    """transformers text-tower state dict -> params of ``CLIPTextModelWithProjection(config)``.

    ``prefix`` is where the tower's tensors live ('text_model.' for CLIPModel /
    CLIPTextModelWithProjection, '' for a transformers-5 CLIPTextModel; ``None`` detects it).
    With ``config.projection_dim=None`` no projection is imported. ``strict`` also fails on
    unused tensors (those of a CLIPModel's other tower, projection and logit_scale are ignored).
    """
    sd = torch_io.to_numpy(state_dict)
    prefix = _detect_prefix(sd, "text_model", "embeddings.token_embedding.weight", prefix)
    w = ParamWriter(init_params("text", config), sd, what="HF CLIP text")
    _text_tower(w, config, prefix)
    if config.projection_dim is not None:
        _dense(w, ("text_projection",), projection_key.removesuffix(".weight"), bias=False)
    other = ("vision_model.", "visual_projection.", "logit_scale")
    return _finish(w, config.param_dtype, strict, lambda k: not k.startswith(other))


def convert_clip_vision(state_dict: Mapping[str, Any], config: CLIPVisionConfig,
                        prefix: str | None = None,
                        projection_key: str | None = "visual_projection.weight",
                        strict: bool = True) -> dict:
    """transformers vision-tower state dict -> params of ``CLIPVisionModelWithProjection``
    (see ``convert_clip_text`` for the arguments)."""
    sd = torch_io.to_numpy(state_dict)
    prefix = _detect_prefix(sd, "vision_model", "embeddings.patch_embedding.weight", prefix)
    w = ParamWriter(init_params("vision", config), sd, what="HF CLIP vision")
    _vision_tower(w, config, prefix)
    if config.projection_dim is not None:
        _dense(w, ("visual_projection",), projection_key.removesuffix(".weight"), bias=False)
    other = ("text_model.", "text_projection.", "logit_scale")
    return _finish(w, config.param_dtype, strict, lambda k: not k.startswith(other))


def convert_clip(state_dict: Mapping[str, Any], config: CLIPConfig, prefix: str = "",
                 strict: bool = True) -> dict:
    """transformers CLIPModel state dict -> params of ``CLIPModel(config)``."""
    sd = torch_io.to_numpy(state_dict)
    w = ParamWriter(init_params("clip", config), sd, what="HF CLIP")
    _text_tower(w, config.text, prefix + "text_model.")
    _vision_tower(w, config.vision, prefix + "vision_model.")
    _dense(w, ("text_projection",), prefix + "text_projection", bias=False)
    _dense(w, ("visual_projection",), prefix + "visual_projection", bias=False)
    w.set(("logit_scale",), prefix + "logit_scale", lambda a: np.reshape(a, ()))
    params = _finish(w, config.text.param_dtype, strict, lambda k: k.startswith(prefix))
    return params


def load_hf_clip(path: str, kind: str | None = None, **overrides) -> tuple[str, Any, dict]:
    """Read a transformers ``save_pretrained`` CLIP directory -> ``(kind, config, params)``.

    ``kind`` is 'clip' (CLIPModel -> CLIPConfig), 'text' (CLIPTextConfig, for
    CLIPTextModelWithProjection) or 'vision' (CLIPVisionConfig); ``None`` follows the checkpoint.
    A CLIPModel directory can be read as one tower (``kind='text'``/``'vision'``: the tower and
    its projection, the other tower ignored). A checkpoint without a projection (CLIPTextModel,
    CLIPVisionModel) gives ``projection_dim=None``. ``overrides`` (dtype, param_dtype,
    attention_impl, ...) are applied to the tower configs.
    """
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    src = hf_kind(cfg)
    kind = kind or src
    sd = torch_io.load_state_dict(path)
    config = clip_config_from_hf(cfg, kind=kind, **overrides)
    if kind == "clip":
        return kind, config, convert_clip(sd, config)
    proj_key = "text_projection.weight" if kind == "text" else "visual_projection.weight"
    if src != "clip" and proj_key not in sd and config.projection_dim is not None:
        config = config.replace(projection_dim=None)
    convert = convert_clip_text if kind == "text" else convert_clip_vision
    return kind, config, convert(sd, config)
