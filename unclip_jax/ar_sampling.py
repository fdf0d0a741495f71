"""The autoregressive prior inside the pipeline: its component (config, params, codebook and the
sampling defaults its stage records) and the text -> CLIP image embedding draw.

A draw: each image's z_i . z_t bucket uniformly from the recorded range of training quantiles
(the paper conditions on a dot product from the upper half), its codes from the KV-cached
sampler (`models.ar_prior.sample`, one `lax.scan` over tokens), decoded by the stored codebook
into a raw CLIP image embedding. Keys: the dot bucket from fold_in(rng, 0), the codes from
fold_in(rng, 1); a batch of row keys (one an image) draws each row from its own key.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.sampler import fold_in_rows, is_key_batch
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models.ar_codes import Codebook
from unclip_jax.models.ar_prior import ARPriorConfig

DEFAULTS = {"temperature": 1.0, "top_k": None, "dot_quantiles": (0.5, 1.0)}


def check_dot_quantiles(q) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi <= 1: the range of training quantiles of z_i . z_t that a
    draw conditions on."""
    try:
        lo, hi = (float(v) for v in q)
    except (TypeError, ValueError):
        raise ValueError(f"dot_quantiles must be two numbers (lo, hi), got {q!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"dot_quantiles must satisfy 0 <= lo <= hi <= 1, got {q!r}")
    return lo, hi


@dataclasses.dataclass
class ARPriorComponent:
    """A trained AR prior: config, params, its codebook and its recorded sampling defaults
    (temperature, top_k, dot_quantiles)."""

    config: ARPriorConfig
    params: Any
    codebook: Codebook
    defaults: dict = dataclasses.field(default_factory=lambda: dict(DEFAULTS))

    def __post_init__(self):
        ar_lib.check_codebook(self.config, self.codebook)

    @classmethod
    def from_stage_dir(cls, stage_dir: str) -> "ARPriorComponent":
        """WORKDIR/ar_prior: its record, EMA params and codebook.npz."""
        from unclip_jax.workdir import load_stage

        st = load_stage(stage_dir, expect="ar_prior")
        data = st.record.data
        book = os.path.join(stage_dir, data.get("codebook", "codebook.npz"))
        codebook = Codebook.load(book)
        try:
            ar_lib.check_codebook(st.config, codebook)
        except ValueError as e:
            raise ValueError(f"{book}: {e}; retrain the AR prior") from None
        defaults = dict(DEFAULTS)
        defaults.update({k: v for k, v in (data.get("sampling") or {}).items() if k in DEFAULTS})
        return cls(st.config, st.params, codebook, defaults)

    def options(self, temperature=None, top_k=None, dot_quantiles=None) -> dict:
        """The recorded defaults with the given values, checked."""
        d = self.defaults
        out = {"temperature": d["temperature"] if temperature is None else temperature,
               "top_k": d["top_k"] if top_k is None else top_k,
               "dot_quantiles": check_dot_quantiles(d["dot_quantiles"] if dot_quantiles is None
                                                    else dot_quantiles)}
        ar_lib.check_sampling(out["temperature"], out["top_k"], self.config.num_buckets)
        return out

    def dot_range(self, quantiles) -> tuple[int, int]:
        """The (first, last) dot bucket of a quantile range."""
        m = self.codebook.num_dot_buckets
        lo, hi = quantiles
        return self.codebook.dot_bucket_at(lo), min(self.codebook.dot_bucket_at(hi), m - 1)

    def sample(self, cond, uncond=None, *, guidance: float = 1.0, rng, temperature=None,
               top_k=None, dot_quantiles=None):
        """Raw CLIP image embeddings [N, E] for the text conditioning (uncond: the empty
        prompt's, for classifier-free guidance; None or guidance 1: unguided)."""
        o = self.options(temperature, top_k, dot_quantiles)
        lo, hi = self.dot_range(o["dot_quantiles"])
        n = cond["text_embed"].shape[0]
        kw = dict(temperature=o["temperature"], top_k=o["top_k"], guidance_scale=guidance)
        if uncond is None or guidance == 1.0:
            uncond = None
        if not is_key_batch(rng):
            dot = jax.random.randint(jax.random.fold_in(rng, 0), (n,), lo, hi + 1)
            codes = ar_lib.sample(self.config, self.params, cond, uncond, dot=dot,
                                  rng=jax.random.fold_in(rng, 1), **kw)
        else:  # one key a row: each row drawn alone, whatever the batch around it
            dot = jax.vmap(lambda k: jax.random.randint(k, (), lo, hi + 1))(fold_in_rows(rng, 0))
            keys = fold_in_rows(rng, 1)
            row = lambda t: jax.tree.map(lambda a: a[None], t)  # noqa: E731

            def one(key, c, u, d):
                return ar_lib.sample(self.config, self.params, row(c),
                                     None if u is None else row(u), dot=d[None], rng=key,
                                     **kw)[0]
            codes = jax.vmap(one)(keys, cond, uncond, dot)
        return self.codebook.decode(jnp.asarray(codes))
