"""The unCLIP diffusion prior: a causal transformer that predicts a clean CLIP image embedding.

Sequence fed to the transformer (length ``num_text_tokens + additional_embeddings``)::

    [text token encodings (L), CLIP text embedding, timestep embedding, noised image embedding,
     learned query ("prd" token)]

Every token attends causally (to itself and earlier tokens); padding text tokens (``text_mask``
False) are hidden from every query. The output at the last (query) token goes through
``norm_out`` and ``proj_to_clip_embeddings`` and is the predicted clean *normalised* image
embedding (x0 prediction). This matches diffusers' ``PriorTransformer`` (Karlo) numerically.

Image-embedding normalisation (``PriorConfig.embedding_norm``) maps CLIP image embeddings to the
space the diffusion runs in and back:

* ``"meanstd"`` (Karlo): ``(x - clip_mean) / clip_std`` per dimension. ``clip_mean`` / ``clip_std``
  are parameters of shape [1, D] in the ``params`` collection (so a diffusers checkpoint imports
  into one tree). They are *statistics, not weights*: ``__call__`` never reads them, every use goes
  through ``jax.lax.stop_gradient`` (their gradient is exactly zero), and the optimizer must skip
  them (weight decay would otherwise shrink them) -- use :func:`trainable_mask`. When training
  from scratch, set them from data with :func:`set_embedding_stats`. They are initialised to
  mean 0 / std 1 (identity).
* ``"scale"`` (the paper): the L2-normalised embedding times ``embedding_scale``,
  ``x / |x| * 17.2``.
* ``"l2"``: ``x / |x| * sqrt(D)``.
* ``"none"``: identity.

For ``"scale"`` and ``"l2"`` the inverse keeps the direction and restores the *raw* CLIP scale
(the decoder is trained on raw CLIP image embeddings, whose norm is far from 1): ``x / |x| *
clip_norm``, where ``clip_norm`` ([1, 1], a frozen statistic like clip_mean / clip_std, initialised
to 1) is the mean L2 norm of the training image embeddings, set from data with
:func:`set_embedding_stats` (``norm=``; the prior stage does it in ``post_init``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import layers

EMBEDDING_NORMS = ("meanstd", "scale", "l2", "none")
_STATS = ("clip_mean", "clip_std", "clip_norm")
_NORM_MODES = ("scale", "l2")  # modes whose inverse needs clip_norm


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Prior transformer hyper-parameters. Defaults are Karlo's (diffusers' PriorTransformer
    defaults: 32 heads x 64, 20 layers, CLIP ViT-L/14 width 768, 77 text tokens + 4)."""

    embedding_dim: int = 768            # CLIP embedding size (x_t, text token encodings)
    num_layers: int = 20
    num_heads: int = 32
    head_dim: int = 64
    width: int | None = None            # inner dim; None -> num_heads * head_dim (must equal it)
    num_text_tokens: int = 77           # text sequence length L (diffusers: num_embeddings)
    additional_embeddings: int = 4      # [text emb, time emb, noised image emb, (query)]
    time_embed_dim: int | None = None   # hidden size of the timestep MLP; None -> width
    time_embed_act_fn: str = "silu"     # "silu" | "swish" | "gelu" | "relu" | "mish"
    norm_in_type: str | None = None     # None | "layer"
    embedding_proj_norm_type: str | None = None  # None | "layer"
    encoder_hid_proj_type: str | None = "linear"  # "linear" | None (text_hidden already `width`)
    added_emb_type: str | None = "prd"  # "prd" (learned query token) | None
    embedding_proj_dim: int | None = None  # CLIP text embedding size; None -> embedding_dim
    clip_embed_dim: int | None = None   # output / image embedding size; None -> embedding_dim
    mlp_ratio: int = 4
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    # image-embedding normalisation (see module docstring)
    embedding_norm: str = "meanstd"
    embedding_scale: float = 17.2
    # x0 clamp range for the sampler (Karlo's prior scheduler: clip_sample_range=5.0); the
    # sampler applies it, the model only records it.
    clip_x0: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None   # None (XLA) | "cudnn" (flash attention on GPU)
    # training speed / memory: rematerialise each block in the backward pass (policy: see
    # layers.remat_policy), and run the blocks as one `nn.scan` over stacked params (one
    # compiled block instead of num_layers copies; params blocks/... get a leading layer axis,
    # see stack_block_params / unstack_block_params)
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False

    def __post_init__(self):
        inner = self.num_heads * self.head_dim
        if self.width is None:
            object.__setattr__(self, "width", inner)
        elif self.width != inner:
            raise ValueError(f"width={self.width} must equal num_heads*head_dim={inner}")
        if self.norm_in_type not in (None, "layer"):
            raise ValueError(f"unsupported norm_in_type {self.norm_in_type!r} (None or 'layer')")
        if self.embedding_proj_norm_type not in (None, "layer"):
            raise ValueError(f"unsupported embedding_proj_norm_type {self.embedding_proj_norm_type!r}"
                             " (None or 'layer')")
        if self.encoder_hid_proj_type not in (None, "linear"):
            raise ValueError(f"unsupported encoder_hid_proj_type {self.encoder_hid_proj_type!r}"
                             " (None or 'linear')")
        if self.added_emb_type not in (None, "prd"):
            raise ValueError(f"unsupported added_emb_type {self.added_emb_type!r} (None or 'prd')")
        want = 3 + (self.added_emb_type == "prd")
        if self.additional_embeddings != want:
            raise ValueError(f"additional_embeddings={self.additional_embeddings} but the sequence has"
                             f" {want} extra tokens with added_emb_type={self.added_emb_type!r}")
        if self.time_embed_act_fn.lower() not in _ACTS:
            raise ValueError(f"unsupported time_embed_act_fn {self.time_embed_act_fn!r}"
                             f" (one of {sorted(_ACTS)})")
        if self.embedding_norm not in EMBEDDING_NORMS:
            raise ValueError(f"embedding_norm must be one of {EMBEDDING_NORMS},"
                             f" got {self.embedding_norm!r}")
        layers.remat_policy(self.remat_policy)  # raise early on a bad policy name
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl must be None, 'xla' or 'cudnn', got {self.attention_impl!r}")

    @property
    def seq_len(self) -> int:
        return self.num_text_tokens + self.additional_embeddings

    @property
    def text_embed_dim(self) -> int:
        return self.embedding_proj_dim or self.embedding_dim

    @property
    def out_dim(self) -> int:
        return self.clip_embed_dim or self.embedding_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PriorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PriorConfig fields: {sorted(unknown)}")
        return cls(**dict(d))


