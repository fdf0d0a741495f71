"""The ADM / GLIDE UNet of the unCLIP decoder and upsamplers (Flax linen, NHWC).

Architecture (as in Karlo / diffusers' `UNet2DConditionModel` and `UNet2DModel` built from
ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D / UNetMidBlock2DSimpleCrossAttn /
SimpleCrossAttnUpBlock2D / ResnetUpsampleBlock2D):

  t -> sinusoid(C0) -> Dense -> SiLU -> Dense  (+ time_cond)  (+ noise-level MLP)  = emb
  x -> conv_in -> [level: (ResBlock [-> Attention]) x layers, down ResBlock] ... -> mid
    -> [level: (concat skip -> ResBlock [-> Attention]) x (layers + 1), up ResBlock] ...
    -> GroupNorm -> SiLU -> conv_out

ResBlocks use scale-shift GroupNorm (`h = norm(h) * (1 + scale) + shift`) and BigGAN-style
up/down sampling inside the residual block (nearest x2 / 2x2 average pool on both branches).
Attention is GLIDE's: keys and values are [projected context tokens, spatial tokens], queries are
the spatial tokens; the context mask covers the context tokens only, spatial tokens are always
attended (which is what diffusers' `prepare_attention_mask` padding amounts to).

Parameter tree of `UNet` (flax names; `*` = layers.Dense, which nests its kernel/bias under
`dense`):

  conv_in/{kernel,bias}             time_embed/{linear_1*,linear_2*}   [noise_embed/{...}]
  down_{i}/res_{j}/{norm1,conv1,time_proj*,norm2,conv2,[skip]}
  down_{i}/attn_{j}/{[norm],to_q*,to_k*,to_v*,[ctx_k*,ctx_v*],to_out*}
  down_{i}/downsample/(ResBlock | conv)
  mid/{res_0,attn_0,res_1}          up_{i}/{res_j,attn_j,upsample}     norm_out, conv_out

`models/decoder.py`'s `Decoder` wraps `unet` with the unCLIP conditioning (`null_image_embed`,
`image_to_time*`, `text_to_time*`, `image_to_tokens*`, `text_proj*`, `text_norm`). An upsampler is
this UNet with the resized low-resolution image concatenated on channels (`upsample_input`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
FMAP = ("batch", "height", "width", "channels")

MID_BLOCKS = ("attention", "resnets", "resnet", "none")


def _tuple(v, n, what):
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{what} has {len(v)} entries but the UNet has {n} levels")
        return tuple(v)
    return (v,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the ADM UNet.

    sample_size: the resolution the model works at (informational: samplers use it for the
      latents' shape; the network itself takes any size divisible by 2**(levels-1)).
    block_out_channels: width of each resolution level (model_channels * channel_mult).
    layers_per_block: res blocks per level on the way down (int or one per level); the way up has
      one more per level (it also consumes the level's downsampled skip).
    attention_levels: per level, whether every res block of the level is followed by attention
      (diffusers: SimpleCrossAttn{Down,Up}Block2D). Up levels mirror the down levels. None =
      every level but the first (ADM's attention at the lower resolutions).
    mid_block: "attention" (res, attn, res), "resnets" (res, res), "resnet" (one res), "none".
    attention_head_dim: channels per attention head, int or one per level (down order).
    up_attention_head_dim: channels per head of the up levels in *up* order; None = mirror the
      down levels (diffusers' UNet2DConditionModel indexes the un-reversed tuple; the importer
      sets this when a per-level tuple is used).
    mid_attention_head_dim: None = that of the last level.
    attn_norm / attn_norm_groups / attn_norm_eps: GroupNorm in front of attention (groups None =
      norm_groups).
    resnet_time_scale_shift: "scale_shift" (ADM) or "default" (emb added before the 2nd norm).
    resblock_updown: BigGAN-style sampling inside res blocks (True) or strided conv down /
      nearest + conv up (False).
    context_dim: width of the context tokens keys/values also see (None = no context).
    time_embed_dim: None = 4 * block_out_channels[0].
    time_cond: a [B, time_embed_dim] vector is added to the time embedding (diffusers
      class_embed_type="identity"; the unCLIP decoder's CLIP-embedding projection).
    noise_level_cond: the upsampler's noise-augmentation level is embedded like t and added.
    coord_input: append two channels of normalised (y, x) coordinates in [-1, 1] to the input of
      conv_in (CoordConv). Convolutions with zero padding only sense position near the borders;
      a small, briefly trained UNet learns to place what the conditioning vector describes much
      faster with them. Off for ADM / Karlo / diffusers weights.
    patch_size: the network works on p x p patches: the input (with its coordinate channels) is
      folded space-to-depth into [B, H/p, W/p, C p^2] before conv_in and conv_out's
      out_channels p^2 channels are unfolded depth-to-space, so every level runs at 1/p of the
      resolution (what "simple diffusion" and DiT's patching do for pixels). 1 = ADM.
    output_skip: k > 0 adds the last k input channels to the first k output channels: an
      upsampler that sees [x_t, bicubic(low_res)] and predicts x0 then predicts the correction to
      the bicubic image (zero at init: clean flat regions from the first step; ResShift / SR3's
      residual idea, on the network's output only). 0 = ADM.
    remat: rematerialise res blocks in the backward pass (saves activation memory);
      remat_policy: what is kept (see layers.remat_policy: "full", "dots", ...).
    """

    in_channels: int = 3
    out_channels: int = 6
    sample_size: int | None = 64
    block_out_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int | tuple[int, ...] = 2
    attention_levels: tuple[bool, ...] | None = None
    mid_block: str = "attention"
    attention_head_dim: int | tuple[int, ...] = 64
    up_attention_head_dim: tuple[int, ...] | None = None
    mid_attention_head_dim: int | None = None
    norm_groups: int = 32
    norm_eps: float = 1e-5
    attn_norm: bool = True
    attn_norm_groups: int | None = None
    attn_norm_eps: float = 1e-5
    dropout: float = 0.0
    resnet_time_scale_shift: str = "scale_shift"
    resnet_skip_time_act: bool = False
    resnet_output_scale: float = 1.0
    mid_output_scale: float = 1.0
    mid_attn_output_scale: float = 1.0
    resblock_updown: bool = True
    context_dim: int | None = None
    time_embed_dim: int | None = None
    time_cond: bool = False
    noise_level_cond: bool = False
    coord_input: bool = False
    patch_size: int = 1
    output_skip: int = 0
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    remat: bool = False
    remat_policy: str = "full"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        # normalise list inputs (e.g. from JSON) to tuples so the config stays hashable
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if self.attention_levels is None:
            object.__setattr__(self, "attention_levels", (False,) + (True,) * (n - 1))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        for name in ("layers_per_block", "attention_head_dim", "up_attention_head_dim"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        layers.remat_policy(self.remat_policy)  # raise early on a bad policy name
        if len(self.attention_levels) != n:
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries for {n} levels")
        _tuple(self.layers_per_block, n, "layers_per_block")
        _tuple(self.attention_head_dim, n, "attention_head_dim")
        if self.up_attention_head_dim is not None:
            _tuple(self.up_attention_head_dim, n, "up_attention_head_dim")
        if not 0 <= int(self.output_skip) <= min(self.in_channels, self.out_channels):
            raise ValueError(f"output_skip must be in [0, min(in_channels, out_channels)], got "
                             f"{self.output_skip}")
        if int(self.patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.mid_block not in MID_BLOCKS:
            raise ValueError(f"mid_block must be one of {MID_BLOCKS}, got {self.mid_block!r}")
        if self.resnet_time_scale_shift not in ("scale_shift", "default"):
            raise ValueError("resnet_time_scale_shift must be 'scale_shift' or 'default', got "
                             f"{self.resnet_time_scale_shift!r}")

    # derived -----------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def model_channels(self) -> int:
        return self.block_out_channels[0]

    @property
    def emb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.block_out_channels[0]

    @property
    def layers(self) -> tuple[int, ...]:
        return _tuple(self.layers_per_block, self.num_levels, "layers_per_block")

    def head_dims_down(self) -> tuple[int, ...]:
        return _tuple(self.attention_head_dim, self.num_levels, "attention_head_dim")

    def head_dims_up(self) -> tuple[int, ...]:
        if self.up_attention_head_dim is not None:
            return tuple(self.up_attention_head_dim)
        return tuple(reversed(self.head_dims_down()))

    def head_dim_mid(self) -> int:
        return self.mid_attention_head_dim or self.head_dims_down()[-1]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# layers

def _conv(features, kernel, name, cfg: UNetConfig, strides=1):
    pad = (kernel - 1) // 2
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name)


def _dense(features, name, cfg: UNetConfig, axes=("embed", "mlp"), kernel_init=None):
    return layers.Dense(features, kernel_axes=axes, dtype=jnp.dtype(cfg.dtype),
                        param_dtype=jnp.dtype(cfg.param_dtype),
                        kernel_init=kernel_init or layers.default_kernel_init, name=name)


def _group_norm(groups, eps, name, cfg: UNetConfig):
    """GroupNorm computed in float32 (two-pass statistics; see layers.GroupNorm)."""
    return layers.GroupNorm(num_groups=groups, epsilon=eps,
                            param_dtype=jnp.dtype(cfg.param_dtype), name=name)


def coordinate_channels(batch: int, height: int, width: int, dtype=jnp.float32) -> jax.Array:
    """[batch, height, width, 2]: (y, x) of each pixel centre, scaled to [-1, 1]."""
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 - 1
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 - 1
    grid = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).astype(dtype)
    return jnp.broadcast_to(grid[None], (batch, height, width, 2))


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]; channel index (dy * p + dx) * C + c."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of :func:`space_to_depth`."""
    b, h, w, pc = x.shape
    c = pc // (p * p)
    x = x.reshape(b, h, w, p, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c)


