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
