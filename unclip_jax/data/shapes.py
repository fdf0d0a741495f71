"""The shapes world: the project's embedded, procedurally generated captioned-image dataset.

Nothing is downloaded: every image is rendered from a small symbolic :class:`Scene` (one to three
flat-coloured shapes on a plain background, each centred in one cell of a 3x3 grid), and every
caption is generated from the same scene, so captions are true by construction and an image can be
checked against its prompt by :mod:`unclip_jax.shapes_demo.analyse`.

Vocabulary (all exported as module-level constants)::

    PALETTE     name -> RGB, six colours far apart in RGB (min pairwise distance ~120)
    BACKGROUND  the plain background colour (dark grey, not in the palette)
    SHAPES      ('circle', 'square', 'triangle')       triangle = isosceles, apex up
    SIZES       {'small': 12, 'large': 18}              side / diameter in pixels at 64x64
    CELLS       the nine grid cells, row-major: 'top left', 'top', ..., 'bottom right'
    HELDOUT_PAIRS  colour-shape pairs that never occur in 'train' / 'test' and occur (in at least
                   one object of every scene) in 'heldout': compositional generalisation.

Splits of :func:`generate`: ``'train'`` and ``'test'`` draw from the seen pairs only, from different
random streams (seeded by ``(seed, split)``); ``'heldout'`` scenes contain at least one held-out pair.
The scene space is finite (a single object has 6*3*2*9 = 324 variants), so individual scenes
recur across and within splits; the streams, not the scenes, are disjoint.

This module needs only numpy (Pillow is used for optional resizing); importing it is fast.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

#: Colour name -> RGB.  Chosen far apart so that nearest-palette classification is robust.
PALETTE: "OrderedDict[str, tuple[int, int, int]]" = OrderedDict(
    [
        ("red", (225, 30, 30)),
        ("orange", (250, 140, 20)),
        ("yellow", (240, 235, 50)),
        ("green", (40, 190, 60)),
        ("blue", (40, 80, 235)),
        ("purple", (165, 55, 215)),
    ]
)
COLORS: tuple[str, ...] = tuple(PALETTE)

#: Background colour (plain dark grey; far from every palette entry).
BACKGROUND: tuple[int, int, int] = (28, 28, 32)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Object extent (square side, circle diameter, triangle base = height) in pixels at the reference
#: resolution ``REFERENCE_SIZE``; scaled linearly for other image sizes (see :func:`size_in_pixels`).
#: A grid cell is 64/3 = 21.3 px, so two large objects in adjacent cells are >= 3 px apart.
REFERENCE_SIZE = 64
SIZES: "OrderedDict[str, int]" = OrderedDict([("small", 12), ("large", 18)])

#: The 3x3 grid, row-major.  ``CELL_RC[name] = (row, col)``.
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
CELL_RC: dict[str, tuple[int, int]] = {c: divmod(i, 3) for i, c in enumerate(CELLS)}
#: How each cell reads after a noun: "a red circle <phrase>".
CELL_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}

#: Spatial relations "A <rel> B", and their inverses.
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

#: Colour-shape pairs withheld from 'train' and 'test'.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("yellow", "square"),
)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS
)
SPLITS: tuple[str, ...] = ("train", "test", "heldout")
MAX_OBJECTS = 3


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object: ``shape`` in SHAPES, ``color`` in PALETTE, ``size`` in SIZES, ``cell`` in CELLS."""

    shape: str
    color: str
    size: str
    cell: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLORS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")
        if self.cell not in CELL_RC:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {CELLS}")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ShapeObject":
        if isinstance(d, ShapeObject):
            return d
        return cls(shape=d["shape"], color=d["color"], size=d["size"], cell=d["cell"])


