"""CLIP (text and vision towers, projections, contrastive logits) in Flax linen.

Numerically equivalent to transformers' ``CLIPTextModel(WithProjection)``,
``CLIPVisionModel(WithProjection)`` and ``CLIPModel`` (see ``unclip_jax.convert.hf_clip`` for the
weight import), in a layout meant for TPUs: every parameter carries logical axis names and the
residual stream is constrained to ``('batch', 'length', 'embed')``.

Inputs:
  * text: ``input_ids`` [B, L] int32 (L <= ``max_position_embeddings``) and an optional
    ``attention_mask`` [B, L] (1 = real token, 0 = padding). Attention is causal; the padding mask
    hides padded keys from every query, as in transformers.
  * images: NHWC float [B, H, W, C], already normalised with the CLIP mean/std, H = W =
    ``image_size``.

Param tree (``params`` collection)::

  text_model/
    token_embedding/embedding         [vocab, D]          ('vocab', 'embed')
    position_embedding                [max_pos, D]        (None, 'embed')
    layers_{i}/layer_norm1/{scale,bias}
    layers_{i}/self_attn/{q_proj,k_proj,v_proj,out_proj}/dense/{kernel,bias}
    layers_{i}/layer_norm2/{scale,bias}
    layers_{i}/mlp/{fc1,fc2}/dense/{kernel,bias}
    final_layer_norm/{scale,bias}
  text_projection/dense/kernel        [D, proj]           (text tower with projection, CLIPModel)
  vision_model/
    patch_embedding/kernel            [p, p, C, D]        (no bias)
    class_embedding                   [D]
    position_embedding                [num_patches + 1, D]
    pre_layrnorm/{scale,bias}         (sic: transformers' spelling)
    layers_{i}/...                    (as in the text tower)
    post_layernorm/{scale,bias}
  visual_projection/dense/kernel      [D, proj]
  logit_scale                         []                  (CLIPModel only)

``CLIPTextModelWithProjection`` holds ``text_model`` + ``text_projection``,
``CLIPVisionModelWithProjection`` holds ``vision_model`` + ``visual_projection``, and
``CLIPModel`` holds all five; the sub-trees are identical, so a CLIPModel's
``params['text_model']`` + ``params['text_projection']`` is a text-tower tree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers

__all__ = [
    "CLIPTextConfig", "CLIPVisionConfig", "CLIPConfig",
    "CLIPTextTransformer", "CLIPTextModelWithProjection",
    "CLIPVisionTransformer", "CLIPVisionModelWithProjection", "CLIPModel",
    "CLIPEncoderLayer", "pool_eos", "init_params", "clip_loss", "ACTIVATIONS",
]

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

_ATTENTION_IMPLS = (None, "xla", "cudnn")


def _check_common(cfg, what: str) -> None:
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"{what}: hidden_size={cfg.hidden_size} is not a multiple of"
                         f" num_heads={cfg.num_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{what}: unsupported hidden_act {cfg.hidden_act!r}"
                         f" (one of {sorted(ACTIVATIONS)})")
    if cfg.attention_impl not in _ATTENTION_IMPLS:
        raise ValueError(f"{what}: attention_impl must be None, 'xla' or 'cudnn',"
                         f" got {cfg.attention_impl!r}")
    for name in (cfg.dtype, cfg.param_dtype):
        jnp.dtype(name)  # raise early on a bad dtype name


class _ConfigMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**dict(d))

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_ConfigMixin):
    """Text tower. Defaults are OpenAI ViT-L/14's text transformer (width 768, 12 layers)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77     # context length
    hidden_act: str = "quick_gelu"        # "quick_gelu" | "gelu" | ...
    layer_norm_eps: float = 1e-5
    # Pooling token. transformers' rule: eos_token_id == 2 (configs written before the fix)
    # pools at argmax(input_ids) (the eot token has the largest id in OpenAI's vocab);
    # any other id pools at the first position where input_ids == eos_token_id.
    eos_token_id: int = 49407
    bos_token_id: int | None = 49406
    pad_token_id: int | None = 1
    projection_dim: int | None = 768      # None: no text_projection (CLIPTextModel)
    dtype: str = "float32"                # compute dtype
    param_dtype: str = "float32"
    attention_impl: str | None = None     # None (XLA) | "cudnn" (flash attention on GPU)

    def __post_init__(self):
        _check_common(self, "CLIPTextConfig")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_ConfigMixin):
    """Vision tower (ViT). Defaults are OpenAI ViT-L/14 at 224 px."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 768      # None: no visual_projection (CLIPVisionModel)
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None

    def __post_init__(self):
        _check_common(self, "CLIPVisionConfig")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size={self.image_size} is not a multiple of"
                             f" patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers plus the shared projection size and the initial logit scale. The towers'
    own ``projection_dim`` fields are ignored by CLIPModel (as in transformers)."""

    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 768
    logit_scale_init: float = 2.6592      # log(1 / 0.07)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text.to_dict(), "vision": self.vision.to_dict(),
                "projection_dim": self.projection_dim, "logit_scale_init": self.logit_scale_init}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        d = dict(d)
        unknown = set(d) - {"text", "vision", "projection_dim", "logit_scale_init"}
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields: {sorted(unknown)}")
        text = d.pop("text", {})
        vision = d.pop("vision", {})
        text = text if isinstance(text, CLIPTextConfig) else CLIPTextConfig.from_dict(text)
        vision = vision if isinstance(vision, CLIPVisionConfig) else CLIPVisionConfig.from_dict(vision)
        return cls(text=text, vision=vision, **d)

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)

    def with_towers(self, **kw) -> "CLIPConfig":
        """Replace fields on both towers, e.g. ``cfg.with_towers(dtype='bfloat16')``."""
        return dataclasses.replace(self, text=self.text.replace(**kw),
                                   vision=self.vision.replace(**kw))

    @property
    def dtype(self) -> str:
        return self.text.dtype

    @property
    def param_dtype(self) -> str:
        return self.text.param_dtype


