"""Stages: each gives the shared trainer its model, its loss and its batches."""
from __future__ import annotations

import importlib

STAGES = {"clip": "clip", "prior": "prior", "decoder": "decoder", "upsampler": "upsampler"}


def build_stage(config, workdir: str | None = None):
    """The Stage object for `config.stage` (its module is imported on demand)."""
    name = config.stage
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    module = importlib.import_module(f"unclip_jax.stages.{STAGES[name]}")
    return module.make_stage(config, workdir)