@dataclasses.dataclass(frozen=True)
class Scene:
    """An ordered tuple of objects in distinct cells with distinct colour-shape pairs."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self):
        objs = tuple(ShapeObject.from_dict(o) for o in self.objects)
        object.__setattr__(self, "objects", objs)
        if not 1 <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1..{MAX_OBJECTS} objects, got {len(objs)}")
        if len({o.cell for o in objs}) != len(objs):
            raise ValueError("two objects share a cell")
        if len({o.pair for o in objs}) != len(objs):
            raise ValueError("two objects share a colour-shape pair")

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d) -> "Scene":
        """Accepts a Scene, a dict ``{'objects': [...]}``, its JSON string, or a list of objects."""
        if isinstance(d, Scene):
            return d
        if isinstance(d, (str, bytes)):
            d = json.loads(d)
        if isinstance(d, dict):
            d = d["objects"]
        return cls(tuple(ShapeObject.from_dict(o) for o in d))

    @property
    def has_heldout(self) -> bool:
        return any(o.pair in HELDOUT_PAIRS for o in self.objects)


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """The canonical true spatial relation "a <rel> b": horizontal when the columns differ, else
    vertical.  Returns a key of RELATIONS."""
    (ra, ca), (rb, cb) = CELL_RC[a.cell], CELL_RC[b.cell]
    if ca != cb:
        return "left of" if ca < cb else "right of"
    if ra != rb:
        return "above" if ra < rb else "below"
    raise ValueError("objects share a cell")


def true_relations(a: ShapeObject, b: ShapeObject) -> list[str]:
    """Every relation in RELATIONS that holds for "a <rel> b" (one or two of them)."""
    (ra, ca), (rb, cb) = CELL_RC[a.cell], CELL_RC[b.cell]
    out = []
    if ca != cb:
        out.append("left of" if ca < cb else "right of")
    if ra != rb:
        out.append("above" if ra < rb else "below")
    return out


def relation_holds(rel: str, cell_a: str, cell_b: str) -> bool:
    """Whether "object in cell_a <rel> object in cell_b" is true."""
    (ra, ca), (rb, cb) = CELL_RC[cell_a], CELL_RC[cell_b]
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def size_in_pixels(size: str, image_size: int = REFERENCE_SIZE) -> float:
    """Object extent in pixels at ``image_size``."""
    return SIZES[size] * image_size / REFERENCE_SIZE


def cell_center(cell: str, image_size: int = REFERENCE_SIZE) -> tuple[float, float]:
    """(x, y) of a cell's centre in continuous pixel coordinates (pixel i spans [i, i+1))."""
    r, c = CELL_RC[cell]
    step = image_size / 3.0
    return (c + 0.5) * step, (r + 0.5) * step