_ACTS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


def _dt(name: str):
    return jnp.dtype(name)


class SelfAttention(nn.Module):
    """Multi-head self-attention of the priors' blocks (this one's and the AR prior's), returning
    (output, cache). Without a cache: causal over the sequence (``mask`` hides padding keys). With a cache (k, v) [B, T_max, heads, head_dim]: the new tokens' keys and
    values are written at ``index`` and the queries attend to the whole cache under ``mask``
    [B, 1, T_new, T_max] (which must hide the positions not yet written)."""

    config: PriorConfig

    @nn.compact
    def __call__(self, x, mask, cache, index, *, train: bool):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        b, t, _ = x.shape

        def proj(name):
            y = layers.Dense(c.width, kernel_axes=("embed", "heads"), dtype=dt, param_dtype=pdt,
                             name=name)(x)
            return layers.constrain(y.reshape(b, t, c.num_heads, c.head_dim),
                                    ("batch", "length", "heads", "kv"))

        q, k, v = proj("to_q"), proj("to_k"), proj("to_v")
        if cache is not None:
            ck, cv = cache
            start = (0, index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
            ck = layers.constrain(ck, ("batch", "length", "heads", "kv"))
            cv = layers.constrain(cv, ("batch", "length", "heads", "kv"))
            cache, k, v = (ck, cv), ck, cv
        o = layers.attention(q, k, v, mask=mask, is_causal=cache is None,
                             implementation=c.attention_impl)
        o = o.reshape(b, t, c.width)
        o = layers.Dense(c.width, kernel_axes=("heads", "embed"), dtype=dt, param_dtype=pdt,
                         name="to_out")(o)
        return nn.Dropout(c.dropout, deterministic=not train)(o), cache


class FeedForward(nn.Module):
    """The blocks' GELU MLP (width -> mlp_ratio x width -> width)."""

    config: PriorConfig

    @nn.compact
    def __call__(self, x, *, train: bool):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        h = layers.Dense(c.width * c.mlp_ratio, kernel_axes=("embed", "mlp"), dtype=dt,
                         param_dtype=pdt, name="proj_in")(x)
        h = nn.gelu(h, approximate=False)
        h = layers.constrain(h, ("batch", "length", "mlp"))
        h = nn.Dropout(c.dropout, deterministic=not train)(h)
        return layers.Dense(c.width, kernel_axes=("mlp", "embed"), dtype=dt, param_dtype=pdt,
                            name="proj_out")(h)


class PriorBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)); x + ff(LN(x))."""

    config: PriorConfig

    @nn.compact
    def __call__(self, x, mask, train: bool = False):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        h = layers.layer_norm("norm1", c.layer_norm_eps, dt, pdt)(x).astype(dt)
        x = x + SelfAttention(c, name="attn")(h, mask, None, None, train=train)[0]
        x = layers.constrain(x, ("batch", "length", "embed"))
        h = layers.layer_norm("norm2", c.layer_norm_eps, dt, pdt)(x).astype(dt)
        x = x + FeedForward(c, name="ff")(h, train=train)
        return layers.constrain(x, ("batch", "length", "embed"))


class _ScannedBlock(PriorBlock):
    """PriorBlock in `nn.scan`'s carry form: (x, mask) -> (x, None)."""

    train: bool = False

    @nn.compact
    def __call__(self, x, mask):
        return PriorBlock.__call__(self, x, mask, self.train), None


