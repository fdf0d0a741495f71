"""unCLIP's autoregressive (AR) prior (paper section 2.2): a decoder-only causal transformer that
predicts a CLIP image embedding as a sequence of discrete codes.

The image embedding is first turned into K codes by :mod:`unclip_jax.models.ar_codes` (PCA to
the leading K principal components -- the paper keeps 319 of 1,024 -- each quantised into 1,024
buckets). The transformer reads the conditioning as a prefix and predicts the codes one at a
time. Sequence (length ``seq_len = L + K + 1``)::

    position 0 .. L-1    proj(text_hidden)            CLIP text token encodings (L tokens)
    position L           proj(text_embed)             CLIP text embedding
    position L+1         dot_embedding[dot]           quantised cos(z_image, z_text)
    position L+2 .. L+K  code_embedding[codes[0..K-2]]

plus a learned positional embedding. Every query attends causally; padding text tokens
(``text_mask`` False) are hidden from every query. The output at position ``L+1+k`` (the dot
token's output for k = 0) goes through a final LayerNorm and the ``head`` (Dense to
``num_buckets``) and gives the logits of code k.

What lives here:

* :class:`ARPriorConfig` -- hyper-parameters (to_dict / from_dict).
* :class:`ARPrior` -- the model: ``__call__`` (teacher-forced logits [B, K, num_buckets], for
  training), ``prefill`` and ``decode`` (the KV-cached inference passes).
* :func:`init_params`, :func:`abstract_boxed_params` (the boxed eval_shape tree, for shardings),
  :func:`stack_block_params` / :func:`unstack_block_params` (unscanned <-> scanned layouts).
* :func:`loss_fn` -- per-example cross-entropy and token accuracy; :func:`logits_fn` -- the
  jitted teacher-forced forward.
* :func:`sample` -- the KV-cache sampler (one prefix pass, then one ``lax.scan`` over the
  remaining K-1 codes; jit-compiled once per config and guidance on / off) with classifier-free
  guidance, temperature and top-k; :func:`sample_reference` -- the same sampling without a
  cache (recomputes the whole sequence per token; the tests' reference).
* :func:`check_codebook` -- a codebook matches a config; :func:`check_sampling` -- sampling
  settings are valid.

Classifier-free guidance needs a model trained with the text conditioning dropped some of the
time (the paper: 10%); that is the training data's business (an "unconditional" caption), not
this module's. The unconditional rows get the same dot token as the conditional ones.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax.models import layers
from unclip_jax.models.prior import (FeedForward, SelfAttention, stack_block_params,
                                     unstack_block_params)

__all__ = ["ARPriorConfig", "ARPrior", "ARBlock", "init_params", "abstract_boxed_params",
           "stack_block_params", "unstack_block_params", "loss_fn", "logits_fn", "sample",
           "sample_reference", "check_sampling", "init_cache", "check_codebook"]


@dataclasses.dataclass(frozen=True)
class ARPriorConfig:
    """AR prior hyper-parameters. ``width = num_heads * head_dim``. The paper's AR prior:
    319 components x 1,024 buckets, CLIP ViT-H/16 (1,024-wide embeddings); a ViT-L/14 setup
    has ``embedding_dim = text_width = 768`` and 77 text tokens."""

    num_components: int                 # K image codes per embedding
    num_buckets: int = 1024             # vocabulary of each code
    num_dot_buckets: int = 1024         # vocabulary of the dot-product token
    embedding_dim: int = 768            # CLIP text embedding size E
    text_width: int = 768               # width of CLIP's text hidden states D
    num_text_tokens: int = 77           # L
    num_layers: int = 24
    num_heads: int = 16
    head_dim: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"              # compute dtype (the logits are always float32)
    param_dtype: str = "float32"
    attention_impl: str | None = None   # None (per platform) | "xla" | "cudnn"
    # rematerialise each block in the backward pass; run the blocks as one nn.scan over stacked
    # params (blocks/... with a leading 'layers' axis; see stack_block_params)
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("num_components", "num_buckets", "num_dot_buckets", "embedding_dim",
                     "text_width", "num_text_tokens", "num_layers", "num_heads", "head_dim",
                     "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"ARPriorConfig.{name} must be a positive integer, got {v!r}")
        if self.num_buckets < 2 or self.num_dot_buckets < 2:
            raise ValueError("ARPriorConfig.num_buckets and num_dot_buckets must be >= 2, got "
                             f"{self.num_buckets} and {self.num_dot_buckets}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"ARPriorConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (float(self.layer_norm_eps) > 0):
            raise ValueError("ARPriorConfig.layer_norm_eps must be > 0, got "
                             f"{self.layer_norm_eps!r}")
        for name in ("dtype", "param_dtype"):
            try:
                dt = jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"ARPriorConfig.{name}: unknown dtype "
                                 f"{getattr(self, name)!r}") from e
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"ARPriorConfig.{name} must be a float dtype, got {dt}")
        layers.remat_policy(self.remat_policy)  # raise early on a bad policy name
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError("attention_impl must be None, 'xla' or 'cudnn', got "
                             f"{self.attention_impl!r}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def prefix_len(self) -> int:
        """Text tokens + text embedding + dot token: L + 2."""
        return self.num_text_tokens + 2

    @property
    def seq_len(self) -> int:
        """L + 2 prefix tokens + K - 1 code tokens = L + K + 1."""
        return self.num_text_tokens + self.num_components + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ARPriorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ARPriorConfig fields: {sorted(unknown)}")
        return cls(**dict(d))


def check_codebook(config: ARPriorConfig, codebook) -> None:
    """ValueError unless ``codebook`` (ar_codes.Codebook) has this config's sizes."""
    pairs = (("num_components", codebook.num_components, config.num_components),
             ("num_buckets", codebook.num_buckets, config.num_buckets),
             ("num_dot_buckets", codebook.num_dot_buckets, config.num_dot_buckets),
             ("embedding width", codebook.embed_dim, config.embedding_dim))
    bad = [f"{n}: codebook {a} != config {b}" for n, a, b in pairs if a != b]
    if bad:
        raise ValueError("codebook does not match the AR prior config (" + "; ".join(bad) + ")")


