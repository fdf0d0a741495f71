"""Optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, frozen leaves."""
from __future__ import annotations

from typing import Any

import jax
import optax


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, end_fraction: float = 0.0):
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * end_fraction` at `total_steps`."""
    warmup_steps = max(int(warmup_steps), 0)
    decay = max(int(total_steps), warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay, lr * end_fraction)


def decay_mask(params):
    """Weight decay on matrices and conv kernels only (not on biases, norms, embeddings' scales)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(cfg: Any, total_steps: int, trainable=None, decay=None):
    """optax chain from an `optimizer` config: lr, warmup_steps, end_lr_fraction, b1, b2, eps,
    weight_decay, clip_norm. `trainable` (a bool tree) freezes the False leaves (their updates
    are zero and they carry no optimizer state). `decay` (a bool tree) says which leaves are
    weight-decayed (default `decay_mask`: matrices and conv kernels). Returns (tx, schedule)."""
    sched = lr_schedule(cfg.lr, cfg.warmup_steps, total_steps, cfg.get("end_lr_fraction", 0.0))
    parts = []
    if cfg.get("clip_norm"):
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                             eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 0.0),
                             mask=decay_mask if decay is None else decay))
    tx = optax.chain(*parts)
    if trainable is not None:
        labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx, sched
