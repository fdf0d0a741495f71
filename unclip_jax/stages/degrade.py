"""Low-resolution inputs for upsampler training (host-side numpy/Pillow, deterministic by rng).

  blur  the paper's 64->256 corruption: downsample, then a Gaussian blur of random width
  bsr   the paper's 256->1024 corruption, BSR-style: a random order of blur, bilinear/bicubic
        down-and-up resizes, Gaussian noise, sensor (signal-dependent) noise and JPEG artefacts
"""
from __future__ import annotations

import io

import numpy as np

from unclip_jax.images import resize

DEGRADATIONS = ("none", "blur", "bsr")


def _pil(a):
    from PIL import Image

    return Image.fromarray(np.asarray(a, np.uint8))


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (sigma in pixels; 0 = identity)."""
    if sigma <= 0:
        return img
    r = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    a = img.astype(np.float64)
    a = np.pad(a, ((r, r), (0, 0), (0, 0)), mode="reflect")
    a = sum(k[i] * a[i:i + img.shape[0]] for i in range(2 * r + 1))
    a = np.pad(a, ((0, 0), (r, r), (0, 0)), mode="reflect")
    a = sum(k[i] * a[:, i:i + img.shape[1]] for i in range(2 * r + 1))
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    _pil(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 255).astype(np.uint8)


def sensor_noise(img: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Signal-dependent (shot-like) noise: std proportional to sqrt(intensity)."""
    a = img.astype(np.float64)
    return np.clip(a + rng.normal(0.0, 1.0, a.shape) * scale * np.sqrt(a + 1.0), 0, 255
                   ).astype(np.uint8)


def bsr(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """BSR-style degradation of a high-resolution image down to `size` x `size`."""
    ops = ["blur", "resize", "noise", "sensor", "jpeg"]
    rng.shuffle(ops)
    a = img
    for op in ops:
        if op == "blur" and rng.random() < 0.7:
            a = gaussian_blur(a, float(rng.uniform(0.2, 1.5)))
        elif op == "resize":
            mid = int(np.clip(round(size * rng.uniform(0.75, 1.5)), 4, img.shape[0]))
            a = resize(a, mid, str(rng.choice(["bilinear", "bicubic", "box"])))
        elif op == "noise" and rng.random() < 0.7:
            a = gaussian_noise(a, float(rng.uniform(1.0, 12.0)), rng)
        elif op == "sensor" and rng.random() < 0.3:
            a = sensor_noise(a, float(rng.uniform(0.1, 0.6)), rng)
        elif op == "jpeg" and rng.random() < 0.7:
            a = jpeg(a, int(rng.integers(40, 96)))
    a = resize(a, size, str(rng.choice(["bilinear", "bicubic", "box"])))
    return jpeg(a, int(rng.integers(60, 96))) if rng.random() < 0.5 else a


def low_res(img: np.ndarray, size: int, kind: str, rng: np.random.Generator,
            blur_sigma: tuple[float, float] = (0.4, 0.6)) -> np.ndarray:
    """The corrupted low-resolution version of `img` at `size`."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")
    if kind == "bsr":
        return bsr(img, size, rng)
    small = resize(img, size, "box")
    if kind == "blur":
        small = gaussian_blur(small, float(rng.uniform(*blur_sigma)))
    return small


def random_crop(img: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    if crop >= h and crop >= w:
        return img
    y = int(rng.integers(0, h - crop + 1))
    x = int(rng.integers(0, w - crop + 1))
    return img[y:y + crop, x:x + crop]
