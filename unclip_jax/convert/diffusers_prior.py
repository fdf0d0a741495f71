"""diffusers ``PriorTransformer`` (Karlo / UnCLIPPipeline ``prior``) -> our PriorTransformer params."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.convert import torch_io
from unclip_jax.convert.torch_io import (
    CheckpointMismatchError, Layout, ParamWriter, identity, linear)
from unclip_jax.models.prior import PriorConfig, init_params

__all__ = ["prior_config_from_diffusers", "convert_prior", "load_diffusers_prior", "write_prior",
           "CheckpointMismatchError"]


def prior_config_from_diffusers(config_dict: Mapping[str, Any],
                                scheduler_config: Mapping[str, Any] | None = None,
                                **overrides) -> PriorConfig:
    """diffusers PriorTransformer config.json (dict) -> PriorConfig (embedding_norm='meanstd').

    ``scheduler_config`` (the UnCLIPScheduler config of the prior, optional) supplies
    ``clip_x0`` (its clip_sample_range when clip_sample is on). ``overrides`` replace fields
    (dtype, attention_impl, ...).
    """
    d = dict(config_dict)

    def get(k, default):
        v = d.get(k)
        return default if v is None else v

    clip_x0 = None
    if scheduler_config is not None:
        if scheduler_config.get("clip_sample", True):
            clip_x0 = float(scheduler_config.get("clip_sample_range", 1.0))
        pred = scheduler_config.get("prediction_type", "sample")
        if pred != "sample":
            raise ValueError(f"the prior scheduler predicts {pred!r}; this prior predicts x0 ('sample')")
    kw = dict(
        embedding_dim=get("embedding_dim", 768),
        num_layers=get("num_layers", 20),
        num_heads=get("num_attention_heads", 32),
        head_dim=get("attention_head_dim", 64),
        num_text_tokens=get("num_embeddings", 77),
        additional_embeddings=get("additional_embeddings", 4),
        time_embed_dim=d.get("time_embed_dim"),
        time_embed_act_fn=get("time_embed_act_fn", "silu"),
        norm_in_type=d.get("norm_in_type"),
        embedding_proj_norm_type=d.get("embedding_proj_norm_type"),
        encoder_hid_proj_type=d.get("encoder_hid_proj_type", "linear"),
        added_emb_type=d.get("added_emb_type", "prd"),
        embedding_proj_dim=d.get("embedding_proj_dim"),
        clip_embed_dim=d.get("clip_embed_dim"),
        dropout=float(get("dropout", 0.0)),
        layer_norm_eps=1e-5,
        embedding_norm="meanstd",
        clip_x0=clip_x0,
    )
    kw.update(overrides)
    return PriorConfig(**kw)


# [1, S, W] -> [S, W]; [1, 1, W] -> [W] (a wrong size still fails the shape check); back: the
# leading unit axes again
_DROP_BATCH = Layout(lambda a: a.reshape(a.shape[1:]) if a.ndim == 3 and a.shape[0] == 1 else a,
                     lambda a: a[None], "[1, S, W] <-> [S, W]")
_DROP_TWO = Layout(lambda a: a.reshape(a.shape[2:]) if a.ndim == 3 and a.shape[:2] == (1, 1) else a,
                   lambda a: a[None, None], "[1, 1, W] <-> [W]")


def write_prior(w, config: PriorConfig) -> None:
    """Every (flax path, diffusers key, layout) entry of a PriorTransformer, written with `w` (a
    ParamWriter importing; a torch_io.ParamRecorder for the exporter). With embedding_norm !=
    'meanstd' clip_norm is set to 1 (a computed entry)."""

    def dense(path, key):
        w.set(path + ("dense", "kernel"), f"{key}.weight", linear)
        w.set(path + ("dense", "bias"), f"{key}.bias")

    def norm(path, key):
        w.set(path + ("scale",), f"{key}.weight")
        w.set(path + ("bias",), f"{key}.bias")

    c = config
    dense(("time_embedding", "linear_1"), "time_embedding.linear_1")
    dense(("time_embedding", "linear_2"), "time_embedding.linear_2")
    dense(("proj_in",), "proj_in")
    if c.embedding_proj_norm_type == "layer":
        norm(("embedding_proj_norm",), "embedding_proj_norm")
    dense(("embedding_proj",), "embedding_proj")
    if c.encoder_hid_proj_type == "linear":
        dense(("encoder_hidden_states_proj",), "encoder_hidden_states_proj")
    w.set(("positional_embedding",), "positional_embedding", _DROP_BATCH)
    if c.added_emb_type == "prd":
        w.set(("prd_embedding",), "prd_embedding", _DROP_TWO)
    if c.norm_in_type == "layer":
        norm(("norm_in",), "norm_in")
    for i in range(c.num_layers):
        src, dst = f"transformer_blocks.{i}", f"blocks_{i}"
        norm((dst, "norm1"), f"{src}.norm1")
        for name in ("to_q", "to_k", "to_v"):
            dense((dst, "attn", name), f"{src}.attn1.{name}")
        dense((dst, "attn", "to_out"), f"{src}.attn1.to_out.0")
        norm((dst, "norm2"), f"{src}.norm3")
        dense((dst, "ff", "proj_in"), f"{src}.ff.net.0.proj")
        dense((dst, "ff", "proj_out"), f"{src}.ff.net.2")
    norm(("norm_out",), "norm_out")
    dense(("proj_to_clip_embeddings",), "proj_to_clip_embeddings")
    if c.embedding_norm == "meanstd":
        w.set(("clip_mean",), "clip_mean", identity)
        w.set(("clip_std",), "clip_std", identity)
    elif c.embedding_norm in ("scale", "l2"):  # no such statistic in diffusers: the identity
        w.set(("clip_norm",), None, value=np.ones((1, 1), np.float32))


def convert_prior(state_dict: Mapping[str, Any], config: PriorConfig) -> dict:
    """diffusers PriorTransformer state dict (torch tensors or numpy) -> params (nested dict of
    arrays in config.param_dtype, usable as ``{'params': params}``).

    Raises CheckpointMismatchError naming the parameter and both shapes on any mismatch, a
    missing tensor, or an unused one. With embedding_norm != 'meanstd' the checkpoint's
    clip_mean/clip_std are not imported ('scale' / 'l2': clip_norm is set to 1; set it from data
    with prior.set_embedding_stats).
    """
    sd = torch_io.to_numpy(state_dict)
    template = init_params(config)  # abstract: shapes only
    w = ParamWriter(template, sd, what="diffusers prior")
    write_prior(w, config)
    ignore = lambda k: k in ("clip_mean", "clip_std", "causal_attention_mask")  # noqa: E731
    params = w.finish(strict_unused=True, ignore_unused=ignore)
    pdt = jnp.dtype(config.param_dtype)
    return jax.tree.map(lambda a: jnp.asarray(a, pdt), params)


def load_diffusers_prior(model_dir: str, scheduler_dir: str | None = None,
                         **overrides) -> tuple[PriorConfig, dict]:
    """Read a ``save_pretrained`` PriorTransformer directory (config.json + weights; a pipeline
    directory with a ``prior/`` subfolder works too). The prior scheduler config (for clip_x0) is
    taken from ``scheduler_dir`` or, if present, the sibling ``prior_scheduler/`` folder."""
    if not os.path.exists(os.path.join(model_dir, "config.json")) and \
            os.path.isdir(os.path.join(model_dir, "prior")):
        model_dir = os.path.join(model_dir, "prior")
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if scheduler_dir is None:
        guess = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "prior_scheduler")
        scheduler_dir = guess if os.path.isdir(guess) else None
    sched = None
    if scheduler_dir is not None:
        with open(os.path.join(scheduler_dir, "scheduler_config.json")) as f:
            sched = json.load(f)
    config = prior_config_from_diffusers(cfg, sched, **overrides)
    params = convert_prior(torch_io.load_state_dict(model_dir), config)
    return config, params
