"""Image helpers, in one home: uint8 <-> model ranges, CLIP's pixels, resizing, reading files.

Host side (numpy / Pillow): :func:`to_uint8`, :func:`resize`, :func:`center_crop_resize`,
:func:`load_image`. Device side (jax.numpy, inside jitted code): :func:`to_model_range`,
:func:`clip_pixels`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# OpenAI CLIP's pixel normalisation
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

RESAMPLE = ("box", "bilinear", "bicubic", "nearest", "lanczos")


# ------------------------------------------------------------------------------ host side
def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (clipped; non-finite pixels -> 0) or uint8 -> uint8 [N, H, W, 3]
    (a single [H, W, 3] image gains a batch axis; one channel is repeated to three)."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        a = np.asarray(a, np.float64)
        a = np.where(np.isfinite(a), a, 0.0)
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    if a.ndim == 3:
        a = a[None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


def resize(image: np.ndarray, size: int, method: str = "box") -> np.ndarray:
    """Resize a uint8 [H, W, C] image to size x size with Pillow (`method` in RESAMPLE)."""
    from PIL import Image

    if method not in RESAMPLE:
        raise ValueError(f"unknown resize method {method!r}; expected one of {RESAMPLE}")
    filt = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST,
            "lanczos": Image.Resampling.LANCZOS}[method]
    img = Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(img.resize((int(size), int(size)), filt))


def center_crop_resize(image: np.ndarray, size: int, method: str = "bicubic") -> np.ndarray:
    """The largest centred square of a uint8 [H, W, 3] image, resized to size x size."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return resize(image[top:top + s, left:left + s], size, method)


def load_image(path: str) -> np.ndarray:
    """An image file -> uint8 RGB [H, W, 3] (alpha composited on black); a clear error otherwise."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # over Image.MAX_IMAGE_PIXELS Pillow only warns (over twice that it raises): refuse
            # both, before decoding, rather than expand a small file into gigabytes
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width < 1 or im.height < 1:
                    raise ValueError(f"{path} is an empty image ({im.width}x{im.height})")
                im.load()
                if im.mode in ("RGBA", "LA", "P"):
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                    im = Image.alpha_composite(bg, im)
                return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path} is refused as a possible decompression bomb, not decoded "
                         f"({e.args[0] if e.args else type(e).__name__}); resize it "
                         f"first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not an image Pillow can read ({type(e).__name__})") from None


# ------------------------------------------------------------------------------ device side
def _resize_batch(x: jax.Array, size: int) -> jax.Array:
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic", antialias=True)


def clip_pixels(images_uint8: jax.Array, size: int) -> jax.Array:
    """uint8 [B, H, W, 3] -> CLIP's normalised float pixels [B, size, size, 3] (antialiased
    bicubic resize)."""
    x = images_uint8.astype(jnp.float32) / 255.0
    if x.shape[1] != size or x.shape[2] != size:
        x = _resize_batch(x, size)
    return (x - CLIP_MEAN) / CLIP_STD


def to_model_range(images_uint8: jax.Array, size: int | None = None) -> jax.Array:
    """uint8 images -> float in [-1, 1], resized (antialiased bicubic, clipped) to `size` if
    given."""
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    if size is not None and (x.shape[1] != size or x.shape[2] != size):
        x = jnp.clip(_resize_batch(x, size), -1.0, 1.0)
    return x