def _blocks(c: PriorConfig, train: bool, name: str = "blocks"):
    """The transformer trunk: a list of blocks, or one scanned block over stacked params."""
    if not c.scan_layers:
        cls = layers.maybe_remat(PriorBlock, c.remat, c.remat_policy, static_argnums=(3,))
        return [cls(c, name=f"{name}_{i}") for i in range(c.num_layers)]
    cls = layers.maybe_remat(_ScannedBlock, c.remat, c.remat_policy)
    return nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,), length=c.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})(c, train=train, name=name)


def stack_block_params(params, num_layers: int):
    """Unscanned params (blocks_0 ... blocks_{n-1}) -> scanned params (blocks, leading axis n)."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    per = [params[f"blocks_{i}"] for i in range(num_layers)]
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per)
    return out


def unstack_block_params(params):
    """Scanned params (blocks [n, ...]) -> unscanned params (blocks_0 ... blocks_{n-1})."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    n = jax.tree.leaves(params["blocks"])[0].shape[0]
    for i in range(n):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    return out


class _TimeMLP(nn.Module):
    config: PriorConfig

    @nn.compact
    def __call__(self, emb):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        h = layers.Dense(c.time_embed_dim or c.width, kernel_axes=("embed", "mlp"), dtype=dt,
                         param_dtype=pdt, name="linear_1")(emb.astype(dt))
        h = _ACTS[c.time_embed_act_fn.lower()](h)
        return layers.Dense(c.width, kernel_axes=("mlp", "embed"), dtype=dt, param_dtype=pdt,
                            name="linear_2")(h)


