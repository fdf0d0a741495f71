"""Building blocks shared by every network: partitioned dense/conv/norm layers and attention.

Logical axis names used on parameters and activations (mapped to mesh axes by the training
config's rules):

  parameters:  'embed' (model width), 'mlp' (feed-forward width), 'heads', 'kv' (head width),
               'vocab', 'conv_height', 'conv_width', 'conv_in', 'conv_out', 'norm'
  activations: 'batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'height', 'width', 'channels'
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.lecun_normal()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Annotate an activation with logical axis names (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, tuple(names))


class Dense(nn.Module):
    """nn.Dense whose kernel and bias carry logical axis names."""

    features: int
    kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init

    @nn.compact
    def __call__(self, x):
        return nn.Dense(
            self.features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[-1:]),
            name="dense",
        )(x)


def layer_norm(name: str, eps: float, dtype: Dtype, param_dtype: Dtype, axis_name: str = "norm"):
    """LayerNorm with partitioned scale and bias (computed in float32 for stability)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
        name=name,
    )


def attention(q, k, v, *, mask=None, is_causal=False, implementation=None):
    """Scaled dot-product attention over [batch, length, heads, head_dim] tensors.

    Goes through `jax.nn.dot_product_attention` so that `implementation="cudnn"` selects flash
    attention on GPU; `None` lets XLA choose. `mask` is a boolean array broadcastable to
    [batch, heads, q_len, kv_len] (True = attend).
    """
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
    )


REMAT_POLICIES = ("full", "dots", "dots_with_batch", "nothing")


def remat_policy(name: str):
    """A `jax.checkpoint` policy by name: what the backward pass keeps instead of recomputing.

    "full": keep nothing (recompute the whole block; least memory); "dots": keep the results of
    matrix products without batch dimensions (projections, MLPs) and recompute the cheap
    elementwise work and attention; "dots_with_batch": keep every matrix product (attention
    scores too); "nothing": keep everything (remat off, for comparisons).
    """
    policies = jax.checkpoint_policies
    table = {"full": policies.nothing_saveable,
             "dots": policies.dots_with_no_batch_dims_saveable,
             "dots_with_batch": policies.checkpoint_dots,
             "nothing": policies.everything_saveable}
    if name not in table:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {name!r}")
    return table[name]


def maybe_remat(module_cls, enabled: bool, policy: str = "full", **kw):
    """`nn.remat(module_cls, policy=...)` when enabled, else the class itself."""
    if not enabled:
        return module_cls
    return nn.remat(module_cls, policy=remat_policy(policy), **kw)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0) -> jax.Array:
    """Sinusoidal timestep embedding, [B] -> [B, dim], float32.

    With flip_sin_to_cos=True and downscale_freq_shift=0 this is ADM's/GLIDE's embedding
    ([cos, sin]); diffusers' `Timesteps(dim, flip_sin_to_cos, downscale_freq_shift)` is the same
    family.
    """
    half = dim // 2
    exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
