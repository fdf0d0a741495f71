"""The autoregressive prior's codebook: CLIP image embeddings <-> sequences of discrete codes.

unCLIP's AR prior (paper section 2.2) does not model the CLIP image embedding z_i directly. It
first reduces its dimensionality with PCA -- the paper keeps 319 of the 1,024 principal
components of ViT-H/16's embeddings, which retain more than 99% of the information -- sorts the
components by decreasing eigenvalue, and quantises each of them into 1,024 discrete buckets. The
prior then predicts the resulting sequence of 319 bucket indices one after another. It is also
conditioned on the quantised dot product between the CLIP text and image embeddings (here the
cosine of the raw embeddings) so that sampling can ask for a high one (the paper samples from the
top half of that distribution).

This module fits and applies that transform:

* :func:`fit_codebook` -- PCA (float64 SVD on the host) of the training image embeddings,
  equal-mass (quantile) bucket edges per component, equal-mass buckets of cos(z_i, z_t).
* :class:`Codebook` -- ``encode`` (embedding -> int32 codes [..., K]), ``decode`` (codes ->
  embedding, the bucket midpoints mapped back through the components), ``encode_dot`` /
  ``dot_bucket_at`` for the dot-product token, ``bound`` (an analytic bound on the round-trip
  error), and ``save`` / ``load`` (an ``.npz`` file, written atomically).

``encode``, ``decode``, ``encode_dot`` and ``bound`` run in numpy (float64) on numpy input and in
jax.numpy (float32, jit-able) on jax arrays, so a training step can quantise a batch on device.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "unclip_jax.ar_codebook.v1"
_FIELDS = ("mean", "components", "explained", "edges", "centers", "dot_edges", "dot_centers")


def _xp(x):
    """jax.numpy for jax arrays (tracers included), numpy otherwise."""
    return jnp if isinstance(x, jax.Array) else np


def _strictly_increasing(edges: np.ndarray) -> np.ndarray:
    """Nudge tied / decreasing quantile edges (rows of a 2-D float64 array) up by one ulp each,
    so every bucket has positive width and ``searchsorted`` is well defined."""
    edges = np.array(edges, np.float64, copy=True)
    for row in np.nonzero(np.any(np.diff(edges, axis=-1) <= 0, axis=-1))[0]:
        e = edges[row]
        for i in range(1, e.shape[0]):
            if e[i] <= e[i - 1]:
                e[i] = np.nextafter(e[i - 1], np.inf)
    return edges


def _quantile_edges(values: np.ndarray, n: int) -> np.ndarray:
    """[N, C] samples -> [C, n + 1] equal-mass bucket edges (min ... max) per column."""
    q = np.linspace(0.0, 1.0, n + 1)
    return _strictly_increasing(np.quantile(values, q, axis=0).T)


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
    """PCA + per-component quantisation of CLIP image embeddings (see the module docstring).

    Bucket ``j`` of component ``k`` is ``[edges[k, j], edges[k, j + 1])``; values below
    ``edges[k, 1]`` fall in bucket 0 and values at or above ``edges[k, -2]`` in the last bucket
    (so values outside the training range [min, max] go to the end buckets).
    """

    mean: np.ndarray         # [E] mean of the raw CLIP image embeddings
    components: np.ndarray   # [K, E] orthonormal principal directions (rows), decreasing variance
    explained: np.ndarray    # [K] fraction of the total variance each kept component holds
    edges: np.ndarray        # [K, N+1] increasing bucket edges per component (quantiles)
    centers: np.ndarray      # [K, N] the value each bucket decodes to (midpoint of its edges)
    dot_edges: np.ndarray    # [M+1] edges of the quantised cos(z_image, z_text) (quantiles)
    dot_centers: np.ndarray  # [M]

    def __post_init__(self):
        for f in _FIELDS:
            a = np.asarray(getattr(self, f))
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"codebook field {f!r} must be a float array, got dtype {a.dtype}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"codebook field {f!r} has non-finite values")
            object.__setattr__(self, f, a)
        if self.mean.ndim != 1:
            raise ValueError(f"codebook mean must be [E], got shape {self.mean.shape}")
        e = self.mean.shape[0]
        if self.components.ndim != 2 or self.components.shape[1] != e:
            raise ValueError(f"codebook components must be [K, {e}], got {self.components.shape}")
        k = self.components.shape[0]
        if k < 1:
            raise ValueError("codebook has no components")
        if self.explained.shape != (k,):
            raise ValueError(f"codebook explained must be [{k}], got {self.explained.shape}")
        if self.edges.ndim != 2 or self.edges.shape[0] != k or self.edges.shape[1] < 3:
            raise ValueError(f"codebook edges must be [{k}, N+1] with N >= 2, "
                             f"got {self.edges.shape}")
        n = self.edges.shape[1] - 1
        if self.centers.shape != (k, n):
            raise ValueError(f"codebook centers must be [{k}, {n}], got {self.centers.shape}")
        if np.any(np.diff(self.edges, axis=-1) < 0):
            raise ValueError("codebook edges must be non-decreasing along each component")
        if self.dot_edges.ndim != 1 or self.dot_edges.shape[0] < 3:
            raise ValueError(f"codebook dot_edges must be [M+1] with M >= 2, "
                             f"got {self.dot_edges.shape}")
        m = self.dot_edges.shape[0] - 1
        if self.dot_centers.shape != (m,):
            raise ValueError(f"codebook dot_centers must be [{m}], got {self.dot_centers.shape}")
        if np.any(np.diff(self.dot_edges) < 0):
            raise ValueError("codebook dot_edges must be non-decreasing")

    # -- sizes
    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def num_buckets(self) -> int:
        return int(self.centers.shape[1])

    @property
    def num_dot_buckets(self) -> int:
        return int(self.dot_centers.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.mean.shape[0])

    # -- transforms
    def _check_width(self, x, what="x"):
        if x.ndim < 1 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{what} must be [..., {self.embed_dim}] (the codebook's embedding "
                             f"width), got shape {tuple(x.shape)}")

    def _consts(self, xp):
        """The fields as arrays of the backend: float64 numpy, or float32 jax constants."""
        if xp is np:
            return {f: getattr(self, f) for f in _FIELDS}
        return {f: jnp.asarray(getattr(self, f), jnp.float32) for f in _FIELDS}

    def project(self, x):
        """[..., E] -> the principal-component coordinates [..., K]."""
        xp = _xp(x)
        x = xp.asarray(x)
        self._check_width(x)
        c = self._consts(xp)
        x = x.astype(np.float64 if xp is np else jnp.float32)
        return (x - c["mean"]) @ c["components"].T

    def _bucketize(self, p, xp):
        """Projections [..., K] -> int32 bucket indices [..., K]."""
        inner = self._consts(xp)["edges"][:, 1:-1]  # [K, N-1]
        if xp is np:
            out = np.empty(p.shape, np.int32)
            for k in range(self.num_components):
                out[..., k] = np.searchsorted(inner[k], p[..., k], side="right")
            return out
        find = jax.vmap(lambda e, v: jnp.searchsorted(e, v, side="right"), in_axes=(0, -1),
                        out_axes=-1)
        return find(inner, p).astype(jnp.int32)

    def encode(self, x):
        """CLIP image embeddings [..., E] -> int32 codes [..., K] in [0, num_buckets)."""
        return self._bucketize(self.project(x), _xp(x))

    def decode(self, codes):
        """Int codes [..., K] -> embeddings [..., E] = mean + centers[k, codes[k]] @ components
        (float64 for numpy input, float32 for jax input)."""
        xp = _xp(codes)
        codes = xp.asarray(codes)
        if codes.ndim < 1 or codes.shape[-1] != self.num_components:
            raise ValueError(f"codes must be [..., {self.num_components}] (the codebook's number "
                             f"of components), got shape {tuple(codes.shape)}")
        if xp is np:
            if not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
            if codes.size and (codes.min() < 0 or codes.max() >= self.num_buckets):
                raise ValueError(f"codes must lie in [0, {self.num_buckets}), got "
                                 f"[{codes.min()}, {codes.max()}]")
        c = self._consts(xp)
        vals = c["centers"][xp.arange(self.num_components), codes]  # [..., K]
        return c["mean"] + vals @ c["components"]

    def encode_dot(self, cos):
        """Cosines [...] (of z_image and z_text) -> int32 dot buckets [...] in [0, M)."""
        xp = _xp(cos)
        cos = xp.asarray(cos)
        inner = self._consts(xp)["dot_edges"][1:-1]
        if xp is np:
            return np.searchsorted(inner, cos.astype(np.float64), side="right").astype(np.int32)
        return jnp.searchsorted(inner, cos.astype(jnp.float32), side="right").astype(jnp.int32)

    def dot_bucket_at(self, quantile: float) -> int:
        """The dot bucket at that quantile of the training dot products (the buckets hold equal
        mass, so q -> int(q * M), clipped to [0, M - 1]). The paper samples from the top half."""
        q = float(quantile)
        if not (0.0 <= q <= 1.0):
            raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
        return int(min(max(int(q * self.num_dot_buckets), 0), self.num_dot_buckets - 1))

    def bound(self, x):
        """Analytic upper bound on |decode(encode(x)) - x|_2, per example [...]:
        |residual of x outside the kept subspace| + sqrt(sum_k t_k^2), where t_k is half the
        width of x's bucket in component k (for in-range x; outside the training range, the
        distance from the end bucket's center, which is larger). Since the components are
        orthonormal the error is exactly sqrt(residual^2 + sum_k (p_k - center_k)^2)."""
        xp = _xp(x)
        x = xp.asarray(x)
        p = self.project(x)
        c = self._consts(xp)
        x = x.astype(p.dtype)
        resid = xp.linalg.norm(x - c["mean"] - p @ c["components"], axis=-1)
        codes = self._bucketize(p, xp)
        k = xp.arange(self.num_components)
        lo, hi = c["edges"][k, codes], c["edges"][k, codes + 1]
        t = xp.maximum((hi - lo) / 2, xp.abs(p - c["centers"][k, codes]))
        return resid + xp.sqrt(xp.sum(t * t, axis=-1))

    # -- serialisation
    def arrays(self) -> dict[str, np.ndarray]:
        return {f: np.asarray(getattr(self, f)) for f in _FIELDS}

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray]) -> "Codebook":
        unknown = set(d) - set(_FIELDS) - {"format"}
        missing = set(_FIELDS) - set(d)
        if unknown or missing:
            raise ValueError(f"not a codebook: missing fields {sorted(missing)}, "
                             f"unknown fields {sorted(unknown)}")
        return cls(**{f: np.asarray(d[f]) for f in _FIELDS})

    def save(self, path: str) -> None:
        """Write an ``.npz`` file atomically (a temporary file in the same directory, then
        ``os.replace``): a reader never sees a partial codebook."""
        path = os.fspath(path)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, format=np.array(FORMAT), **self.arrays())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "Codebook":
        """Read a file written by :meth:`save`; ValueError if it is not a codebook or is corrupt
        (FileNotFoundError if it does not exist)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no codebook file at {path}")
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a bare .npy array, not an .npz archive")
            with z:
                d = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path} is not a readable AR-prior codebook (corrupt, or not an "
                             f".npz written by Codebook.save): {e}") from e
        fmt = d.get("format")
        if fmt is None or fmt.shape != () or str(fmt) != FORMAT:
            raise ValueError(f"{path} is not an AR-prior codebook (format marker "
                             f"{None if fmt is None else str(fmt)!r}, expected {FORMAT!r})")
        try:
            return cls.from_arrays(d)
        except ValueError as e:
            raise ValueError(f"{path}: corrupt AR-prior codebook: {e}") from e