def shape_mask(shape: str, cx: float, cy: float, extent: float, xs: np.ndarray, ys: np.ndarray
               ) -> np.ndarray:
    """Boolean mask of ``shape`` with bounding box ``extent`` x ``extent`` centred at (cx, cy),
    evaluated at the points (xs, ys) (broadcast)."""
    h = extent / 2.0
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Apex at (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h).
        t = (dy + h) / (2.0 * h)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene, image_size: int = 64, supersample: int = 4) -> np.ndarray:
    """Render a scene to a ``uint8 [image_size, image_size, 3]`` array.

    Deterministic (pure numpy).  Edges are mildly anti-aliased: each pixel averages
    ``supersample`` x ``supersample`` sub-pixel samples, so a pixel's colour is the area-weighted mix
    of shape and background (the same image as rendering at ``supersample`` times the size and
    BOX-downsampling); shapes keep their geometry at 32x32, where hard edges would turn a 9-pixel
    circle into a near-square.  ``supersample=1`` gives hard edges (a pixel belongs to a shape iff
    its centre does).
    """
    scene = Scene.from_dict(scene)
    k = int(supersample)
    n = image_size * k
    coords = (np.arange(n, dtype=np.float64) + 0.5) / k
    xs, ys = coords[None, :], coords[:, None]
    img = np.empty((n, n, 3), dtype=np.float64)
    img[:] = BACKGROUND
    for o in scene.objects:
        cx, cy = cell_center(o.cell, image_size)
        m = shape_mask(o.shape, cx, cy, size_in_pixels(o.size, image_size), xs, ys)
        img[m] = PALETTE[o.color]
    if k > 1:
        img = img.reshape(image_size, k, image_size, k, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, image_size: int, resample: str = "box") -> np.ndarray:
    """Resize a uint8 HxWx3 image (:func:`unclip_jax.images.resize`)."""
    from unclip_jax.images import resize as _resize

    return _resize(image, image_size, resample)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _np(o: ShapeObject, size: bool = True) -> str:
    """Noun phrase with its indefinite article: 'a small red circle', 'an orange square'."""
    phrase = f"{o.size} {o.color} {o.shape}" if size else f"{o.color} {o.shape}"
    return _a(phrase)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def captions(scene) -> list[str]:
    """Several true captions of a scene; the first is :func:`canonical_caption`.

    Single object: size, colour, shape and cell.  Two objects: colour, shape (and size) of both and
    a true spatial relation (the canonical one first; others and relation-free variants follow).
    Three objects: each object with its cell.
    """
    scene = Scene.from_dict(scene)
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        where = CELL_PHRASES[o.cell]
        return [
            f"{_np(o)} {where}",
            f"{_a(o.color)} {o.shape}, {o.size}, {o.cell}",
            f"{o.size} {o.color} {o.shape} {where}",
            f"there is {_np(o)} {where}",
            f"{_a(o.size)} {o.shape} {where}, colored {o.color}",
            f"{_np(o, False)} {where}",
        ]
    if len(objs) == 2:
        a, b = objs
        rel = relation(a, b)
        out = [
            f"{_np(a)} {RELATIONS[rel]} {_np(b)}",
            f"{_np(b)} {RELATIONS[INVERSE_RELATION[rel]]} {_np(a)}",
            f"{_np(a, False)} {RELATIONS[rel]} {_np(b, False)}",
        ]
        for r in true_relations(a, b):
            if r != rel:
                out.append(f"{_np(a)} {RELATIONS[r]} {_np(b)}")
                out.append(f"{_np(b)} {RELATIONS[INVERSE_RELATION[r]]} {_np(a)}")
        out += [
            f"{_np(a)} and {_np(b)}",
            f"{_np(a)} {CELL_PHRASES[a.cell]} and {_np(b)} {CELL_PHRASES[b.cell]}",
        ]
        return out
    parts = [f"{_np(o)} {CELL_PHRASES[o.cell]}" for o in objs]
    listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    return [listing, ", ".join(f"{_np(o)}" for o in objs[:-1]) + f" and {_np(objs[-1])}"]


def canonical_caption(scene) -> str:
    """The first caption template: the prompt used in evaluation."""
    return captions(scene)[0]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, num_objects: int | None = None,
                 allowed: str = "seen") -> Scene:
    """Draw a random scene.

    Args:
      rng: numpy Generator (the only source of randomness).
      num_objects: 1..MAX_OBJECTS; ``None`` draws 1 or 2 with equal probability.
      allowed: ``'seen'`` (only SEEN_PAIRS: the train/test distribution), ``'heldout'`` (at least
        one object, at a random position in the scene, has a HELDOUT_PAIRS pair; the others are
        any pair) or ``'any'``.
    """
    if num_objects is None:
        num_objects = int(rng.integers(1, 3))
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}")
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    if allowed == "seen":
        pools = [list(SEEN_PAIRS)] * num_objects
    elif allowed == "any":
        pools = [all_pairs] * num_objects
    elif allowed == "heldout":
        pools = [all_pairs] * num_objects
        pools[int(rng.integers(num_objects))] = list(HELDOUT_PAIRS)
    else:
        raise ValueError(f"allowed must be 'seen', 'heldout' or 'any', got {allowed!r}")
    cells = rng.choice(len(CELLS), size=num_objects, replace=False)
    sizes = rng.integers(len(SIZES), size=num_objects)
    objs, used = [], set()
    for i in range(num_objects):
        pool = [p for p in pools[i] if p not in used]
        color, shape = pool[int(rng.integers(len(pool)))]
        used.add((color, shape))
        objs.append(ShapeObject(shape=shape, color=color, size=list(SIZES)[int(sizes[i])],
                                cell=CELLS[int(cells[i])]))
    return Scene(tuple(objs))


_SPLIT_CODE = {"train": 0, "test": 1, "heldout": 2}


def split_rng(split: str, seed: int) -> np.random.Generator:
    """The random stream of a split: independent for every (split, seed)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A17E5, _SPLIT_CODE[split]]))


def sample_scenes(split: str, n: int, seed: int = 0) -> list[Scene]:
    """The first ``n`` scenes of a split's stream (cheap: no rendering)."""
    rng = split_rng(split, seed)
    allowed = "heldout" if split == "heldout" else "seen"
    return [sample_scene(rng, allowed=allowed) for _ in range(n)]


