"""Peak FLOP/s of accelerators and model FLOPs of compiled programs, for MFU."""
from __future__ import annotations

import jax

# dense bf16 peak FLOP/s per chip (per device as JAX counts them)
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12 / 2),
)


def peak_flops(device=None) -> float | None:
    """Peak dense bf16 FLOP/s of a device, or None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def jaxpr_flops(fn, *args, **kwargs) -> float:
    """Model FLOPs of `fn(*args)`: 2 x multiply-adds of every matrix product and convolution in
    its jaxpr, loops included — a `scan` body counts `length` times (XLA's cost analysis counts
    a loop body once, so scanned layers and gradient accumulation vanish from it), a `cond` its
    costliest branch. Elementwise work is not counted (the MFU convention). Abstract: nothing
    runs, `args` may be ShapeDtypeStructs."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return float(_walk(closed.jaxpr, 1.0, None))


def jaxpr_ops(fn, *args, **kwargs) -> list[dict]:
    """The matrix products and convolutions of `fn(*args)`'s jaxpr grouped by shape (the ops
    :func:`jaxpr_flops` counts, walked the same way), costliest first: dicts of `primitive`
    ('dot_general' | 'conv_general_dilated'), `lhs` / `rhs` (ShapeDtypeStructs of the operands),
    `params` (the equation's parameters: `primitive.bind(lhs, rhs, **params)` reruns it),
    `count` (executions per call of `fn`, loops included), `flops` (of one execution) and
    `total_flops` (count x flops). The totals sum to `jaxpr_flops(fn, *args)`. Abstract, like it.
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    groups: dict[tuple, dict] = {}

    def visit(eqn, flops, mult):
        lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars[:2])
        key = (eqn.primitive.name, lhs.shape, str(lhs.dtype), rhs.shape, str(rhs.dtype),
               repr(sorted(eqn.params.items())))
        g = groups.get(key)
        if g is None:
            g = groups[key] = dict(primitive=eqn.primitive.name, lhs=lhs, rhs=rhs,
                                   params=dict(eqn.params), bind=eqn.primitive, count=0.0,
                                   flops=flops, total_flops=0.0)
        g["count"] += mult
        g["total_flops"] += mult * flops

    _walk(closed.jaxpr, 1.0, visit)
    return sorted(groups.values(), key=lambda g: -g["total_flops"])


def _eqn_flops(eqn) -> float | None:
    """2 x multiply-adds of a dot_general / conv_general_dilated equation (None: another op)."""
    import numpy as np

    name = eqn.primitive.name
    if name == "dot_general":
        (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
        a, b = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        contract = np.prod([a[i] for i in lc]) if lc else 1
        out = np.prod(eqn.outvars[0].aval.shape)
        return 2.0 * float(out) * float(contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        dn = eqn.params["dimension_numbers"]
        k_in = rhs[dn.rhs_spec[1]]  # input features per group
        window = np.prod([rhs[i] for i in dn.rhs_spec[2:]])
        out = np.prod(eqn.outvars[0].aval.shape)
        return 2.0 * float(out) * float(k_in) * float(window)
    return None


def _walk(jaxpr, mult: float, visit) -> float:
    """FLOPs of `jaxpr` (see jaxpr_flops); `visit(eqn, flops, mult)` is called on each counted
    equation, `mult` the number of times it runs (scan lengths multiplied in)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        f = _eqn_flops(eqn)
        if f is not None:
            total += f
            if visit is not None:
                visit(eqn, f, mult)
        elif name == "scan":
            length = eqn.params["length"]
            total += length * _walk(eqn.params["jaxpr"].jaxpr, mult * length, visit)
        elif name == "cond":
            branches = [b.jaxpr for b in eqn.params["branches"]]
            costs = [_walk(b, mult, None) for b in branches]
            best = max(range(len(costs)), key=costs.__getitem__)
            total += _walk(branches[best], mult, visit) if visit is not None else costs[best]
        else:  # pjit, remat, custom_jvp / custom_vjp, while (body once: trip count unknown)
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        total += _walk(inner, mult, visit)
                    elif hasattr(sub, "eqns"):
                        total += _walk(sub, mult, visit)
    return total


def compiled_flops(compiled) -> float | None:
    """FLOPs of one execution of a compiled program on one device (XLA's cost analysis of the
    SPMD-partitioned per-device program), or None when the backend does not report it."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    f = cost.get("flops")
    return float(f) if f and f > 0 else None


def memory_summary(compiled) -> dict[str, float]:
    """Per-device memory of a compiled program in MiB (argument, output, temp, generated code)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if m is None:
        return {}
    mib = 1 / 2 ** 20
    return {
        "argument_mib": m.argument_size_in_bytes * mib,
        "output_mib": m.output_size_in_bytes * mib,
        "temp_mib": m.temp_size_in_bytes * mib,
        "code_mib": m.generated_code_size_in_bytes * mib,
    }