def _dts(c):
    return jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)


def _partitioned(init, axes):
    return nn.with_logical_partitioning(init, axes)


# ---------------------------------------------------------------------------------------------
# Shared encoder layer
# ---------------------------------------------------------------------------------------------
class CLIPAttention(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, x, mask=None, is_causal: bool = False):
        c = self.config
        dt, pdt = _dts(c)
        b, t, d = x.shape

        def proj(name):
            y = layers.Dense(d, kernel_axes=("embed", "heads"), dtype=dt, param_dtype=pdt,
                             name=name)(x)
            return layers.constrain(y.reshape(b, t, c.num_heads, c.head_dim),
                                    ("batch", "length", "heads", "kv"))

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        o = layers.attention(q, k, v, mask=mask, is_causal=is_causal,
                             implementation=c.attention_impl)
        o = o.reshape(b, t, d)
        return layers.Dense(d, kernel_axes=("heads", "embed"), dtype=dt, param_dtype=pdt,
                            name="out_proj")(o)


class CLIPMLP(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = _dts(c)
        h = layers.Dense(c.intermediate_size, kernel_axes=("embed", "mlp"), dtype=dt,
                         param_dtype=pdt, name="fc1")(x)
        h = ACTIVATIONS[c.hidden_act](h)
        h = layers.constrain(h, ("batch", "length", "mlp"))
        return layers.Dense(c.hidden_size, kernel_axes=("mlp", "embed"), dtype=dt,
                            param_dtype=pdt, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)); x + mlp(LN2(x)). LayerNorms run in float32."""

    config: Any

    @nn.compact
    def __call__(self, x, mask=None, is_causal: bool = False):
        c = self.config
        dt, pdt = _dts(c)
        h = layers.layer_norm("layer_norm1", c.layer_norm_eps, dt, pdt)(x).astype(dt)
        x = x + CLIPAttention(c, name="self_attn")(h, mask, is_causal)
        x = layers.constrain(x, ("batch", "length", "embed"))
        h = layers.layer_norm("layer_norm2", c.layer_norm_eps, dt, pdt)(x).astype(dt)
        x = x + CLIPMLP(c, name="mlp")(h)
        return layers.constrain(x, ("batch", "length", "embed"))


# ---------------------------------------------------------------------------------------------
# Text tower
# ---------------------------------------------------------------------------------------------
def pool_eos(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Gather the end-of-text hidden state, [B, L, D] -> [B, D] (transformers' rule: argmax of
    the ids when eos_token_id == 2, else the first position holding eos_token_id; a row without
    it pools position 0)."""
    if eos_token_id == 2:
        idx = jnp.argmax(input_ids, axis=-1)
    else:
        idx = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(hidden, idx[:, None, None].astype(jnp.int32), axis=1)[:, 0]


