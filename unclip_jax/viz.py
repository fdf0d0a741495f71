"""Pictures: image grids with a caption under each image, written as PNG."""
from __future__ import annotations

import os
import textwrap
from typing import Sequence

from unclip_jax.images import to_uint8


def make_grid(images, captions: Sequence[str] | None = None, cols: int | None = None,
              cell: int | None = None, pad: int = 4, title: str | None = None):
    """A PIL image: the images on a grid, each with its caption (wrapped) underneath.

    `cell` resizes every image to cell x cell pixels (nearest, so small generated images stay
    crisp); by default images are shown at their size, at least 96 px.
    """
    from PIL import Image, ImageDraw, ImageFont

    imgs = to_uint8(images)
    n, h, w, _ = imgs.shape
    cols = cols or min(n, 8)
    rows = (n + cols - 1) // cols
    cell = cell or max(h, 96)
    font = ImageFont.load_default()
    chars = max(8, cell // 6)
    wrapped = [textwrap.wrap(c, chars)[:4] if c else [] for c in (captions or [""] * n)]
    line_h = 11
    text_h = line_h * max((len(x) for x in wrapped), default=0)
    title_h = 2 * line_h if title else 0
    W = cols * (cell + pad) + pad
    H = title_h + rows * (cell + text_h + 2 * pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=(160, 0, 0), font=font)
    for i in range(n):
        r, c = divmod(i, cols)
        x0 = pad + c * (cell + pad)
        y0 = title_h + pad + r * (cell + text_h + 2 * pad)
        tile = Image.fromarray(imgs[i]).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        for j, line in enumerate(wrapped[i]):
            draw.text((x0, y0 + cell + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def save_grid(path: str, images, captions=None, **kw) -> str:
    """Write the grid to `path` (PNG), refusing to overwrite a non-file; returns the path."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory")
    make_grid(images, captions, **kw).save(path, format="PNG")
    return path
