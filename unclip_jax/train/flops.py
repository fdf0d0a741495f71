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
    return float(_count(closed.jaxpr))


def _count(jaxpr) -> float:
    import numpy as np

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            a, b = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            contract = np.prod([a[i] for i in lc]) if lc else 1
            out = np.prod(eqn.outvars[0].aval.shape)
            total += 2.0 * float(out) * float(contract)
        elif name == "conv_general_dilated":
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            k_in = rhs[dn.rhs_spec[1]]  # input features per group
            window = np.prod([rhs[i] for i in dn.rhs_spec[2:]])
            out = np.prod(eqn.outvars[0].aval.shape)
            total += 2.0 * float(out) * float(k_in) * float(window)
        elif name == "scan":
            total += eqn.params["length"] * _count(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(_count(b.jaxpr) for b in eqn.params["branches"])
        else:  # pjit, remat, custom_jvp / custom_vjp, while (body once: trip count unknown)
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        total += _count(inner)
                    elif hasattr(sub, "eqns"):
                        total += _count(sub)
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
