"""The paper's image manipulations, on a pipeline with a CLIP image tower (`pipe.clip`):
`UnCLIPPipeline.from_workdir(W)`, or `from_diffusers(path, clip=DIR)` on released weights (an
UnCLIPImageVariationPipeline directory brings its own tower):

  variations   encode an image to its CLIP image embedding, DDIM-invert it with the decoder to
               x_T, decode again with DDIM eta > 0 (eta = 0 reconstructs the image)
  interpolate  slerp between two images' CLIP embeddings, x_T interpolated or held fixed
  textdiff     z_d = norm(z_t - z_t0); slerp from the image embedding towards z_d at a fixed x_T
  rerank       draw N candidates per prompt, keep the best by CLIP score
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.images import center_crop_resize, to_uint8


def slerp(a, b, t):
    """Spherical interpolation of directions with the norm interpolated linearly. a, b [..., E]."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    na, nb = jnp.linalg.norm(a, axis=-1, keepdims=True), jnp.linalg.norm(b, axis=-1, keepdims=True)
    ua, ub = a / na, b / nb
    omega = jnp.arccos(jnp.clip(jnp.sum(ua * ub, -1, keepdims=True), -1.0, 1.0))
    so = jnp.sin(omega)
    safe = so > 1e-6
    wa = jnp.where(safe, jnp.sin((1 - t) * omega) / jnp.where(safe, so, 1.0), 1 - t)
    wb = jnp.where(safe, jnp.sin(t * omega) / jnp.where(safe, so, 1.0), t)
    u = wa * ua + wb * ub
    return u * ((1 - t) * na + t * nb)


#: how to get the CLIP image tower the manipulations and reranking need
NEEDS_TOWER = ("build the pipeline with UnCLIPPipeline.from_workdir(W), or with "
               "from_diffusers(path, clip=DIR) where DIR is a transformers CLIP or an "
               "UnCLIPImageVariationPipeline directory")


def _seed_after(seed: int, k: int = 1) -> int:
    """seed + k wrapped into the signed 64-bit range jax.random.key takes (the same key as
    seed + k wherever that is in range)."""
    return (int(seed) + k + 2 ** 63) % 2 ** 64 - 2 ** 63


#: the timestep spacing of the manipulations' DDIM (inversion and decoding): ADM's "ddimN"
#: (stride T // n from 0, as GLIDE's and the paper's code), for any n. Not the sampler's "even"
#: spacing, which starts at t = T - 1: under the capped cosine schedule abar there is 2.4e-9,
#: so an eps-predicting decoder's x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies any
#: difference between eps at the top step and eps where the inversion came from by ~2e4, and no
#: inversion round trip survives it (measured on an imported Karlo-type decoder whose eps is
#: 1e-4 small: 115 grey levels rms off; with this spacing 0.05).
SPACING = "leading"


class Manipulator:
    def __init__(self, pipe, steps: int = 25, guidance: float = 1.0):
        if getattr(pipe, "clip", None) is None:
            raise ValueError(f"manipulations need the CLIP image tower: {NEEDS_TOWER}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        g = float(guidance)
        if not np.isfinite(g) or g < 1.0:
            raise ValueError(f"guidance must be a finite number >= 1 (the classifier-free "
                             f"guidance scale w in out_uncond + w * (out_cond - out_uncond); "
                             f"1 = none), got {guidance!r}")
        self.pipe, self.steps, self.guidance = pipe, steps, guidance
        self.size = pipe.decoder.config.unet.sample_size

    def embed(self, images_u8) -> jax.Array:
        return jnp.asarray(self.pipe.clip.embed_images(images_u8))

    def _x0(self, images_u8):
        small = np.stack([center_crop_resize(im, self.size) for im in images_u8])
        return jnp.asarray(small, jnp.float32) / 127.5 - 1.0

    def _null_text(self, n):
        cond, uncond = self.pipe.text_conditioning([""] * n)
        return cond, (uncond if self.guidance > 1.0 else None)

    def invert(self, images_u8, embeds=None):
        """DDIM inversion (eta = 0) of images to the decoder's x_T."""
        embeds = self.embed(images_u8) if embeds is None else embeds
        cond, _ = self._null_text(len(images_u8))
        return self.pipe.invert_decoder(self._x0(images_u8), embeds, cond, steps=self.steps,
                                        spacing=SPACING)

    def decode(self, embeds, x_T, *, eta: float = 0.0, seed: int = 0, upsample: bool = True):
        """DDIM decode CLIP image embeddings from x_T -> uint8 images."""
        n = embeds.shape[0]
        cond, uncond = self._null_text(n)
        low = self.pipe.sample_decoder(embeds, cond, uncond, steps=self.steps,
                                       guidance=self.guidance, rng=jax.random.key(seed),
                                       latents=x_T, method="ddim", eta=eta, clip=eta > 0,
                                       spacing=SPACING)
        if upsample and self.pipe.super_res_first is not None:
            out = self.pipe.sample_super_res(low, rng=jax.random.key(_seed_after(seed)))
        else:
            out = low * 0.5 + 0.5
        return to_uint8(out)

    # ---------------------------------------------------------------------------------------
    def variations(self, image_u8, n: int = 4, eta: float = 1.0, seed: int = 0, upsample=True):
        _check_count(n, "n")
        emb = self.embed(image_u8[None])
        x_T = self.invert(image_u8[None], emb)
        return self.decode(jnp.repeat(emb, n, 0), jnp.repeat(x_T, n, 0), eta=eta, seed=seed,
                           upsample=upsample)

    def interpolate(self, image_a, image_b, steps: int = 5, noise: str = "interpolate",
                    seed: int = 0, upsample: bool = True):
        """noise: 'interpolate' (slerp between the two inverted x_T) or 'fixed' (one random x_T).
        `upsample=False`: the decoder's images (no upsampler)."""
        if noise not in ("interpolate", "fixed"):
            raise ValueError(f"noise must be 'interpolate' or 'fixed', got {noise!r}")
        if steps < 2:
            raise ValueError("interpolation needs at least 2 steps")
        imgs = np.stack([center_crop_resize(image_a, max(image_a.shape[:2])),
                         center_crop_resize(image_b, max(image_a.shape[:2]))])
        emb = self.embed(imgs)
        ts = jnp.linspace(0.0, 1.0, steps)[:, None]
        z = slerp(emb[0][None], emb[1][None], ts)
        if noise == "fixed":
            x_T = jnp.broadcast_to(jax.random.normal(jax.random.key(seed),
                                                     (1, self.size, self.size, 3)),
                                   (steps, self.size, self.size, 3))
        else:
            xs = self.invert(imgs, emb).reshape(2, -1)
            x_T = slerp(xs[0][None], xs[1][None], ts).reshape(steps, self.size, self.size, 3)
        return self.decode(z, x_T, seed=seed, upsample=upsample)

    def textdiff(self, image_u8, text_from: str, text_to: str, steps: int = 5,
                 max_theta: float = 0.5, seed: int = 0, upsample: bool = True):
        if not text_to.strip():
            raise ValueError("textdiff needs a non-empty target text (--to)")
        _check_count(steps, "steps")
        if not np.isfinite(float(max_theta)):
            raise ValueError(f"max_theta must be a finite number, got {max_theta!r}")
        emb = self.embed(image_u8[None])
        x_T = self.invert(image_u8[None], emb)
        t = self.pipe.encode_text([text_to, text_from])["text_embed"]
        t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)  # the paper's z_t
        d = t[0] - t[1]
        z_d = d / jnp.maximum(jnp.linalg.norm(d), 1e-12)
        thetas = jnp.linspace(0.0, max_theta, steps)[:, None]
        # slerp the direction, keep the image embedding's norm
        z = slerp(emb, z_d[None] * jnp.linalg.norm(emb), thetas)
        return self.decode(z, jnp.repeat(x_T, steps, 0), seed=seed, upsample=upsample)