def _dt(name: str):
    return jnp.dtype(name)


# ---------------------------------------------------------------------------------------------
# blocks


class ARBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)); x + ff(LN(x)). Returns (x, cache)."""

    config: ARPriorConfig

    @nn.compact
    def __call__(self, x, mask, cache=None, index=None, train: bool = False):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        h = layers.layer_norm("norm1", c.layer_norm_eps, dt, pdt)(x).astype(dt)
        a, cache = SelfAttention(c, name="attn")(h, mask, cache, index, train=train)
        x = layers.constrain(x + a, ("batch", "length", "embed"))
        h = layers.layer_norm("norm2", c.layer_norm_eps, dt, pdt)(x).astype(dt)
        x = x + FeedForward(c, name="ff")(h, train=train)
        return layers.constrain(x, ("batch", "length", "embed")), cache


class _ScannedBlock(ARBlock):
    """ARBlock in `nn.scan`'s form: carry x, broadcast (mask, index), per-layer cache."""

    train: bool = False

    @nn.compact
    def __call__(self, x, mask, cache, index):
        return ARBlock.__call__(self, x, mask, cache, index, self.train)


def _blocks(c: ARPriorConfig, train: bool, name: str = "blocks"):
    """The trunk: a list of blocks (blocks_0 ...), or one scanned block over stacked params."""
    if not c.scan_layers:
        cls = layers.maybe_remat(ARBlock, c.remat, c.remat_policy, static_argnums=(5,))
        return [cls(c, name=f"{name}_{i}") for i in range(c.num_layers)]
    cls = layers.maybe_remat(_ScannedBlock, c.remat, c.remat_policy)
    return nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast, 0, nn.broadcast), length=c.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})(c, train=train, name=name)