def example(scene, image_size: int = 64, rng: np.random.Generator | None = None) -> dict:
    """One example dict for a scene; ``caption`` is drawn from ``captions`` with ``rng`` (the
    canonical caption when ``rng`` is None)."""
    scene = Scene.from_dict(scene)
    caps = captions(scene)
    cap = caps[0] if rng is None else caps[int(rng.integers(len(caps)))]
    return {
        "image": render(scene, image_size),
        "caption": cap,
        "captions": caps,
        "scene": scene.to_dict(),
    }


def generate(split: str, n: int, seed: int = 0, image_size: int = 64) -> Iterator[dict]:
    """Yield ``n`` examples ``dict(image=uint8 [S,S,3], caption=str, captions=list[str],
    scene=json-able dict)``; deterministic in ``(split, seed)`` (and independent of ``image_size``
    for the scenes and captions).  ``caption`` is a random template of the scene; ``captions`` lists
    all of them (the first is canonical)."""
    rng = split_rng(split, seed)
    cap_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCA9, _SPLIT_CODE[split]]))
    allowed = "heldout" if split == "heldout" else "seen"
    for _ in range(int(n)):
        yield example(sample_scene(rng, allowed=allowed), image_size, cap_rng)


# --------------------------------------------------------------------------------------------
# Evaluation prompts
# --------------------------------------------------------------------------------------------

_EVAL_SCENES: tuple[tuple[str, tuple[tuple[str, str, str, str], ...]], ...] = (
    # kind, ((shape, color, size, cell), ...)
    ("single", (("circle", "red", "large", "center"),)),
    ("single", (("square", "green", "small", "top left"),)),
    ("single", (("triangle", "blue", "large", "bottom right"),)),
    ("single", (("circle", "yellow", "small", "right"),)),
    ("single", (("square", "purple", "large", "bottom"),)),
    ("single", (("triangle", "orange", "small", "top"),)),
    ("two", (("square", "blue", "large", "left"), ("triangle", "green", "large", "right"))),
    ("two", (("circle", "orange", "small", "top"), ("square", "red", "large", "bottom"))),
    ("two", (("triangle", "purple", "large", "top left"), ("circle", "green", "small", "center"))),
    ("two", (("circle", "yellow", "large", "bottom right"), ("triangle", "blue", "small", "bottom left"))),
    ("heldout", (("triangle", "red", "large", "center"),)),
    ("heldout", (("circle", "blue", "small", "top right"),)),
    ("heldout", (("square", "yellow", "large", "left"),)),
    ("heldout", (("triangle", "red", "small", "left"), ("square", "green", "large", "right"))),
    ("heldout", (("circle", "blue", "large", "top"), ("circle", "orange", "small", "bottom"))),
    ("heldout", (("square", "yellow", "small", "bottom left"), ("triangle", "purple", "large", "top right"))),
)


def prompts_for_eval() -> list[dict]:
    """A fixed list of evaluation prompts: ``dict(prompt, scene: Scene, kind)`` with kind in
    'single' (one seen object), 'two' (two seen objects and a relation) and 'heldout' (contains a
    held-out colour-shape pair).  ``prompt`` is the scene's canonical caption."""
    out = []
    for kind, objs in _EVAL_SCENES:
        scene = Scene(tuple(ShapeObject(*o) for o in objs))
        out.append({"prompt": canonical_caption(scene), "scene": scene, "kind": kind})
    return out


__all__ = [
    "PALETTE", "COLORS", "BACKGROUND", "SHAPES", "SIZES", "REFERENCE_SIZE", "CELLS", "CELL_RC",
    "CELL_PHRASES", "RELATIONS", "INVERSE_RELATION", "HELDOUT_PAIRS", "SEEN_PAIRS", "SPLITS",
    "MAX_OBJECTS", "ShapeObject", "Scene", "relation", "true_relations", "relation_holds",
    "size_in_pixels", "cell_center", "shape_mask", "render", "resize", "captions",
    "canonical_caption", "sample_scene", "split_rng", "sample_scenes", "example", "generate",
    "prompts_for_eval",
]
