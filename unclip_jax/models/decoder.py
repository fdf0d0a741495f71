"""The unCLIP decoder: CLIP conditioning (diffusers' UnCLIPTextProjModel) + the ADM UNet.

The CLIP image embedding is projected and added to the timestep embedding, together with the
pooled text embedding, and projected into `clip_extra_context_tokens` extra context tokens placed
before the projected, LayerNormed text token sequence; a learned null embedding replaces the image
embedding for the unconditional branch.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models import layers
from unclip_jax.models.unet import UNet, UNetConfig, _dense


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The unCLIP decoder: CLIP conditioning (diffusers' UnCLIPTextProjModel) + a UNet.

    clip_embed_dim: width of the CLIP image embedding and of the pooled text embedding.
    text_hidden_dim: width of the text encoder's hidden states (None = clip_embed_dim).
    clip_extra_context_tokens: the image embedding becomes this many extra context tokens,
      placed before the projected, LayerNormed text tokens.
    """

    unet: UNetConfig = dataclasses.field(default_factory=lambda: UNetConfig(
        context_dim=256, time_cond=True))
    clip_embed_dim: int = 768
    text_hidden_dim: int | None = None
    clip_extra_context_tokens: int = 4
    text_norm_eps: float = 1e-5

    def __post_init__(self):
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig.from_dict(self.unet))
        if self.unet.context_dim is None:
            raise ValueError("the decoder's UNet needs context_dim (the text/CLIP context width)")
        if not self.unet.time_cond:
            raise ValueError("the decoder's UNet needs time_cond=True (CLIP embeddings are added "
                             "to the time embedding)")

    @property
    def text_dim(self) -> int:
        return self.text_hidden_dim or self.clip_embed_dim

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["unet"] = self.unet.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        d = dict(d)
        d["unet"] = UNetConfig.from_dict(d["unet"]) if isinstance(d.get("unet"), dict) else d["unet"]
        return cls(**d)


class Decoder(nn.Module):
    """unCLIP decoder. `__call__(x, t, image_embed [B,E], text_embed [B,E] (pooled CLIP text
    embedding), text_hidden [B,L,T], text_mask [B,L] bool, *, null_image [B] bool, train)`.

    Where `null_image` is True the learned null embedding replaces `image_embed` (classifier-free
    guidance's unconditional branch; the training-time CLIP-embedding dropout).
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, t, image_embed, text_embed, text_hidden, text_mask=None, *,
                 null_image=None, train: bool = False):
        cfg = self.config
        ucfg = cfg.unet
        dtype = jnp.dtype(ucfg.dtype)
        b = x.shape[0]
        n_tok, ctx = cfg.clip_extra_context_tokens, ucfg.context_dim
        null = self.param("null_image_embed",
                          nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (cfg.clip_embed_dim,), jnp.dtype(ucfg.param_dtype))
        img = image_embed.astype(dtype)
        if null_image is not None:
            img = jnp.where(jnp.asarray(null_image, bool)[:, None], null.astype(dtype)[None], img)
        time_cond = (_dense(ucfg.emb_dim, "image_to_time", ucfg)(img)
                     + _dense(ucfg.emb_dim, "text_to_time", ucfg)(text_embed.astype(dtype)))
        tokens = _dense(n_tok * ctx, "image_to_tokens", ucfg)(img).reshape(b, n_tok, ctx)
        text = _dense(ctx, "text_proj", ucfg)(text_hidden.astype(dtype))
        text = layers.layer_norm("text_norm", cfg.text_norm_eps, dtype,
                                 jnp.dtype(ucfg.param_dtype))(text).astype(dtype)
        context = jnp.concatenate([tokens, text], axis=1)
        context = layers.constrain(context, ("batch", "length", "embed"))
        mask = None
        if text_mask is not None:
            mask = jnp.concatenate([jnp.ones((b, n_tok), bool), text_mask.astype(bool)], axis=1)
        return UNet(ucfg, name="unet")(x, t, context=context, context_mask=mask,
                                       time_cond=time_cond, train=train)


def decoder_init_inputs(config: DecoderConfig, batch: int = 1, size: int | None = None,
                        text_len: int = 1):
    """Dummy inputs (args tuple) of the right shapes for `Decoder.init`."""
    size = size or 2 ** (config.unet.num_levels - 1) * config.unet.patch_size
    return (jnp.zeros((batch, size, size, config.unet.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, config.clip_embed_dim), jnp.float32),
            jnp.zeros((batch, config.clip_embed_dim), jnp.float32),
            jnp.zeros((batch, text_len, config.text_dim), jnp.float32),
            jnp.ones((batch, text_len), bool))


def denoiser(config: DecoderConfig):
    """The decoder as the sampler's and the loss's model function:
    ``fn(params, x_t [B, h, w, 3], t [B], cond, *, train=False, rng=None)`` with ``cond`` =
    dict(image_embed [B, E], text_embed [B, E], text_hidden [B, L, T], text_mask [B, L] bool,
    null_image [B] bool -- True: the learned null image embedding, classifier-free guidance's
    unconditional branch); ``rng`` drives dropout."""
    model = Decoder(config)

    def fn(params, x_t, t, cond, *, train: bool = False, rng=None):
        return model.apply({"params": params}, x_t, t, cond["image_embed"], cond["text_embed"],
                           cond["text_hidden"], cond["text_mask"], null_image=cond["null_image"],
                           train=train, rngs=None if rng is None else {"dropout": rng})
    return fn


def guided_cond(image_embed, text: dict, null_text: dict | None):
    """The decoder's (cond, uncond) for classifier-free guidance, as the pipeline and the training
    preview sample it: cond = the image embedding with its text; uncond = the learned null image
    embedding with the empty prompt's text (None when `null_text` is None: unguided).
    `text` / `null_text`: dict(text_embed, text_hidden, text_mask) with a batch axis."""
    n = image_embed.shape[0]
    cond = dict(text, image_embed=image_embed, null_image=jnp.zeros((n,), bool))
    uncond = None if null_text is None else dict(null_text, image_embed=image_embed,
                                                 null_image=jnp.ones((n,), bool))
    return cond, uncond