def fit_codebook(image_embeds, text_embeds, *, variance: float = 0.99,
                 num_components: int | None = None, num_buckets: int = 1024,
                 num_dot_buckets: int = 1024) -> Codebook:
    """Fit the AR prior's codebook on paired CLIP embeddings ([N, E] each; float64 on the host).

    K is the smallest number of principal components whose cumulative explained variance is at
    least ``variance`` (the paper: 319 of 1,024 at 99%), unless ``num_components`` is given. Each
    component is quantised into ``num_buckets`` equal-mass buckets of the training projections
    (the paper: 1,024), and cos(z_image, z_text) into ``num_dot_buckets`` equal-mass buckets.
    Component signs are fixed (the largest-magnitude entry of each direction is positive) so the
    fit is deterministic.
    """
    x = np.asarray(image_embeds, np.float64)
    t = np.asarray(text_embeds, np.float64)
    if x.ndim != 2:
        raise ValueError(f"image_embeds must be [N, E], got shape {x.shape}")
    n, e = x.shape
    if n < 2:
        raise ValueError(f"fit_codebook needs at least 2 examples, got {n}")
    if t.ndim != 2:
        raise ValueError(f"text_embeds must be [N, E], got shape {t.shape}")
    if t.shape[0] != n:
        raise ValueError(f"image_embeds has {n} examples but text_embeds has {t.shape[0]}")
    if t.shape[1] != e:
        raise ValueError(f"text_embeds have width {t.shape[1]} but image_embeds have width {e} "
                         "(the dot-product token needs embeddings of one CLIP space)")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(t))):
        raise ValueError("image_embeds / text_embeds contain NaN or inf")
    if isinstance(variance, bool) or not (isinstance(variance, (int, float, np.floating))
                                          and 0.0 < float(variance) <= 1.0):
        raise ValueError(f"variance must be in (0, 1], got {variance!r}")
    for name, v in (("num_buckets", num_buckets), ("num_dot_buckets", num_dot_buckets)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {v!r}")

    mean = x.mean(axis=0)
    xc = x - mean
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s * s
    total = float(var.sum())
    if not total > 0:
        raise ValueError("image_embeds have zero variance (all examples are equal)")
    frac = var / total
    rank = vt.shape[0]
    if num_components is None:
        k = int(np.searchsorted(np.cumsum(frac), float(variance) - 1e-12) + 1)
        k = min(k, rank)
    else:
        k = num_components
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= rank:
            raise ValueError(f"num_components must be an integer in [1, {rank}] "
                             f"(min(examples, width)), got {num_components!r}")
        k = int(k)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]

    proj = xc @ comps.T  # [N, K]
    edges = _quantile_edges(proj, int(num_buckets))
    centers = (edges[:, :-1] + edges[:, 1:]) / 2

    nx = np.linalg.norm(x, axis=1)
    nt = np.linalg.norm(t, axis=1)
    if np.any(nx == 0) or np.any(nt == 0):
        raise ValueError("an image or text embedding is all zeros (its cosine is undefined)")
    cos = np.sum(x * t, axis=1) / (nx * nt)
    dot_edges = _quantile_edges(cos[:, None], int(num_dot_buckets))[0]
    dot_centers = (dot_edges[:-1] + dot_edges[1:]) / 2
    return Codebook(mean=mean, components=comps, explained=frac[:k], edges=edges,
                    centers=centers, dot_edges=dot_edges, dot_centers=dot_centers)


def cosine(a, b):
    """cos(a, b) along the last axis (numpy or jax), for :meth:`Codebook.encode_dot`."""
    xp = _xp(a) if isinstance(a, jax.Array) else _xp(b)
    num = xp.sum(a * b, axis=-1)
    den = xp.linalg.norm(a, axis=-1) * xp.linalg.norm(b, axis=-1)
    return num / xp.maximum(den, 1e-12)


__all__ = ["Codebook", "fit_codebook", "cosine", "FORMAT"]