def init_cache(config: ARPriorConfig, batch_size: int):
    """An empty KV cache: per layer (k, v) [B, seq_len, heads, head_dim] in the compute dtype --
    a tuple of num_layers pairs, or (scan_layers) one pair with a leading layer axis (the scanned
    trunk reads it as per-layer scan inputs and returns the updated stack as scan outputs, so XLA
    may copy it once per decoded token; the unscanned trunk updates each layer's cache in
    place)."""
    shape = (batch_size, config.seq_len, config.num_heads, config.head_dim)
    dt = _dt(config.dtype)
    if config.scan_layers:
        z = jnp.zeros((config.num_layers,) + shape, dt)
        return (z, z)
    return tuple((jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(config.num_layers))


# ---------------------------------------------------------------------------------------------
# the model


class ARPrior(nn.Module):
    """The AR prior (see the module docstring for the sequence layout).

    Param tree (``dense`` is the inner nn.Dense of ``layers.Dense``)::

        text_hidden_proj/dense/{kernel,bias}   CLIP text token encodings D -> width
        text_embed_proj/dense/...              CLIP text embedding E -> width
        dot_embedding                          [num_dot_buckets, width]  ('vocab', 'embed')
        code_embedding                         [num_buckets, width]      ('vocab', 'embed')
        positional_embedding                   [seq_len, width]
        blocks_{i}/norm1, attn/{to_q,to_k,to_v,to_out}/dense/..., norm2,
                   ff/{proj_in,proj_out}/dense/...
          (scan_layers: blocks/... with a leading layer axis)
        norm_out/{scale,bias}
        head/dense/...                         width -> num_buckets      ('embed', 'vocab')
    """

    config: ARPriorConfig

    def setup(self):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        self.text_hidden_proj = layers.Dense(c.width, kernel_axes=(None, "embed"), dtype=dt,
                                             param_dtype=pdt)
        self.text_embed_proj = layers.Dense(c.width, kernel_axes=(None, "embed"), dtype=dt,
                                            param_dtype=pdt)
        init = nn.initializers.normal(0.02)
        self.dot_embedding = self.param(
            "dot_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
            (c.num_dot_buckets, c.width), pdt)
        self.code_embedding = self.param(
            "code_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
            (c.num_buckets, c.width), pdt)
        self.positional_embedding = self.param(
            "positional_embedding", nn.with_logical_partitioning(init, (None, "embed")),
            (c.seq_len, c.width), pdt)
        self.norm_out = layers.layer_norm(None, c.layer_norm_eps, dt, pdt)
        self.head = layers.Dense(c.num_buckets, kernel_axes=("embed", "vocab"), dtype=dt,
                                 param_dtype=pdt)

    # -- pieces
    def _check(self, dot, text_embed, text_hidden, text_mask):
        c = self.config
        b = text_embed.shape[0] if text_embed.ndim == 2 else None
        if text_embed.ndim != 2 or text_embed.shape[1] != c.embedding_dim:
            raise ValueError(f"text_embed must be [B, {c.embedding_dim}], got {text_embed.shape}")
        want = (b, c.num_text_tokens, c.text_width)
        if tuple(text_hidden.shape) != want:
            raise ValueError(f"text_hidden must be [B, L, D] = {list(want)}, "
                             f"got {text_hidden.shape}")
        if text_mask is not None and tuple(text_mask.shape) != (b, c.num_text_tokens):
            raise ValueError(f"text_mask must be [B, L] = {[b, c.num_text_tokens]}, "
                             f"got {text_mask.shape}")
        if tuple(dot.shape) != (b,):
            raise ValueError(f"dot must be [B] = [{b}] dot-bucket indices, got shape {dot.shape}")

    def _prefix(self, dot, text_embed, text_hidden):
        """The L + 2 prefix tokens (positional embedding added): [B, L + 2, width]."""
        c = self.config
        dt = _dt(c.dtype)
        hid = self.text_hidden_proj(text_hidden.astype(dt))
        emb = self.text_embed_proj(text_embed.astype(dt))[:, None]
        dot_tok = jnp.take(self.dot_embedding, dot.astype(jnp.int32), axis=0).astype(dt)[:, None]
        h = jnp.concatenate([hid, emb, dot_tok], axis=1)
        return h + self.positional_embedding[:c.prefix_len].astype(dt)[None]

    def _key_keep(self, text_mask, b):
        """[B, seq_len] bool: False at padding text tokens."""
        c = self.config
        if text_mask is None:
            return jnp.ones((b, c.seq_len), bool)
        return jnp.concatenate(
            [text_mask.astype(bool), jnp.ones((b, c.seq_len - c.num_text_tokens), bool)], axis=1)

    def _logits(self, h):
        h = self.norm_out(h).astype(_dt(self.config.dtype))
        return self.head(h).astype(jnp.float32)

    @nn.compact
    def _trunk(self, h, mask, cache, index, train):
        blocks = _blocks(self.config, train)
        if self.config.scan_layers:
            return blocks(h, mask, cache, index)
        new = []
        for i, block in enumerate(blocks):
            h, ci = block(h, mask, None if cache is None else cache[i], index, train)
            new.append(ci)
        return h, (None if cache is None else tuple(new))

    # -- passes
    def __call__(self, codes, dot, text_embed, text_hidden, text_mask=None, *, train: bool = False):
        """Teacher-forced logits. codes [B, K] int (targets; codes[:, :K-1] are fed), dot [B]
        int dot buckets, text_embed [B, E], text_hidden [B, L, D], text_mask [B, L] bool (True =
        real token; None = all real). Returns logits [B, K, num_buckets] (float32); logits[:, k]
        depend on codes[:, :k] only."""
        c = self.config
        dt = _dt(c.dtype)
        self._check(dot, text_embed, text_hidden, text_mask)
        b = text_embed.shape[0]
        if tuple(codes.shape) != (b, c.num_components):
            raise ValueError(f"codes must be [B, K] = {[b, c.num_components]}, got {codes.shape}")
        tok = jnp.take(self.code_embedding, codes[:, :-1].astype(jnp.int32), axis=0).astype(dt)
        tok = tok + self.positional_embedding[c.prefix_len:].astype(dt)[None]
        h = jnp.concatenate([self._prefix(dot, text_embed, text_hidden), tok], axis=1)
        h = layers.constrain(h, ("batch", "length", "embed"))
        mask = self._key_keep(text_mask, b)[:, None, None, :]  # causal is added by attention
        h, _ = self._trunk(h, mask, None, None, train)
        return self._logits(h[:, c.prefix_len - 1:])

    def prefill(self, dot, text_embed, text_hidden, text_mask=None):
        """Inference pass over the L + 2 prefix tokens: fills an empty KV cache (positions
        0 .. L+1) and returns (code 0's logits [B, num_buckets] float32, cache)."""
        c = self.config
        self._check(dot, text_embed, text_hidden, text_mask)
        b = text_embed.shape[0]
        h = layers.constrain(self._prefix(dot, text_embed, text_hidden),
                             ("batch", "length", "embed"))
        causal = jnp.arange(c.seq_len)[None, :] <= jnp.arange(c.prefix_len)[:, None]  # [P, T]
        mask = causal[None, None] & self._key_keep(text_mask, b)[:, None, None, :]
        h, cache = self._trunk(h, mask, init_cache(c, b), 0, False)
        return self._logits(h[:, -1]), cache

    def decode(self, code, position, cache, text_mask=None):
        """One inference step: the code ``code`` [B] sits at sequence ``position`` (a traced int
        in [L+2, seq_len)); writes its keys / values into ``cache`` and returns (the next code's
        logits [B, num_buckets] float32, cache)."""
        c = self.config
        dt = _dt(c.dtype)
        b = code.shape[0]
        pos = jax.lax.dynamic_slice_in_dim(self.positional_embedding, position, 1, axis=0)
        h = jnp.take(self.code_embedding, code.astype(jnp.int32), axis=0).astype(dt)[:, None]
        h = layers.constrain(h + pos.astype(dt)[None], ("batch", "length", "embed"))
        written = jnp.arange(c.seq_len) <= position  # [T]
        mask = written[None, None, None, :] & self._key_keep(text_mask, b)[:, None, None, :]
        h, cache = self._trunk(h, mask, cache, position, False)
        return self._logits(h[:, 0]), cache


def _dummy_inputs(config: ARPriorConfig, b: int):
    c = config
    return (jnp.zeros((b, c.num_components), jnp.int32), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b, c.embedding_dim), jnp.float32),
            jnp.zeros((b, c.num_text_tokens, c.text_width), jnp.float32),
            jnp.ones((b, c.num_text_tokens), bool))


