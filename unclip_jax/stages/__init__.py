"""Stages: each gives the shared trainer its model, its loss, its batches and its record
(the contract: `unclip_jax.train.stage.Stage`)."""
from __future__ import annotations

import importlib

from unclip_jax.train.trainer import train

STAGES = ("clip", "prior", "ar_prior", "decoder", "upsampler")


def build_stage(config, workdir: str | None = None):
    """The Stage object for `config.stage` (its module is imported on demand: a stage's module
    loads what it needs, e.g. a frozen CLIP)."""
    name = config.get("stage") if hasattr(config, "get") else None
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {list(STAGES)}")
    module = importlib.import_module(f"unclip_jax.stages.{name}")
    return module.make_stage(config, workdir)


def train_stage(config, workdir: str, **kw):
    """Build `config.stage` and train it with the one trainer (`unclip_jax.train.trainer.train`)
    into WORKDIR/<stage>/ (or WORKDIR/<config.stage_dir>/); keyword arguments go to the
    trainer."""
    return train(build_stage(config, workdir), config, workdir, **kw)
