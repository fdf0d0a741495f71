"""Image helpers, in one home: uint8 <-> model ranges, CLIP's pixels, resizing, reading files.

Host side (numpy / Pillow): :func:`to_uint8`, :func:`resize`, :func:`center_crop_resize`,
:func:`load_image`. Device side (jax.numpy, inside jitted code): :func:`to_model_range`,
:func:`clip_pixels` (with :class:`ClipPreprocess`, transformers' CLIPImageProcessor steps).
"""
from __future__ import annotations

import dataclasses

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


#: PIL's resampling filters (transformers' `resample` ids) that `ClipPreprocess` reproduces
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """How uint8 images become a CLIP vision tower's pixels: transformers' CLIPImageProcessor
    (resize the shortest edge, centre crop, rescale, normalise), run on device by `clip_pixels`.

    size:   the shortest edge after resizing (aspect kept, the long edge truncated to an int as
            transformers does), or (height, width), or None (no resize)
    crop:   (height, width) of the centre crop (zero-padded where the image is smaller, as
            transformers does), or None
    pil_rounding: round to uint8 after each pass of the separable resize, width first, as
            Pillow (which CLIPImageProcessor calls) does; with it the pixels match
            CLIPImageProcessor's to within one grey level on under 0.1% of the pixels (without
            it, the overshoot of bicubic resampling that Pillow clips between its passes stays,
            up to ~20 grey levels on noisy images)
    """

    size: int | tuple[int, int] | None = 224
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, ...] = tuple(float(v) for v in CLIP_MEAN)
    std: tuple[float, ...] = tuple(float(v) for v in CLIP_STD)
    rescale: float | None = 1.0 / 255.0
    normalize: bool = True
    resample: str = "bicubic"
    pil_rounding: bool = True

    @classmethod
    def for_size(cls, size: int) -> "ClipPreprocess":
        """A CLIP trained here: shortest edge and crop `size`, float resize (square images,
        which it was trained on, come out exactly as the CLIP stage saw them)."""
        return cls(size=int(size), crop=(int(size), int(size)), pil_rounding=False)

    @classmethod
    def from_processor_config(cls, d: dict, where: str = "the preprocessor config"
                              ) -> "ClipPreprocess":
        """A transformers CLIPImageProcessor's preprocessor_config.json (a dict) -> the spec;
        a field it cannot follow is refused, naming it."""
        def hw(v, name):
            if isinstance(v, bool):
                raise ValueError(f"{where}: {name} {v!r} is not a size")
            if isinstance(v, (int, float)):
                return int(v), int(v)
            if isinstance(v, dict) and "height" in v and "width" in v and len(v) == 2:
                return int(v["height"]), int(v["width"])
            raise ValueError(f"{where}: {name} {v!r} is not a size this CLIP preprocessing "
                             f"follows (an int or {{'height', 'width'}})")

        size = None
        if d.get("do_resize", True):
            s = d.get("size", {"shortest_edge": 224})
            if isinstance(s, dict) and set(s) == {"shortest_edge"}:
                size = int(s["shortest_edge"])
            elif isinstance(s, (int, float)) and not isinstance(s, bool):
                size = int(s)  # CLIP's processors take an int as the shortest edge
            else:
                size = hw(s, "size")
        crop = hw(d.get("crop_size", 224), "crop_size") if d.get("do_center_crop", True) \
            else None
        resample = d.get("resample", 3)
        if resample not in PIL_RESAMPLE:
            known = ", ".join(f"{k} ({v})" for k, v in PIL_RESAMPLE.items())
            raise ValueError(f"{where}: resample {resample!r} is not one this CLIP preprocessing "
                             f"reproduces ({known})")

        def triple(v, name):
            v = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
            if len(v) != 3:
                raise ValueError(f"{where}: {name} needs 3 values (RGB), got {len(v)}")
            return tuple(v)
        return cls(size=size, crop=crop,
                   mean=triple(d.get("image_mean", CLIP_MEAN.tolist()), "image_mean"),
                   std=triple(d.get("image_std", CLIP_STD.tolist()), "image_std"),
                   rescale=float(d.get("rescale_factor", 1.0 / 255.0))
                   if d.get("do_rescale", True) else None,
                   normalize=bool(d.get("do_normalize", True)),
                   resample=PIL_RESAMPLE[resample], pil_rounding=True)

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after the resize step, as transformers computes it."""
        if self.size is None:
            return h, w
        if not isinstance(self.size, int):
            return tuple(self.size)
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if w <= h else (self.size, new_long)

    def output_shape(self) -> tuple[int, int] | None:
        """(height, width) of every output whatever the input, or None if it depends on it."""
        if self.crop is not None:
            return tuple(self.crop)
        if self.size is not None and not isinstance(self.size, int):
            return tuple(self.size)
        return None


def _resize_hw(x: jax.Array, h: int, w: int, spec: ClipPreprocess) -> jax.Array:
    if not spec.pil_rounding:
        return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), spec.resample, antialias=True)

    def quantise(a):  # Pillow's 8-bit passes round half up and clip
        return jnp.clip(jnp.floor(a + 0.5), 0.0, 255.0)
    if w != x.shape[2]:  # Pillow resamples horizontally first, then vertically
        x = quantise(jax.image.resize(x, (x.shape[0], x.shape[1], w, x.shape[3]), spec.resample,
                                      antialias=True))
    if h != x.shape[1]:
        x = quantise(jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), spec.resample,
                                      antialias=True))
    return x


def _center_crop(x: jax.Array, ch: int, cw: int) -> jax.Array:
    """transformers' centre crop: offsets (size - crop) // 2; a side shorter than the crop is
    zero-padded first (ceil of half the shortfall before it)."""
    h, w = x.shape[1:3]
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (-(-ph // 2), ph - -(-ph // 2)), (-(-pw // 2), pw - -(-pw // 2)),
                        (0, 0)))
        h, w = x.shape[1:3]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top:top + ch, left:left + cw]


def clip_pixels(images_uint8: jax.Array, size: int | ClipPreprocess) -> jax.Array:
    """uint8 [B, H, W, 3] -> CLIP's normalised float pixels [B, h, w, 3] (jit-friendly).

    `size` is a `ClipPreprocess` (a transformers CLIPImageProcessor's steps), or an int for a
    CLIP trained here (`ClipPreprocess.for_size`: the shortest edge resized to it with an
    antialiased bicubic in float, then the centre square)."""
    spec = ClipPreprocess.for_size(size) if isinstance(size, (int, np.integer)) else size
    h, w = images_uint8.shape[1:3]
    nh, nw = spec.resized_shape(h, w)
    x = images_uint8.astype(jnp.float32)
    if spec.pil_rounding:  # resized in 0..255 with Pillow's rounding, then rescaled
        if (nh, nw) != (h, w):
            x = _resize_hw(x, nh, nw, spec)
        if spec.crop is not None:
            x = _center_crop(x, *spec.crop)
        if spec.rescale is not None:
            x = x * spec.rescale
    else:
        if spec.rescale is not None:
            x = x * spec.rescale
        if (nh, nw) != (h, w):
            x = _resize_hw(x, nh, nw, spec)
        if spec.crop is not None:
            x = _center_crop(x, *spec.crop)
    if spec.normalize:
        x = (x - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)
    return x


def to_model_range(images_uint8: jax.Array, size: int | None = None) -> jax.Array:
    """uint8 images -> float in [-1, 1], resized (antialiased bicubic, clipped) to `size` if
    given."""
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    if size is not None and (x.shape[1] != size or x.shape[2] != size):
        x = jnp.clip(_resize_batch(x, size), -1.0, 1.0)
    return x