def abstract_boxed_params(config: ARPriorConfig, batch_size: int = 1):
    """The boxed (nn.Partitioned, logical names) abstract params: jax.eval_shape of init. Feed it
    to ``train.sharding.logical_shardings``; nothing is allocated."""
    model = ARPrior(config)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                               *_dummy_inputs(config, batch_size))
    return variables["params"]


def init_params(config: ARPriorConfig, rng=None, batch_size: int = 1):
    """Initialise (unboxed) params; ``rng=None`` gives an abstract (eval_shape) tree."""
    if rng is None:
        return nn.meta.unbox(abstract_boxed_params(config, batch_size))
    model = ARPrior(config)
    init = jax.jit(lambda r: nn.meta.unbox(model.init(r, *_dummy_inputs(config, batch_size))))
    return init(rng)["params"]


def loss_fn(logits, codes):
    """logits [B, K, V], target codes [B, K] -> (per-example mean cross-entropy [B], per-example
    token accuracy [B]) in float32."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes.astype(jnp.int32))
    acc = (jnp.argmax(logits, axis=-1) == codes).astype(jnp.float32)
    return ce.mean(axis=-1), acc.mean(axis=-1)


# ---------------------------------------------------------------------------------------------
# sampling


def _unwrap(params):
    if isinstance(params, Mapping) and "params" in params and "code_embedding" not in params:
        return params["params"]
    return params


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def check_sampling(temperature, top_k, num_buckets: int, guidance_scale=1.0) -> None:
    """ValueError (one line) unless temperature is a finite number > 0, top_k is None (all) or
    an integer in [1, num_buckets], and guidance_scale is a finite number >= 1."""
    if not _is_real(temperature) or not math.isfinite(float(temperature)) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= num_buckets):
        raise ValueError(f"top_k must be None (all) or an integer in [1, {num_buckets}] "
                         f"(num_buckets), got {top_k!r}")
    if not _is_real(guidance_scale) or not math.isfinite(float(guidance_scale)) \
            or guidance_scale < 1:
        raise ValueError(f"guidance_scale must be a finite number >= 1, got {guidance_scale!r}")


def _check_request(config: ARPriorConfig, cond, uncond, dot, temperature, top_k, guidance_scale):
    """Validate a sampling request; returns (cond, uncond or None, dot [B] int32, guided)."""
    c = config
    check_sampling(temperature, top_k, c.num_buckets, guidance_scale)

    def norm(d, what):
        if not isinstance(d, Mapping) or "text_embed" not in d or "text_hidden" not in d:
            raise ValueError(f"{what} must be a dict with text_embed, text_hidden (and text_mask)")
        te, th = jnp.asarray(d["text_embed"]), jnp.asarray(d["text_hidden"])
        if te.ndim != 2 or te.shape[1] != c.embedding_dim:
            raise ValueError(f"{what}['text_embed'] must be [B, {c.embedding_dim}], got {te.shape}")
        b = te.shape[0]
        if tuple(th.shape) != (b, c.num_text_tokens, c.text_width):
            raise ValueError(f"{what}['text_hidden'] must be [B, L, D] = "
                             f"{[b, c.num_text_tokens, c.text_width]}, got {th.shape}")
        tm = d.get("text_mask")
        tm = jnp.ones((b, c.num_text_tokens), bool) if tm is None else jnp.asarray(tm, bool)
        if tuple(tm.shape) != (b, c.num_text_tokens):
            raise ValueError(f"{what}['text_mask'] must be [B, L] = {[b, c.num_text_tokens]}, "
                             f"got {tm.shape}")
        return {"text_embed": te, "text_hidden": th, "text_mask": tm}

    cond = norm(cond, "cond")
    b = cond["text_embed"].shape[0]
    guided = uncond is not None and float(guidance_scale) != 1.0
    if guided:
        uncond = norm(uncond, "uncond")
        if uncond["text_embed"].shape[0] != b:
            raise ValueError(f"uncond has batch {uncond['text_embed'].shape[0]}, cond has {b}")
    else:
        uncond = None
    dot_arr = jnp.asarray(dot)
    if dot_arr.ndim == 0:
        dot_arr = jnp.broadcast_to(dot_arr, (b,))
    if tuple(dot_arr.shape) != (b,):
        raise ValueError(f"dot must be a scalar or [B] = [{b}] dot-bucket indices, got shape "
                         f"{tuple(np.shape(dot))}")
    if not jnp.issubdtype(dot_arr.dtype, jnp.integer):
        raise ValueError(f"dot must hold integer dot-bucket indices, got dtype {dot_arr.dtype}")
    try:
        lo, hi = int(dot_arr.min()), int(dot_arr.max())
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        # traced (sample called under jit): unchecked
        lo, hi = 0, 0
    if lo < 0 or hi >= c.num_dot_buckets:
        raise ValueError(f"dot buckets must lie in [0, {c.num_dot_buckets}), got [{lo}, {hi}]")
    return cond, uncond, dot_arr.astype(jnp.int32), guided


def _batch(cond, uncond, dot):
    """[cond; uncond] as one batch (or cond alone)."""
    if uncond is None:
        return cond, dot
    both = {k: jnp.concatenate([cond[k], uncond[k]], axis=0) for k in cond}
    return both, jnp.concatenate([dot, dot], axis=0)


def _pick(logits, k, rng, temperature, scale, top_k, *, batch: int, guided: bool):
    """The next code from the (possibly [cond; uncond]) logits [rows, V]: guidance, temperature,
    top-k (a traced int in [1, V]; V keeps all), then a categorical draw with key
    fold_in(rng, k). Returns [batch] int32."""
    logits = logits.astype(jnp.float32)
    if guided:
        lc, lu = logits[:batch], logits[batch:]
        logits = lu + scale * (lc - lu)
    logits = logits / temperature
    v = logits.shape[-1]
    # the k-th largest logit per row (top_k traced: one program for every k)
    kth = jax.lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), v - top_k, axis=-1)
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(jax.random.fold_in(rng, k), logits, axis=-1).astype(jnp.int32)


def _rows(code, guided):
    return jnp.concatenate([code, code], axis=0) if guided else code


@functools.lru_cache(maxsize=64)
def _cached_sampler(config: ARPriorConfig, guided: bool):
    """The jitted KV-cache sampler for one (config, guided): built once, reused (temperature,
    guidance scale and top-k are traced arguments). Returns (codes [B, K], the conditional
    rows' raw logits [B, K, V])."""
    model = ARPrior(config)
    c = config

    def run(params, cond, uncond, dot, rng, temperature, scale, top_k):
        b = dot.shape[0]
        rows, dots = _batch(cond, uncond, dot)
        pick = functools.partial(_pick, rng=rng, temperature=temperature, scale=scale,
                                 top_k=top_k, batch=b, guided=guided)
        variables = {"params": params}
        logits, cache = model.apply(variables, dots, rows["text_embed"], rows["text_hidden"],
                                    rows["text_mask"], method=ARPrior.prefill)
        first = pick(logits, 0)

        def step(carry, k):
            prev, cache = carry
            # code k-1 sits at position L + 2 + (k - 1); its output predicts code k
            logits, cache = model.apply(variables, _rows(prev, guided), c.prefix_len + k - 1,
                                        cache, rows["text_mask"], method=ARPrior.decode)
            code = pick(logits, k)
            return (code, cache), (code, logits[:b])

        _, (rest, rest_logits) = jax.lax.scan(step, (first, cache), jnp.arange(1, c.num_components))
        codes = jnp.concatenate([first[:, None], rest.T], axis=1)
        all_logits = jnp.concatenate([logits[:b, None], rest_logits.transpose(1, 0, 2)], axis=1)
        return codes, all_logits

    return jax.jit(run)


def sample(config: ARPriorConfig, params, cond, uncond=None, *, dot, rng, temperature=1.0,
           top_k=None, guidance_scale=1.0, return_logits: bool = False):
    """Sample codes [B, K] int32 with the KV cache (``return_logits``: (codes, logits), the
    model's raw logits [B, K, num_buckets] float32 of the conditional rows at every step, before
    guidance, temperature and top-k).

    ``cond`` / ``uncond``: dicts with text_embed [B, E], text_hidden [B, L, D], text_mask [B, L]
    bool (optional). ``dot``: [B] (or a scalar) dot-bucket indices, e.g.
    ``codebook.dot_bucket_at(0.75)``. Guidance (``guidance_scale > 1`` and ``uncond`` given) runs
    [cond; uncond] as one batch and samples from ``uncond + s * (cond - uncond)``; both rows are
    fed the sampled code. Then ``logits / temperature``, top-k (the k largest logits kept; None =
    all), and ``jax.random.categorical`` with ``jax.random.fold_in(rng, k)`` for code k.

    One prefix pass over the L + 2 prefix tokens fills the cache and gives code 0; one
    ``jax.lax.scan`` over the K - 1 remaining codes feeds each sampled code and writes its keys
    and values. The whole function is jit-compiled once per (config, guided); temperature,
    guidance scale and top-k are traced.
    """
    cond, uncond, dot, guided = _check_request(config, cond, uncond, dot, temperature, top_k,
                                               guidance_scale)
    fn = _cached_sampler(config, guided)
    k = config.num_buckets if top_k is None else int(top_k)
    codes, logits = fn(_unwrap(params), cond, uncond, dot, rng, jnp.float32(temperature),
                       jnp.float32(guidance_scale), jnp.int32(k))
    return (codes, logits) if return_logits else codes


@functools.lru_cache(maxsize=64)
def logits_fn(config: ARPriorConfig):
    """``ARPrior(config).apply`` jitted (built once per config): fn(params, codes, dot,
    text_embed, text_hidden, text_mask) -> teacher-forced logits [B, K, num_buckets]."""
    model = ARPrior(config)
    return jax.jit(lambda p, codes, dot, te, th, tm: model.apply(
        {"params": _unwrap(p)}, codes, dot, te, th, tm))


@functools.lru_cache(maxsize=64)
def _reference_pick(guided: bool, batch: int):
    return jax.jit(functools.partial(_pick, batch=batch, guided=guided))


def sample_reference(config: ARPriorConfig, params, cond, uncond=None, *, dot, rng,
                     temperature=1.0, top_k=None, guidance_scale=1.0):
    """:func:`sample` without a cache: for every code k, the whole sequence is recomputed with
    ``ARPrior.__call__`` (codes not yet sampled are 0; causality hides them) and code k is drawn
    from its logits exactly as :func:`sample` draws it. O(K^2) work: the tests' reference."""
    cond, uncond, dot, guided = _check_request(config, cond, uncond, dot, temperature, top_k,
                                               guidance_scale)
    b = dot.shape[0]
    forward, pick = logits_fn(config), _reference_pick(guided, b)
    params = _unwrap(params)
    rows, dots = _batch(cond, uncond, dot)
    codes = jnp.zeros((dots.shape[0], config.num_components), jnp.int32)
    t, s = jnp.float32(temperature), jnp.float32(guidance_scale)
    top = jnp.int32(config.num_buckets if top_k is None else int(top_k))
    for k in range(config.num_components):
        logits = forward(params, codes, dots, rows["text_embed"], rows["text_hidden"],
                         rows["text_mask"])[:, k]
        code = pick(logits, k, rng, t, s, top)
        codes = codes.at[:, k].set(_rows(code, guided))
    return codes[:b]