def _upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


class TimeMLP(nn.Module):
    """Dense -> SiLU -> Dense (diffusers TimestepEmbedding)."""

    features: int
    config: UNetConfig

    @nn.compact
    def __call__(self, x):
        x = _dense(self.features, "linear_1", self.config)(x)
        x = nn.silu(x)
        return _dense(self.features, "linear_2", self.config, axes=("mlp", "embed"))(x)


class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-[up/down]-conv, scale-shift GN with the embedding, SiLU,
    dropout, conv; 1x1 conv on the skip when the width changes."""

    out_channels: int
    config: UNetConfig
    up: bool = False
    down: bool = False
    output_scale: float = 1.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, emb):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = _group_norm(cfg.norm_groups, cfg.norm_eps, "norm1", cfg)(x)
        h = nn.silu(h).astype(dtype)
        if self.up:
            x, h = _upsample_nearest(x), _upsample_nearest(h)
        elif self.down:
            x, h = _avg_pool(x), _avg_pool(h)
        h = _conv(self.out_channels, 3, "conv1", cfg)(h)
        e = emb if cfg.resnet_skip_time_act else nn.silu(emb)
        scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        e = _dense(self.out_channels * (2 if scale_shift else 1), "time_proj", cfg,
                   axes=("mlp", "embed"))(e)[:, None, None, :]
        norm2 = _group_norm(cfg.norm_groups, cfg.norm_eps, "norm2", cfg)
        if scale_shift:
            scale, shift = jnp.split(e.astype(jnp.float32), 2, axis=-1)
            h = norm2(h) * (1.0 + scale) + shift
        else:
            h = norm2(h + e)
        h = nn.silu(h).astype(dtype)
        h = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(h)
        h = _conv(self.out_channels, 3, "conv2", cfg)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "skip", cfg)(x)
        out = x.astype(dtype) + h
        if self.output_scale != 1.0:
            out = out / self.output_scale
        return layers.constrain(out, FMAP)


class AttentionBlock(nn.Module):
    """GLIDE attention over the spatial tokens, whose keys/values also include the context
    tokens (projected by ctx_k / ctx_v), with a residual connection."""

    head_dim: int
    config: UNetConfig
    output_scale: float = 1.0

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, hh, ww, c = x.shape
        if c % self.head_dim:
            raise ValueError(f"attention width {c} is not a multiple of the head width {self.head_dim}")
        heads = c // self.head_dim
        h = x
        if cfg.attn_norm:
            h = _group_norm(cfg.attn_norm_groups or cfg.norm_groups, cfg.attn_norm_eps, "norm", cfg)(h)
        h = h.astype(dtype).reshape(b, hh * ww, c)
        split = lambda y: y.reshape(y.shape[0], y.shape[1], heads, self.head_dim)  # noqa: E731
        q = split(_dense(c, "to_q", cfg)(h))
        k = split(_dense(c, "to_k", cfg)(h))
        v = split(_dense(c, "to_v", cfg)(h))
        mask = None
        if cfg.context_dim is not None:
            if context is None:  # no tokens: still create the projections
                context = jnp.zeros((b, 0, cfg.context_dim), dtype)
            context = context.astype(dtype)
            ck = split(_dense(c, "ctx_k", cfg)(context))
            cv = split(_dense(c, "ctx_v", cfg)(context))
            k = jnp.concatenate([ck, k], axis=1)
            v = jnp.concatenate([cv, v], axis=1)
            if context_mask is not None:
                mask = jnp.concatenate(
                    [context_mask.astype(bool), jnp.ones((b, hh * ww), bool)], axis=1)
                mask = mask[:, None, None, :]
        out = layers.attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
        out = _dense(c, "to_out", cfg, axes=("mlp", "embed"))(out.reshape(b, hh * ww, c))
        out = out.reshape(b, hh, ww, c) + x.astype(dtype)
        if self.output_scale != 1.0:
            out = out / self.output_scale
        return layers.constrain(out, FMAP)


class Downsample(nn.Module):
    """Strided 3x3 conv (resblock_updown=False)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x, emb=None):
        return _conv(x.shape[-1], 3, "conv", self.config, strides=2)(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (resblock_updown=False)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x, emb=None):
        return _conv(x.shape[-1], 3, "conv", self.config)(_upsample_nearest(x))