def _check_count(n, name):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


def rerank_batches(pipe, prompts, candidates: int, *, num_images_per_prompt: int = 1,
                   batch_size: int = 8, seed: int = 0, **gen_kw):
    """`rerank` made `batch_size` candidates at a time, `num_images_per_prompt` kept images a
    prompt: yields (start, uint8 [b, H, W, 3]) of the kept images in generate()'s order.

    Candidate c of kept image i is image i * candidates + c of
    `pipe.generate_batches(prompts, num_images_per_prompt=num_images_per_prompt * candidates)`
    (each drawn from its own key), so what is kept does not depend on `batch_size`; memory holds
    one batch and the candidates of one image.
    """
    if getattr(pipe, "clip", None) is None:
        raise ValueError(f"reranking needs the CLIP image tower: {NEEDS_TOWER}")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) \
            or candidates < 1:
        raise ValueError(f"--rerank needs a positive number of candidates, got {candidates}")
    _check_count(num_images_per_prompt, "num_images_per_prompt")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batches = pipe.generate_batches(  # checks its arguments now
        prompts, num_images_per_prompt=num_images_per_prompt * candidates,
        batch_size=batch_size, seed=seed, **gen_kw)
    return _reranked(pipe, prompts, candidates, num_images_per_prompt, batches)


def _reranked(pipe, prompts, candidates, num_images_per_prompt, batches):
    te = np.concatenate([np.asarray(pipe.encode_text(prompts[i:i + 256])["text_embed"],
                                    np.float64) for i in range(0, len(prompts), 256)])
    te /= np.linalg.norm(te, axis=-1, keepdims=True)
    best_score, best, kept, first = -np.inf, None, [], 0
    for start, imgs in batches:
        ie = np.asarray(pipe.clip.embed_images(imgs), np.float64)
        ie /= np.linalg.norm(ie, axis=-1, keepdims=True)
        for g, (im, e) in enumerate(zip(imgs, ie), start):
            i, c = divmod(g, candidates)
            score = float(e @ te[i // num_images_per_prompt])
            if c == 0 or score > best_score:  # the first of equal scores, as argmax keeps
                best_score, best = score, im
            if c == candidates - 1:
                kept.append(best)
        if kept:
            yield first, np.stack(kept)
            first, kept = first + len(kept), []


def rerank(pipe, prompts, candidates: int, *, seed: int = 0, **gen_kw) -> np.ndarray:
    """Generate `candidates` images per prompt and keep each prompt's best by CLIP score."""
    if getattr(pipe, "clip", None) is None:
        raise ValueError(f"reranking needs the CLIP image tower: {NEEDS_TOWER}")
    if candidates < 1:
        raise ValueError(f"--rerank needs a positive number of candidates, got {candidates}")
    imgs = pipe.generate(prompts, seed=seed, num_images_per_prompt=candidates, **gen_kw)
    ie = np.asarray(pipe.clip.embed_images(imgs), np.float64)
    te = np.asarray(pipe.encode_text(list(prompts))["text_embed"], np.float64)
    ie /= np.linalg.norm(ie, axis=-1, keepdims=True)
    te /= np.linalg.norm(te, axis=-1, keepdims=True)
    scores = np.sum(ie.reshape(len(prompts), candidates, -1) * te[:, None], -1)
    best = np.argmax(scores, axis=1)
    return imgs.reshape(len(prompts), candidates, *imgs.shape[1:])[np.arange(len(prompts)), best]
