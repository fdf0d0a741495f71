"""The training state packed into a few flat vectors between steps (one device).

A step of a small model on one device pays for every array of its state: each parameter, its
Adam moments and its EMA copy is a buffer handed to and returned by the compiled step (~5-10
microseconds each on XLA:CPU), and the optimizer and the EMA run as several small kernels per
parameter. The demo's decoder has 243 parameter arrays: ~1000 state buffers and ~2100 kernels
in its update, 7-13% of a demo step on 2 CPU cores (docs/PERFORMANCE.md). Packed, the
parameters, the moments and the EMA are one vector per (dtype, weight-decayed, trainable) group;
the step slices the parameters out for the model, concatenates their gradients, and runs the
same optax chain (`optim.make_optimizer`, with the groups' masks) and EMA on the vectors.

The packing is an in-memory layout of the trainer's loop only: checkpoints, the returned state
and everything a stage sees keep the per-parameter `TrainState` (`unpack_state` before a save;
`pack_state` after a restore), so a checkpoint does not depend on it, and packing and unpacking
are exact copies (a resumed run continues bitwise as the uninterrupted one). The optimizer's
state is converted leaf by leaf: a moment of parameter P (an optimizer-state leaf whose path
ends with P's path and has P's shape, the rule `state.opt_state_shardings` uses) is P's slice of
its group's moment vector; every other optimizer-state leaf (step counts) is kept as it is.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.train.optim import decay_mask, make_optimizer
from unclip_jax.train.state import TrainState, _path_keys

PREFIX = "packed/"


def _flat_with_keys(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(_path_keys(p), x) for p, x in leaves], treedef


class StatePacking:
    """The packed layout of a parameter tree and of its `make_optimizer` state.

    `params_abs`: the (abstract) parameters; `trainable`: make_optimizer's bool tree or None;
    `optimizer_cfg`, `total_steps`: make_optimizer's config. `tx` is the optax chain on the
    packed parameters (the same transformations, with each group's masks), `schedule` its
    learning rate. Raises ValueError when the optimizer state cannot be mapped (the trainer then
    keeps the per-parameter layout).
    """

    def __init__(self, params_abs, trainable, optimizer_cfg, total_steps: int):
        flat, self.treedef = _flat_with_keys(params_abs)
        decay = jax.tree.leaves(decay_mask(params_abs))
        train = ([True] * len(flat) if trainable is None
                 else [bool(t) for t in jax.tree.leaves(trainable)])
        if len(decay) != len(flat) or len(train) != len(flat):
            raise ValueError("the trainable mask does not match the parameters")
        self.groups: dict[str, dict[str, Any]] = {}
        self.slots = []  # per parameter leaf: (group, offset, size, shape)
        for (keys, x), d, t in zip(flat, decay, train):
            name = (f"{PREFIX}{jnp.dtype(x.dtype).name}/{'decay' if d else 'nodecay'}/"
                    f"{'train' if t else 'frozen'}")
            g = self.groups.setdefault(name, dict(dtype=jnp.dtype(x.dtype), size=0, decay=d,
                                                  train=t, members=[]))
            size = int(np.prod(x.shape))
            g["members"].append(len(self.slots))
            self.slots.append((name, g["size"], size, tuple(x.shape)))
            g["size"] += size
        self.param_keys = {keys: i for i, (keys, _) in enumerate(flat)}
        self.packed_abs = {n: jax.ShapeDtypeStruct((g["size"],), g["dtype"])
                           for n, g in self.groups.items()}
        self.tx, self.schedule = make_optimizer(
            optimizer_cfg, total_steps,
            None if trainable is None else {n: g["train"] for n, g in self.groups.items()},
            decay={n: g["decay"] for n, g in self.groups.items()})
        leaf_tx, _ = make_optimizer(optimizer_cfg, total_steps, trainable)
        self._map_opt_state(jax.eval_shape(leaf_tx.init, params_abs),
                            jax.eval_shape(self.tx.init, self.packed_abs))

    # -- the optimizer state's correspondence ----------------------------------------------------
    def _map_opt_state(self, leaf_abs, packed_abs):
        longest = max(len(k) for k in self.param_keys)
        lflat, self.leaf_opt_treedef = _flat_with_keys(leaf_abs)
        pflat, self.packed_opt_treedef = _flat_with_keys(packed_abs)
        by_param, others = {}, {}  # (prefix, param index) / keys -> index in lflat
        for i, (keys, x) in enumerate(lflat):
            for n in range(min(len(keys), longest), 0, -1):
                j = self.param_keys.get(keys[-n:])
                if j is not None and tuple(x.shape) == self.slots[j][3]:
                    by_param[(keys[:-n], j)] = i
                    break
            else:
                others[keys] = i
        self.pack_plan = []  # per packed leaf: ("group", [leaf indices]) | ("same", leaf index)
        used = set()
        for keys, x in pflat:
            if keys and keys[-1] in self.groups:
                g = self.groups[keys[-1]]
                idx = [by_param.get((keys[:-1], j)) for j in g["members"]]
                if any(i is None for i in idx) or tuple(x.shape) != (g["size"],):
                    raise ValueError(f"no per-parameter optimizer state for {keys}")
                self.pack_plan.append(("group", idx))
                used.update(idx)
            else:
                i = others.get(keys)
                if i is None or lflat[i][1].shape != x.shape or lflat[i][1].dtype != x.dtype:
                    raise ValueError(f"no per-parameter optimizer state leaf {keys}")
                self.pack_plan.append(("same", i))
                used.add(i)
        if len(used) != len(lflat):
            raise ValueError("optimizer state leaves without a packed place: "
                             f"{[lflat[i][0] for i in range(len(lflat)) if i not in used][:3]}")
        self.leaf_opt_shapes = [tuple(x.shape) for _, x in lflat]

    # -- pack / unpack (pure: use inside or outside jit) -------------------------------------------
    def pack_tree(self, tree) -> dict[str, jax.Array]:
        """A parameter-shaped tree -> {group: vector}."""
        leaves = self.treedef.flatten_up_to(tree)
        return {n: jnp.concatenate([jnp.ravel(leaves[j]) for j in g["members"]])
                for n, g in self.groups.items()}

    def unpack_tree(self, packed: dict[str, jax.Array]):
        leaves = [jax.lax.slice(packed[n], (o,), (o + s,)).reshape(shape)
                  for n, o, s, shape in self.slots]
        return jax.tree.unflatten(self.treedef, leaves)

    def pack_opt_state(self, opt_state):
        leaves = self.leaf_opt_treedef.flatten_up_to(opt_state)
        out = [jnp.concatenate([jnp.ravel(leaves[i]) for i in arg]) if kind == "group"
               else leaves[arg] for kind, arg in self.pack_plan]
        return jax.tree.unflatten(self.packed_opt_treedef, out)

    def unpack_opt_state(self, packed_opt):
        pleaves = self.packed_opt_treedef.flatten_up_to(packed_opt)
        leaves = [None] * len(self.leaf_opt_shapes)
        for (kind, arg), v in zip(self.pack_plan, pleaves):
            if kind == "same":
                leaves[arg] = v
                continue
            o = 0
            for i in arg:
                shape = self.leaf_opt_shapes[i]
                size = int(np.prod(shape))
                leaves[i] = jax.lax.slice(v, (o,), (o + size,)).reshape(shape)
                o += size
        return jax.tree.unflatten(self.leaf_opt_treedef, leaves)

    def pack_state(self, state: TrainState) -> TrainState:
        return TrainState(state.step, self.pack_tree(state.params),
                          self.pack_opt_state(state.opt_state), self.pack_tree(state.ema_params))

    def unpack_state(self, state: TrainState) -> TrainState:
        return TrainState(state.step, self.unpack_tree(state.params),
                          self.unpack_opt_state(state.opt_state),
                          self.unpack_tree(state.ema_params))