class PriorTransformer(nn.Module):
    """unCLIP diffusion prior (x0 prediction). See the module docstring for the sequence layout.

    Param tree (``params`` collection; ``dense`` is the inner nn.Dense of ``layers.Dense``)::

        time_embedding/{linear_1,linear_2}/dense/{kernel,bias}
        proj_in/dense/...                    noised image embedding -> width
        embedding_proj_norm/{scale,bias}     (embedding_proj_norm_type="layer" only)
        embedding_proj/dense/...             CLIP text embedding -> width
        encoder_hidden_states_proj/dense/... (encoder_hid_proj_type="linear" only)
        positional_embedding                 [seq_len, width]
        prd_embedding                        [width] (added_emb_type="prd" only)
        norm_in/{scale,bias}                 (norm_in_type="layer" only)
        blocks_{i}/norm1, attn/{to_q,to_k,to_v,to_out}/dense/..., norm2, ff/{proj_in,proj_out}/dense/...
        norm_out/{scale,bias}
        proj_to_clip_embeddings/dense/...
        clip_mean, clip_std                  [1, out_dim] (embedding_norm="meanstd" only; frozen)
        clip_norm                            [1, 1] (embedding_norm="scale" / "l2" only; frozen)
    """

    config: PriorConfig

    def setup(self):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        self.time_embedding = _TimeMLP(c)
        self.proj_in = layers.Dense(c.width, kernel_axes=(None, "embed"), dtype=dt, param_dtype=pdt)
        if c.embedding_proj_norm_type == "layer":
            self.embedding_proj_norm = layers.layer_norm(None, c.layer_norm_eps, dt, pdt)
        self.embedding_proj = layers.Dense(c.width, kernel_axes=(None, "embed"), dtype=dt,
                                           param_dtype=pdt)
        if c.encoder_hid_proj_type == "linear":
            self.encoder_hidden_states_proj = layers.Dense(
                c.width, kernel_axes=(None, "embed"), dtype=dt, param_dtype=pdt)
        init = nn.initializers.normal(0.02)
        self.positional_embedding = self.param(
            "positional_embedding", nn.with_logical_partitioning(init, (None, "embed")),
            (c.seq_len, c.width), pdt)
        if c.added_emb_type == "prd":
            self.prd_embedding = self.param(
                "prd_embedding", nn.with_logical_partitioning(init, ("embed",)), (c.width,), pdt)
        if c.norm_in_type == "layer":
            self.norm_in = layers.layer_norm(None, c.layer_norm_eps, dt, pdt)
        self.norm_out = layers.layer_norm(None, c.layer_norm_eps, dt, pdt)
        self.proj_to_clip_embeddings = layers.Dense(c.out_dim, kernel_axes=("embed", None),
                                                    dtype=dt, param_dtype=pdt)
        if c.embedding_norm == "meanstd":
            self.clip_mean = self.param(
                "clip_mean", nn.with_logical_partitioning(nn.initializers.zeros, (None, None)),
                (1, c.out_dim), pdt)
            self.clip_std = self.param(
                "clip_std", nn.with_logical_partitioning(nn.initializers.ones, (None, None)),
                (1, c.out_dim), pdt)
        elif c.embedding_norm in _NORM_MODES:
            self.clip_norm = self.param(
                "clip_norm", nn.with_logical_partitioning(nn.initializers.ones, (None, None)),
                (1, 1), pdt)

    def __call__(self, x_t, t, text_embed, text_hidden, text_mask=None, *, train: bool = False):
        """x_t [B, D] noised normalised image embedding, t [B] (or scalar) timesteps,
        text_embed [B, D_text] CLIP text embedding, text_hidden [B, L, D] CLIP text token
        encodings, text_mask [B, L] bool (True = real token; None = all real).
        Returns the predicted clean normalised image embedding [B, out_dim] (float32)."""
        c = self.config
        dt = _dt(c.dtype)
        b = x_t.shape[0]
        if text_hidden.ndim != 3 or text_hidden.shape[1] != c.num_text_tokens:
            raise ValueError(f"text_hidden must be [B, {c.num_text_tokens}, D], got {text_hidden.shape}")

        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        temb = layers.timestep_embedding(t, c.width, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        temb = self.time_embedding(temb)

        text_embed = text_embed.astype(dt)
        if c.embedding_proj_norm_type == "layer":
            text_embed = self.embedding_proj_norm(text_embed).astype(dt)
        pemb = self.embedding_proj(text_embed)
        hid = text_hidden.astype(dt)
        if c.encoder_hid_proj_type == "linear":
            hid = self.encoder_hidden_states_proj(hid)
        xemb = self.proj_in(x_t.astype(dt))

        tokens = [hid, pemb[:, None], temb[:, None], xemb[:, None]]
        if c.added_emb_type == "prd":
            tokens.append(jnp.broadcast_to(self.prd_embedding.astype(dt), (b, 1, c.width)))
        h = jnp.concatenate(tokens, axis=1) + self.positional_embedding.astype(dt)[None]
        h = layers.constrain(h, ("batch", "length", "embed"))

        if text_mask is None:
            mask = None
        else:
            keep = jnp.concatenate(
                [text_mask.astype(bool), jnp.ones((b, c.additional_embeddings), bool)], axis=1)
            mask = keep[:, None, None, :]  # [B, 1, 1, S]: padding keys hidden from every query

        if c.norm_in_type == "layer":
            h = self.norm_in(h).astype(dt)
        h = self._trunk(h, mask, train)
        h = self.norm_out(h[:, -1]).astype(dt)  # the query (or, without prd, the image) token
        return self.proj_to_clip_embeddings(h).astype(jnp.float32)

    @nn.compact
    def _trunk(self, h, mask, train):
        blocks = _blocks(self.config, train)
        if self.config.scan_layers:
            return blocks(h, mask)[0]
        for block in blocks:
            h = block(h, mask, train)
        return h

    # -- image-embedding normalisation (use with model.apply(variables, x, method=...)) --
    def normalize(self, x):
        """CLIP image embedding -> the diffusion space."""
        return normalize_embedding(x, self.config, self._stats())

    def denormalize(self, x):
        """Diffusion space -> CLIP image embedding (diffusers' post_process_latents for meanstd)."""
        return denormalize_embedding(x, self.config, self._stats())

    def _stats(self):
        if self.config.embedding_norm in _NORM_MODES:
            return {"clip_norm": self.clip_norm}
        if self.config.embedding_norm != "meanstd":
            return None
        return {"clip_mean": self.clip_mean, "clip_std": self.clip_std}


def _get_stats(config: PriorConfig, params):
    if params is None:
        raise ValueError("embedding_norm='meanstd' needs the params holding clip_mean/clip_std")
    if "params" in params and "clip_mean" not in params:
        params = params["params"]
    mean = jax.lax.stop_gradient(jnp.asarray(params["clip_mean"], jnp.float32))
    std = jax.lax.stop_gradient(jnp.asarray(params["clip_std"], jnp.float32))
    return mean, std


def _get_norm(config: PriorConfig, params):
    if params is None:
        raise ValueError(f"embedding_norm={config.embedding_norm!r} needs the params holding "
                         "clip_norm (the mean norm of the training image embeddings)")
    if "params" in params and "clip_norm" not in params:
        params = params["params"]
    return jax.lax.stop_gradient(jnp.asarray(params["clip_norm"], jnp.float32))


def normalize_embedding(x, config: PriorConfig, params=None):
    """CLIP image embedding [..., D] -> normalised embedding (float32). ``params`` (the prior's
    params, or {'params': ...}) is needed for 'meanstd' only. 'scale' and 'l2' scale the unit
    vector x / |x| (by embedding_scale, resp. sqrt(D))."""
    x = jnp.asarray(x, jnp.float32)
    mode = config.embedding_norm
    if mode == "meanstd":
        mean, std = _get_stats(config, params)
        return (x - mean) / std
    if mode in _NORM_MODES:
        n = jnp.linalg.norm(x, axis=-1, keepdims=True)
        scale = config.embedding_scale if mode == "scale" else np.sqrt(x.shape[-1])
        return x / jnp.maximum(n, 1e-12) * scale
    return x


def denormalize_embedding(x, config: PriorConfig, params=None):
    """Inverse of :func:`normalize_embedding` ('meanstd': x * clip_std + clip_mean, as diffusers'
    ``post_process_latents``; 'scale' / 'l2': the direction x / |x| at the raw CLIP scale, times
    the recorded mean norm clip_norm -- ``params`` needed)."""
    x = jnp.asarray(x, jnp.float32)
    mode = config.embedding_norm
    if mode == "meanstd":
        mean, std = _get_stats(config, params)
        return x * std + mean
    if mode in _NORM_MODES:
        norm = _get_norm(config, params)
        n = jnp.linalg.norm(x, axis=-1, keepdims=True)
        return x / jnp.maximum(n, 1e-12) * norm
    return x


def trainable_mask(params):
    """Pytree of bools, False for the frozen statistics (clip_mean, clip_std, clip_norm): pass it to
    ``optax.masked`` / ``optax.multi_transform`` so the optimizer (and weight decay) skips them."""
    def walk(tree):
        return {k: (walk(v) if isinstance(v, Mapping) else k not in _STATS) for k, v in tree.items()}
    return walk(params)


def set_embedding_stats(params, mean=None, std=None, *, norm=None):
    """Return params with the embedding statistics set from data: clip_mean/clip_std (arrays of
    shape [D]; embedding_norm='meanstd') or clip_norm (``norm``: the mean L2 norm of the image
    embeddings, a positive scalar; 'scale' / 'l2')."""
    out = dict(params)
    if mean is not None or std is not None:
        if "clip_mean" not in params:
            raise ValueError("these params have no clip_mean/clip_std "
                             "(embedding_norm != 'meanstd')")
        dtype = jnp.asarray(_unbox(params["clip_mean"])).dtype
        out["clip_mean"] = jnp.asarray(mean, dtype).reshape(1, -1)
        out["clip_std"] = jnp.asarray(std, dtype).reshape(1, -1)
    if norm is not None:
        if "clip_norm" not in params:
            raise ValueError("these params have no clip_norm (embedding_norm not 'scale' / 'l2')")
        if not (np.ndim(norm) == 0 and np.isfinite(norm) and norm > 0):
            raise ValueError(f"norm must be a positive finite scalar, got {norm!r}")
        dtype = jnp.asarray(_unbox(params["clip_norm"])).dtype
        out["clip_norm"] = jnp.asarray(norm, dtype).reshape(1, 1)
    for k in _STATS:
        if k in params and np.shape(_unbox(out[k])) != np.shape(_unbox(params[k])):
            raise ValueError(f"{k}: shape {np.shape(_unbox(out[k]))} != "
                             f"{np.shape(_unbox(params[k]))}")
    return out


def _unbox(x):
    return x.unbox() if hasattr(x, "unbox") else x


def init_params(config: PriorConfig, rng=None, batch_size: int = 1):
    """Initialise (unboxed) params; ``rng=None`` gives an abstract (eval_shape) tree."""
    model = PriorTransformer(config)
    b, L, D = batch_size, config.num_text_tokens, config.embedding_dim
    hid_dim = D if config.encoder_hid_proj_type == "linear" else config.width
    args = (jnp.zeros((b, D)), jnp.zeros((b,), jnp.int32), jnp.zeros((b, config.text_embed_dim)),
            jnp.zeros((b, L, hid_dim)), jnp.ones((b, L), bool))
    if rng is None:
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    else:
        variables = model.init(rng, *args)
    return nn.meta.unbox(variables)["params"]


def denoiser(config: PriorConfig):
    """The prior as the sampler's and the loss's model function:
    ``fn(params, x_t [B, D], t [B], cond, *, train=False, rng=None)`` with ``cond`` =
    dict(text_embed [B, E], text_hidden [B, L, H], text_mask [B, L] bool); ``rng`` drives dropout."""
    model = PriorTransformer(config)

    def fn(params, x_t, t, cond, *, train: bool = False, rng=None):
        return model.apply({"params": params}, x_t, t, cond["text_embed"], cond["text_hidden"],
                           cond["text_mask"], train=train,
                           rngs=None if rng is None else {"dropout": rng})
    return fn