class CLIPTextTransformer(nn.Module):
    """Token + position embeddings, causal pre-LN encoder, final LN, end-of-text pooling.

    Returns ``(last_hidden_state [B, L, D], pooled_output [B, D])``, both in float32.
    """

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        dt, pdt = _dts(c)
        b, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                             f"{c.max_position_embeddings}")
        input_ids = input_ids.astype(jnp.int32)
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pdt,
                       embedding_init=_partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
                       name="token_embedding")(input_ids)
        pos = self.param("position_embedding",
                         _partitioned(nn.initializers.normal(0.01), (None, "embed")),
                         (c.max_position_embeddings, c.hidden_size), pdt)
        x = tok + pos[None, :length].astype(dt)
        x = layers.constrain(x, ("batch", "length", "embed"))
        mask = None
        if attention_mask is not None:
            mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L]: keys
        for i in range(c.num_layers):
            x = CLIPEncoderLayer(c, name=f"layers_{i}")(x, mask, True)
        x = layers.layer_norm("final_layer_norm", c.layer_norm_eps, dt, pdt)(x)
        x = layers.constrain(x, ("batch", "length", "embed"))
        return x, pool_eos(x, input_ids, c.eos_token_id)


def _projection(features, dt, pdt, name=None):
    return layers.Dense(features, kernel_axes=("embed", None), use_bias=False, dtype=dt,
                        param_dtype=pdt, name=name)


class CLIPTextModelWithProjection(nn.Module):
    """Text tower + ``text_projection`` (transformers' CLIPTextModelWithProjection).

    Returns ``dict(text_embeds [B, P] (unnormalised), last_hidden_state [B, L, D],
    pooled_output [B, D])``, float32. With ``config.projection_dim=None`` there is no
    projection and ``text_embeds`` is omitted (transformers' CLIPTextModel).
    """

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        dt, pdt = _dts(c)
        hidden, pooled = CLIPTextTransformer(c, name="text_model")(input_ids, attention_mask)
        out = {"last_hidden_state": hidden, "pooled_output": pooled}
        if c.projection_dim is not None:
            emb = _projection(c.projection_dim, dt, pdt, "text_projection")(pooled.astype(dt))
            out["text_embeds"] = emb.astype(jnp.float32)
        return out


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------
class CLIPVisionTransformer(nn.Module):
    """Patch embedding (conv, no bias), class token, position embedding, pre-LN, encoder, post-LN
    on the class token. Returns ``(last_hidden_state [B, 1 + N, D], pooled_output [B, D])``.
    (``last_hidden_state`` is before the post-LN, as in transformers.)"""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        dt, pdt = _dts(c)
        b, h, w, ch = pixel_values.shape
        if h != c.image_size or w != c.image_size or ch != c.num_channels:
            raise ValueError(f"expected images [B, {c.image_size}, {c.image_size}, {c.num_channels}]"
                             f" (NHWC), got {tuple(pixel_values.shape)}")
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    dtype=dt, param_dtype=pdt,
                    kernel_init=_partitioned(nn.initializers.normal(0.02),
                                             ("conv_height", "conv_width", "conv_in", "embed")),
                    name="patch_embedding")(pixel_values.astype(dt))
        x = x.reshape(b, -1, c.hidden_size)                    # row-major patches, like torch
        cls = self.param("class_embedding",
                         _partitioned(nn.initializers.normal(c.hidden_size ** -0.5), ("embed",)),
                         (c.hidden_size,), pdt)
        pos = self.param("position_embedding",
                         _partitioned(nn.initializers.normal(0.02), (None, "embed")),
                         (c.num_patches + 1, c.hidden_size), pdt)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, c.hidden_size)), x], axis=1)
        x = x + pos[None].astype(dt)
        x = layers.constrain(x, ("batch", "length", "embed"))
        x = layers.layer_norm("pre_layrnorm", c.layer_norm_eps, dt, pdt)(x).astype(dt)
        for i in range(c.num_layers):
            x = CLIPEncoderLayer(c, name=f"layers_{i}")(x)
        last = x.astype(jnp.float32)
        pooled = layers.layer_norm("post_layernorm", c.layer_norm_eps, dt, pdt)(x[:, 0])
        return last, pooled


