"""The training state and how its shardings are derived from the parameters'."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


def _path_keys(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def opt_state_shardings(abstract_opt_state, params_abstract, param_shardings, mesh):
    """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and has
    its shape (Adam's mu / nu) takes that parameter's sharding; the rest (counts) is replicated."""
    by_path = {}
    jax.tree_util.tree_map_with_path(
        lambda p, leaf, sh: by_path.__setitem__(_path_keys(p), (leaf.shape, sh)),
        params_abstract, param_shardings)
    longest = max((len(k) for k in by_path), default=0)

    def one(path, leaf):
        keys = _path_keys(path)
        for n in range(min(len(keys), longest), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def ema_update(ema, params, step, decay: float):
    """EMA with the usual warm-up: the effective decay is min(decay, (1 + step) / (10 + step))."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
