"""Training configs: ml_collections `.py` files with `get_config(arg)`, big_vision style.

    unclip-jax train --config configs/decoder.py:size=tiny --config.optimizer.lr=3e-4 --workdir W

`configs/<stage>.py:ARG` calls `get_config(ARG)` ("size=tiny,steps=100" → a dict via
`parse_arg`); each `--config.a.b=VALUE` then overrides an existing key (the config is locked: a key
that does not exist is an error), the value parsed as a Python literal of the field's type.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """"size=tiny,steps=10" -> ConfigDict(size='tiny', steps=10), over `defaults`."""
    out = dict(defaults)
    for part in (arg or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"config argument {part!r} is not key=value")
        k, v = part.split("=", 1)
        k = k.strip()
        if k not in out:
            raise ValueError(f"unknown config argument {k!r}; known: {sorted(out)}")
        out[k] = _literal(v.strip(), out[k])
    return ml_collections.ConfigDict(out)


def _literal(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(like, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if like is None:
            return text
        raise ValueError(f"cannot parse {text!r} as a {type(like).__name__}") from None
    if isinstance(like, float) and isinstance(value, int):
        value = float(value)
    if like is not None and not isinstance(value, type(like)) and not (
            isinstance(like, (list, tuple)) and isinstance(value, (list, tuple))):
        raise ValueError(f"expected a {type(like).__name__}, got {text!r}")
    return value


OVERRIDE_PREFIX = "--config."


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line words -> (the other words, the `KEY=VALUE` of each `--config.KEY=VALUE`):
    the one parser of config overrides for the CLI and the benches."""
    rest, overrides = [], []
    for a in argv:
        if a.startswith(OVERRIDE_PREFIX):
            overrides.append(a[len(OVERRIDE_PREFIX):])
        else:
            rest.append(a)
    return rest, overrides


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path.py[:arg]` and apply `a.b=value` overrides."""
    path, _, arg = spec.partition(":")
    want = "a Python config file with get_config(arg), e.g. configs/prior.py:size=tiny"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config file {path}: give {want}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"the config {path} is a directory: give {want}")
    if not path.endswith(".py"):
        raise ValueError(f"the config {path} is not a .py file: give {want} (a JSON or YAML "
                         f"config is not read; override keys with --config.KEY=VALUE)")
    mod_spec = importlib.util.spec_from_file_location(
        f"unclip_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{path} has no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"get_config in {path} returned a {type(config).__name__}, not an "
                         f"ml_collections.ConfigDict: return ml_collections.ConfigDict(...) "
                         f"(e.g. built on unclip_jax.train.config.base_config(stage))")
    config.lock()
    for ov in overrides:
        key, eq, value = ov.partition("=")
        if not eq:
            raise ValueError(f"override {ov!r} is not key=value")
        apply_override(config, key, value)
    return config


def apply_override(config: ml_collections.ConfigDict, key: str, value: str) -> None:
    node = config
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise ValueError(f"config key {'.'.join(parts[:i + 1])!r} does not exist")
        node = node[p]
    last = parts[-1]
    if last not in node:
        raise ValueError(f"config key {key!r} does not exist")
    with node.unlocked():
        node[last] = _literal(value, node[last])


def base_config(stage: str) -> ml_collections.ConfigDict:
    """The keys every stage's config has."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    # the directory under the workdir it trains into; "" = the stage's name (a second
    # upsampler of the cascade: "upsampler2", see unclip_jax.workdir.load_stack)
    c.stage_dir = ""
    c.seed = 0
    # the step-0 parameters: "" = a random init, else a source of weights (a diffusers
    # UnCLIPPipeline directory, DIR:COMPONENT for another of its components, a transformers CLIP
    # directory, a stage directory or workdir trained here; unclip_jax/train/init_from.py)
    c.init_from = ""
    c.batch_size = 32  # global
    c.grad_accum = 1
    c.total_steps = 1000
    c.log_every = 50
    c.sample_every = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding = "fsdp"  # dp | fsdp | fsdp_tp
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=3e-4, warmup_steps=100, end_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, clip_norm=1.0))
    c.ema = ml_collections.ConfigDict({"decay": 0.9999})
    # on one device, hold the training state packed between steps (train/packed.py: a few flat
    # vectors, one fused optimizer / EMA update); checkpoints are the same either way
    c.pack_state = True
    c.checkpoint = ml_collections.ConfigDict({"every": 500, "keep": 3, "async_save": True})
    # data.source: shapes | webdataset | folder | tfds (the TFDS builders of webdataset shards or
    # folders: tfds_builder 'webdataset' | 'folder' ('' = guess from path), prepared under
    # tfds_dir as tfds_name) | clip_embeddings (the prior only: precomputed CLIP embeddings with
    # text hidden states, read in `order` 'random' or 'sequential')
    c.data = ml_collections.ConfigDict(dict(
        source="shapes", path="", num_examples=8000, seed=0, image_size=64, cache_dir="",
        shuffle_buffer=10000, tfds_builder="", tfds_dir="", tfds_name="", tfds_wait_s=3600,
        order="random"))
    return c


def set_run_length(c: ml_collections.ConfigDict, *, small: bool, batch: int, steps: int,
                   lr_small: float, lr_large: float, weight_decay_large: float = 0.0) -> None:
    """Batch, steps and the optimiser/EMA/logging defaults of a small (CPU: tiny, demo) or a
    large (karlo, paper) run."""
    c.batch_size = batch
    c.total_steps = steps
    c.optimizer.lr = lr_small if small else lr_large
    c.optimizer.warmup_steps = min(100, steps // 10)
    c.optimizer.weight_decay = 0.0 if small else weight_decay_large
    c.ema.decay = 0.995 if small else 0.9999
    c.log_every = 10 if small else 100


def size_spec(sizes: dict, arg) -> tuple[str, dict]:
    """(size name, its spec) from `get_config`'s argument ("size=demo")."""
    a = parse_arg(arg, size="tiny")
    if a.size not in sizes:
        raise ValueError(f"unknown size {a.size!r}; expected one of {sorted(sizes)}")
    return a.size, sizes[a.size]