# ----------------------------------------------------------------------------------------------
# the UNet

def _res_cls(cfg: UNetConfig):
    return layers.maybe_remat(ResBlock, cfg.remat, cfg.remat_policy)


def _updown_cls(cfg: UNetConfig, up: bool):
    """The resolution change between levels: a res block (BigGAN) or a conv sampler."""
    if cfg.resblock_updown:
        res = _res_cls(cfg)
        return lambda ch, det, name: res(ch, cfg, up=up, down=not up,
                                         output_scale=cfg.resnet_output_scale,
                                         deterministic=det, name=name)
    cls = Upsample if up else Downsample
    return lambda ch, det, name: cls(cfg, name=name)


class DownLevel(nn.Module):
    """One resolution level on the way down; returns (h, skip activations)."""

    config: UNetConfig
    level: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, h, emb, context=None, context_mask=None):
        cfg, i = self.config, self.level
        ch = cfg.block_out_channels[i]
        res = _res_cls(cfg)
        skips = []
        for j in range(cfg.layers[i]):
            h = res(ch, cfg, output_scale=cfg.resnet_output_scale,
                    deterministic=self.deterministic, name=f"res_{j}")(h, emb)
            if cfg.attention_levels[i]:
                h = AttentionBlock(cfg.head_dims_down()[i], cfg, name=f"attn_{j}")(
                    h, context, context_mask)
            skips.append(h)
        if i < cfg.num_levels - 1:
            h = _updown_cls(cfg, up=False)(ch, self.deterministic, "downsample")(h, emb)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    config: UNetConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, h, emb, context=None, context_mask=None):
        cfg = self.config
        ch = cfg.block_out_channels[-1]
        res = _res_cls(cfg)
        h = res(ch, cfg, output_scale=cfg.mid_output_scale, deterministic=self.deterministic,
                name="res_0")(h, emb)
        if cfg.mid_block == "attention":
            h = AttentionBlock(cfg.head_dim_mid(), cfg, output_scale=cfg.mid_attn_output_scale,
                               name="attn_0")(h, context, context_mask)
        if cfg.mid_block in ("attention", "resnets"):
            h = res(ch, cfg, output_scale=cfg.mid_output_scale, deterministic=self.deterministic,
                    name="res_1")(h, emb)
        return h