class CLIPVisionModelWithProjection(nn.Module):
    """Vision tower + ``visual_projection``. Returns ``dict(image_embeds [B, P] (unnormalised),
    last_hidden_state [B, 1 + N, D], pooled_output [B, D])``, float32."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        dt, pdt = _dts(c)
        hidden, pooled = CLIPVisionTransformer(c, name="vision_model")(pixel_values)
        out = {"last_hidden_state": hidden, "pooled_output": pooled}
        if c.projection_dim is not None:
            emb = _projection(c.projection_dim, dt, pdt, "visual_projection")(pooled.astype(dt))
            out["image_embeds"] = emb.astype(jnp.float32)
        return out


# ---------------------------------------------------------------------------------------------
# Dual encoder
# ---------------------------------------------------------------------------------------------
def _l2_normalize(x):
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nn.Module):
    """Both towers, projections and the learnable ``logit_scale`` (transformers' CLIPModel).

    ``__call__(input_ids, pixel_values, attention_mask=None)`` returns ``dict(text_embeds,
    image_embeds (both L2-normalised), logits_per_text [Bt, Bi], logits_per_image [Bi, Bt],
    logit_scale (exp'd), text_last_hidden_state, vision_last_hidden_state)``.
    ``get_text_features`` / ``get_image_features`` (use ``apply(..., method=...)``) return the
    unnormalised projected embeddings.
    """

    config: CLIPConfig

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text)
        self.vision_model = CLIPVisionTransformer(c.vision)
        self.text_projection = _projection(c.projection_dim, *_dts(c.text))
        self.visual_projection = _projection(c.projection_dim, *_dts(c.vision))
        self.logit_scale = self.param(
            "logit_scale", _partitioned(nn.initializers.constant(c.logit_scale_init), ()), (),
            jnp.dtype(c.text.param_dtype))

    def _text(self, input_ids, attention_mask):
        hidden, pooled = self.text_model(input_ids, attention_mask)
        emb = self.text_projection(pooled.astype(jnp.dtype(self.config.text.dtype)))
        return emb.astype(jnp.float32), hidden

    def _image(self, pixel_values):
        hidden, pooled = self.vision_model(pixel_values)
        emb = self.visual_projection(pooled.astype(jnp.dtype(self.config.vision.dtype)))
        return emb.astype(jnp.float32), hidden

    def get_text_features(self, input_ids, attention_mask=None):
        return self._text(input_ids, attention_mask)[0]

    def get_image_features(self, pixel_values):
        return self._image(pixel_values)[0]

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        text_embeds, text_hidden = self._text(input_ids, attention_mask)
        image_embeds, image_hidden = self._image(pixel_values)
        text_embeds = _l2_normalize(text_embeds)
        image_embeds = _l2_normalize(image_embeds)
        scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        logits_per_text = scale * (text_embeds @ image_embeds.T)
        return {
            "text_embeds": text_embeds,
            "image_embeds": image_embeds,
            "logits_per_text": logits_per_text,
            "logits_per_image": logits_per_text.T,
            "logit_scale": scale,
            "text_last_hidden_state": text_hidden,
            "vision_last_hidden_state": image_hidden,
        }


def clip_loss(logits_per_text: jax.Array) -> jax.Array:
    """Symmetric contrastive (InfoNCE) loss over a square [B, B] logit matrix."""
    labels = jnp.arange(logits_per_text.shape[0])
    lt = -jnp.take_along_axis(jax.nn.log_softmax(logits_per_text, -1), labels[:, None], 1).mean()
    li = -jnp.take_along_axis(jax.nn.log_softmax(logits_per_text.T, -1), labels[:, None], 1).mean()
    return 0.5 * (lt + li)


# ---------------------------------------------------------------------------------------------
# Construction helpers
# ---------------------------------------------------------------------------------------------
def build_model(kind: str, config) -> nn.Module:
    """kind: 'text' | 'vision' | 'clip' -> the matching module."""
    if kind == "text":
        return CLIPTextModelWithProjection(config)
    if kind == "vision":
        return CLIPVisionModelWithProjection(config)
    if kind == "clip":
        return CLIPModel(config)
    raise ValueError(f"kind must be 'text', 'vision' or 'clip', got {kind!r}")


def dummy_inputs(kind: str, config, batch_size: int = 1) -> tuple:
    """Inputs of the right shapes for ``init``/``eval_shape``."""
    def text(c):
        return (jnp.zeros((batch_size, c.max_position_embeddings), jnp.int32),)

    def image(c):
        return (jnp.zeros((batch_size, c.image_size, c.image_size, c.num_channels), jnp.float32),)

    if kind == "text":
        return text(config)
    if kind == "vision":
        return image(config)
    if kind == "clip":
        return text(config.text) + image(config.vision)
    raise ValueError(f"kind must be 'text', 'vision' or 'clip', got {kind!r}")


def init_params(kind: str, config, rng=None, batch_size: int = 1, boxed: bool = False):
    """Initialise params for ``build_model(kind, config)``. ``rng=None`` gives an abstract
    (``jax.eval_shape``) tree of ShapeDtypeStructs. Unboxed (plain arrays) unless ``boxed``
    (nn.Partitioned leaves, for ``nn.get_partition_spec``)."""
    model = build_model(kind, config)
    args = dummy_inputs(kind, config, batch_size)
    if rng is None:
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    else:
        variables = jax.jit(model.init)(rng, *args)
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)
