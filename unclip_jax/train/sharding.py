"""Device meshes and the rules that map the models' logical axis names to mesh axes.

Mesh axes: ('data', 'fsdp', 'tensor'). Batches are split over data x fsdp; parameters are sharded
over fsdp (ZeRO-3 style: gathered per layer by XLA) and, with the tensor preset, over tensor.

Logical names used by the models (see models/layers.py): parameters 'embed', 'mlp', 'heads',
'kv', 'vocab', 'conv_height', 'conv_width', 'conv_in', 'conv_out', 'norm'; activations 'batch',
'length', 'embed', 'mlp', 'heads', 'kv', 'height', 'width', 'channels'. Flax applies the rules in
order and skips a mesh axis already used by an earlier dimension of the same array, so an
activation [batch, length, embed] keeps 'fsdp' for its batch and leaves 'embed' whole.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

RULE_PRESETS: dict[str, Rules] = {
    # pure data parallel: everything replicated, the batch split over every device
    "dp": (("batch", ("data", "fsdp")),),
    # fully sharded data parallel: the batch over (data, fsdp), each weight's model axis over fsdp
    "fsdp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("mlp", "fsdp"),
        ("heads", "fsdp"),
        ("vocab", "fsdp"),
    ),
    # FSDP + tensor (Megatron-style) parallelism: feed-forward / heads / conv outputs over tensor
    "fsdp_tp": (
        ("batch", ("data", "fsdp")),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("conv_out", "tensor"),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("conv_in", "fsdp"),
    ),
}


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """{'data': -1, 'fsdp': 2, 'tensor': 1} -> sizes; one size may be -1 (fill the rest)."""
    unknown = [k for k in shape if k not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive (or one -1), got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"a mesh of {dict(zip(MESH_AXES, sizes))} does not divide the "
                             f"{num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"the mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices "
                         f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axis types (the logical-rules workflow)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(dict(shape or {"data": -1}), len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def get_rules(rules: str | Sequence[Sequence[Any]]) -> Rules:
    """A preset name ('dp', 'fsdp', 'fsdp_tp') or an explicit list of (logical, mesh) pairs."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"unknown sharding preset {rules!r}; expected one of "
                             f"{sorted(RULE_PRESETS)} or a list of (logical, mesh axes) rules")
        return RULE_PRESETS[rules]
    out = []
    for r in rules:
        name, axes = r
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"rule ({name!r}, {axes!r}) names an unknown mesh axis {a!r}")
        out.append((name, axes))
    return tuple(out)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide their dimension (small params stay replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        size = 1
        for a in names:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a (possibly abstract) tree of nn.Partitioned-boxed values.

    Leaves without logical names are replicated; a mesh axis that does not divide a dimension is
    dropped for that parameter.
    """
    specs = nn.get_partition_spec(boxed_tree)
    unboxed = nn.unbox(boxed_tree)

    def one(spec, leaf):
        logical = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
        return NamedSharding(mesh, _fit(logical, tuple(np.shape(leaf)), mesh))

    return jax.tree.map(one, specs, unboxed, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches: leading axis split over (data, fsdp)."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