class UpLevel(nn.Module):
    """Up level `index` (0 = lowest resolution); consumes layers + 1 skips, last first."""

    config: UNetConfig
    index: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, h, skips, emb, context=None, context_mask=None):
        cfg, i = self.config, self.index
        level = cfg.num_levels - 1 - i
        ch = cfg.block_out_channels[level]
        res = _res_cls(cfg)
        skips = list(skips)
        for j in range(cfg.layers[level] + 1):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = res(ch, cfg, output_scale=cfg.resnet_output_scale,
                    deterministic=self.deterministic, name=f"res_{j}")(h, emb)
            if cfg.attention_levels[level]:
                h = AttentionBlock(cfg.head_dims_up()[i], cfg, name=f"attn_{j}")(
                    h, context, context_mask)
        if i < cfg.num_levels - 1:
            h = _updown_cls(cfg, up=True)(ch, self.deterministic, "upsample")(h, emb)
        return h


class UNet(nn.Module):
    """ADM UNet. `__call__(x [B,H,W,C], t [B], *, context [B,L,D], context_mask [B,L] bool,
    time_cond [B,E], noise_level [B], train)` -> [B,H,W,out_channels] (float32).

    context: tokens that every attention's keys/values see besides the spatial tokens;
    context_mask: True = attend (spatial tokens are always attended); time_cond: added to the
    time embedding; noise_level: embedded like t and added (noise_level_cond=True only).
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, x, t, *, context=None, context_mask=None, time_cond=None,
                 noise_level=None, train: bool = False):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        n = cfg.num_levels
        b, hgt, wid, _ = x.shape
        p = int(cfg.patch_size)
        factor = 2 ** (n - 1) * p
        if hgt % factor or wid % factor:
            raise ValueError(f"input size {hgt}x{wid} is not divisible by {factor} "
                             f"(the UNet halves the resolution {n - 1} times"
                             + (f" after {p}x{p} patches" if p > 1 else "") + ")")
        det = not train

        # embedding
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        temb = layers.timestep_embedding(t, cfg.block_out_channels[0],
                                         flip_sin_to_cos=cfg.flip_sin_to_cos,
                                         downscale_freq_shift=cfg.freq_shift)
        emb = TimeMLP(cfg.emb_dim, cfg, name="time_embed")(temb.astype(dtype))
        if cfg.time_cond:
            if time_cond is None:
                raise ValueError("this UNet is configured with time_cond=True: pass time_cond")
            emb = emb + time_cond.astype(dtype)
        elif time_cond is not None:
            raise ValueError("time_cond given but the UNet config has time_cond=False")
        if cfg.noise_level_cond:
            if noise_level is None:
                raise ValueError("this UNet is configured with noise_level_cond=True: pass noise_level")
            nemb = layers.timestep_embedding(jnp.broadcast_to(jnp.asarray(noise_level), (b,)),
                                             cfg.block_out_channels[0],
                                             flip_sin_to_cos=cfg.flip_sin_to_cos,
                                             downscale_freq_shift=cfg.freq_shift)
            emb = emb + TimeMLP(cfg.emb_dim, cfg, name="noise_embed")(nemb.astype(dtype))
        elif noise_level is not None:
            raise ValueError("noise_level given but the UNet config has noise_level_cond=False")
        emb = layers.constrain(emb, ("batch", "embed"))
        if cfg.context_dim is None and context is not None:
            raise ValueError("context given but the UNet config has context_dim=None")

        # down
        x_in = x
        x = x.astype(dtype)
        if cfg.coord_input:
            x = jnp.concatenate([x, coordinate_channels(b, hgt, wid, dtype)], axis=-1)
        if p > 1:
            x = space_to_depth(x, p)
        h = _conv(cfg.block_out_channels[0], 3, "conv_in", cfg)(x)
        h = layers.constrain(h, FMAP)
        skips = [h]
        for i in range(n):
            h, s = DownLevel(cfg, i, det, name=f"down_{i}")(h, emb, context, context_mask)
            skips.extend(s)

        # mid
        if cfg.mid_block != "none":
            h = MidBlock(cfg, det, name="mid")(h, emb, context, context_mask)

        # up
        for i in range(n):
            k = cfg.layers[n - 1 - i] + 1
            h = UpLevel(cfg, i, det, name=f"up_{i}")(h, skips[-k:], emb, context, context_mask)
            skips = skips[:-k]

        # out
        h = _group_norm(cfg.norm_groups, cfg.norm_eps, "norm_out", cfg)(h)
        h = nn.silu(h).astype(dtype)
        out = _conv(cfg.out_channels * p * p, 3, "conv_out", cfg)(h)
        if p > 1:
            out = depth_to_space(out, p)
        out = layers.constrain(out, FMAP).astype(jnp.float32)
        k = int(cfg.output_skip)
        if k:
            out = jnp.concatenate([out[..., :k] + x_in[..., -k:].astype(jnp.float32),
                                   out[..., k:]], axis=-1)
        return out


def init_inputs(config: UNetConfig, batch: int = 1, size: int | None = None, context_len: int = 1):
    """Dummy inputs (x, t, kwargs) of the right shapes for `UNet.init`."""
    size = size or 2 ** (config.num_levels - 1) * config.patch_size
    x = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    kw = {}
    if config.context_dim is not None:
        kw["context"] = jnp.zeros((batch, context_len, config.context_dim), jnp.float32)
        kw["context_mask"] = jnp.ones((batch, context_len), bool)
    if config.time_cond:
        kw["time_cond"] = jnp.zeros((batch, config.emb_dim), jnp.float32)
    if config.noise_level_cond:
        kw["noise_level"] = jnp.zeros((batch,), jnp.int32)
    return x, t, kw


# ----------------------------------------------------------------------------------------------
# upsampler input

def upsample_input(low_res: jax.Array, size: int | Sequence[int], method: str = "bicubic") -> jax.Array:
    """Resize the low-resolution image [B,h,w,C] to `size` for an upsampler UNet, which takes
    `concat([x_t, upsample_input(low_res, ...)], axis=-1)` (in_channels = 2 C).

    "bicubic" is what diffusers' UnCLIP pipeline does (`F.interpolate(mode="bicubic",
    align_corners=False, antialias=True)`: Keys cubic a=-0.5, half-pixel centres, taps outside
    the image dropped and the weights renormalised; equal to jax.image.resize's bicubic with
    antialias). "nearest" is its MPS fallback; "bilinear" / "lanczos3" / "lanczos5" pass through
    to jax.image.resize.
    """
    if isinstance(size, int):
        size = (size, size)
    b, _, _, c = low_res.shape
    shape = (b, int(size[0]), int(size[1]), c)
    if method == "nearest":
        # torch 'nearest': src = floor(dst * in / out)
        h, w = low_res.shape[1:3]
        ih = jnp.floor(jnp.arange(shape[1]) * (h / shape[1])).astype(jnp.int32).clip(0, h - 1)
        iw = jnp.floor(jnp.arange(shape[2]) * (w / shape[2])).astype(jnp.int32).clip(0, w - 1)
        return low_res[:, ih][:, :, iw]
    if method not in ("bicubic", "bilinear", "lanczos3", "lanczos5"):
        raise ValueError(f"unknown resize method {method!r}")
    out = jax.image.resize(low_res.astype(jnp.float32), shape, method=method, antialias=True)
    return out.astype(low_res.dtype)


def super_res_denoiser(config: UNetConfig):
    """An upsampler UNet as the sampler's and the loss's model function:
    ``fn(params, x_t [B, H, W, 3], t [B], cond, *, train=False, rng=None)`` with ``cond`` =
    dict(low_res [B, H, W, 3] (the low-resolution image already resized to H x W, in [-1, 1]),
    and, for a UNet with noise_level_cond, noise_level [B] int: the augmentation level of low_res).
    The network sees [x_t, low_res] concatenated on channels."""
    model = UNet(config)

    def fn(params, x_t, t, cond, *, train: bool = False, rng=None):
        kw = {}
        if config.noise_level_cond:
            if cond.get("noise_level") is None:
                raise ValueError("this upsampler is conditioned on a noise-augmentation level: "
                                 "cond needs noise_level [B]")
            kw["noise_level"] = cond["noise_level"]
        return model.apply({"params": params}, jnp.concatenate([x_t, cond["low_res"]], axis=-1),
                           t, train=train, rngs=None if rng is None else {"dropout": rng}, **kw)
    return fn
