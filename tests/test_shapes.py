"""The shapes world (unclip_jax.data.shapes), its analyser and its TFDS builder."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from unclip_jax.shapes_demo import analyse as A
from unclip_jax.data import shapes as S
from unclip_jax.data import shapes_tfds as T


def _eval_scenes():
    """Train, held-out and three-object scenes: every colour, shape, size and cell occurs."""
    rng = np.random.default_rng(123)
    return (S.sample_scenes("train", 200, seed=7) + S.sample_scenes("heldout", 80, seed=7)
            + [S.sample_scene(rng, num_objects=3, allowed="any") for _ in range(40)])


def _noisy(image, sigma, seed=0):
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Constants and scenes
# ---------------------------------------------------------------------------------------------


def test_constants_exported():
    assert len(S.PALETTE) >= 6 and list(S.PALETTE)[:3] == ["red", "orange", "yellow"]
    cols = np.array(list(S.PALETTE.values()), float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(cols, 2)]
    assert min(dists) >= 90, "palette colours must be far apart"
    assert tuple(S.BACKGROUND) not in set(S.PALETTE.values())
    assert np.linalg.norm(cols - np.array(S.BACKGROUND), axis=1).min() >= 150
    assert S.SHAPES == ("circle", "square", "triangle")
    assert set(S.SIZES) == {"small", "large"} and S.SIZES["small"] < S.SIZES["large"]
    assert len(S.CELLS) == 9 and len(set(S.CELLS)) == 9 and S.CELLS[4] == "center"
    assert set(S.CELL_PHRASES) == set(S.CELLS)
    all_pairs = set(itertools.product(S.PALETTE, S.SHAPES))
    assert set(S.HELDOUT_PAIRS) <= all_pairs
    assert set(S.SEEN_PAIRS) == all_pairs - set(S.HELDOUT_PAIRS)
    # Two large objects in adjacent cells keep a visible gap, even at 32x32.
    assert S.REFERENCE_SIZE / 3 - S.SIZES["large"] >= 3


def test_scene_validation_and_roundtrip():
    a = S.ShapeObject("circle", "red", "small", "top left")
    b = S.ShapeObject("square", "blue", "large", "center")
    scene = S.Scene((a, b))
    assert S.Scene.from_dict(scene.to_dict()) == scene
    assert S.Scene.from_dict(scene.to_json()) == scene
    assert S.Scene.from_dict([a.to_dict(), b.to_dict()]) == scene
    json.dumps(scene.to_dict())
    with pytest.raises(ValueError):
        S.Scene((a, S.ShapeObject("square", "blue", "large", "top left")))  # shared cell
    with pytest.raises(ValueError):
        S.Scene((a, S.ShapeObject("circle", "red", "large", "center")))  # same colour-shape
    with pytest.raises(ValueError):
        S.ShapeObject("hexagon", "red", "small", "top")
    with pytest.raises(ValueError):
        S.ShapeObject("circle", "pink", "small", "top")


def test_render_places_objects_in_cells():
    scene = S.Scene((S.ShapeObject("square", "green", "large", "top left"),
                     S.ShapeObject("circle", "purple", "small", "bottom right")))
    for size in (64, 32):
        img = S.render(scene, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert tuple(img[size // 2, size // 2]) == S.BACKGROUND  # empty centre cell
        for o in scene.objects:
            cx, cy = S.cell_center(o.cell, size)
            assert tuple(img[int(cy), int(cx)]) == S.PALETTE[o.color]
    hard = S.render(scene, 64, supersample=1)
    colours = {tuple(c) for c in hard.reshape(-1, 3)}
    assert colours == {S.BACKGROUND, S.PALETTE["green"], S.PALETTE["purple"]}
    assert np.array_equal(S.render(scene, 64), S.render(scene, 64))


def test_captions_are_true():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = S.sample_scene(rng, allowed="any")
        caps = S.captions(scene)
        assert caps[0] == S.canonical_caption(scene) and len(set(caps)) == len(caps)
        canon = caps[0]
        for o in scene.objects:
            assert f"{o.size} {o.color} {o.shape}" in canon
        if len(scene.objects) == 1:
            assert S.CELL_PHRASES[scene.objects[0].cell] in canon
        else:
            a, b = scene.objects
            rel = S.relation(a, b)
            assert S.RELATIONS[rel] in canon and S.relation_holds(rel, a.cell, b.cell)
            for r in S.true_relations(a, b):
                assert S.relation_holds(r, a.cell, b.cell)
        for c in caps:
            assert " a o" not in f" {c}" and not c.startswith("a o")  # "an orange"
    one = S.Scene((S.ShapeObject("circle", "red", "small", "top left"),))
    assert S.canonical_caption(one) == "a small red circle in the top left"
    two = S.Scene((S.ShapeObject("square", "blue", "large", "left"),
                   S.ShapeObject("triangle", "green", "small", "center")))
    assert S.canonical_caption(two) == "a large blue square to the left of a small green triangle"


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def test_generate_is_deterministic():
    a = list(S.generate("train", 12, seed=3))
    b = list(S.generate("train", 12, seed=3))
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["captions"] == y["captions"]
        assert x["scene"] == y["scene"]
        assert x["caption"] in x["captions"]
        assert S.Scene.from_dict(x["scene"]) is not None and json.dumps(x["scene"])
    test = list(S.generate("test", 12, seed=3))
    other = list(S.generate("train", 12, seed=4))
    assert [e["scene"] for e in test] != [e["scene"] for e in a]
    assert [e["scene"] for e in other] != [e["scene"] for e in a]
    # Scenes and captions do not depend on the image size.
    small = list(S.generate("train", 12, seed=3, image_size=32))
    assert [e["caption"] for e in small] == [e["caption"] for e in a]
    assert small[0]["image"].shape == (32, 32, 3)


def test_heldout_pairs_split():
    held = set(S.HELDOUT_PAIRS)
    for split in ("train", "test"):
        scenes = S.sample_scenes(split, 2000, seed=0)
        assert not any(o.pair in held for sc in scenes for o in sc.objects)
        assert {len(sc.objects) for sc in scenes} == {1, 2}
    scenes = S.sample_scenes("heldout", 500, seed=0)
    assert all(sc.has_heldout for sc in scenes)
    assert {o.pair for sc in scenes for o in sc.objects} >= held
    # sample_scenes and generate follow the same stream.
    gen = [S.Scene.from_dict(e["scene"]) for e in S.generate("heldout", 20, seed=0)]
    assert gen == scenes[:20]


def test_prompts_for_eval():
    prompts = S.prompts_for_eval()
    assert {p["kind"] for p in prompts} == {"single", "two", "heldout"}
    for p in prompts:
        assert p["prompt"] == S.canonical_caption(p["scene"])
        assert p["scene"].has_heldout == (p["kind"] == "heldout")
        assert len(p["scene"].objects) == (1 if p["kind"] == "single" else
                                           2 if p["kind"] == "two" else len(p["scene"].objects))
        for size in (64, 32):
            assert A.check(S.render(p["scene"], size), p["scene"])["all"], (p["prompt"], size)


# ---------------------------------------------------------------------------------------------
# Analyser
# ---------------------------------------------------------------------------------------------


def test_connected_components():
    mask = np.zeros((8, 10), bool)
    mask[1:3, 1:4] = True
    mask[5:7, 2] = True
    mask[3, 8] = True
    mask[0, 9] = mask[1, 9] = True  # touches (3, 8) only diagonally: separate with 4-connectivity
    labels, n = A.connected_components(mask)
    assert n == 4 and np.all((labels >= 0) == mask)
    spiral = np.zeros((15, 15), bool)  # a long path needs many propagation steps
    spiral[0, :] = spiral[:, 14] = spiral[14, :] = spiral[2:, 0] = spiral[2, :13] = True
    spiral[2:13, 12] = spiral[12, 2:12] = True
    labels, n = A.connected_components(spiral)
    assert n == 1
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((32, 32)) < 0.55
        labels, n = A.connected_components(m)
        ref, rn = ndimage.label(m)
        assert n == rn
        # Same partition: labels correspond one-to-one.
        pairs = set(zip(labels[m].tolist(), ref[m].tolist()))
        assert len(pairs) == n


@pytest.mark.parametrize("name", ["64", "64 hard edges", "32", "32 box", "32 bilinear"])
def test_analyser_reads_rendered_scenes(name):
    make = {
        "64": lambda sc: S.render(sc, 64),
        "64 hard edges": lambda sc: S.render(sc, 64, supersample=1),
        "32": lambda sc: S.render(sc, 32),
        "32 box": lambda sc: S.resize(S.render(sc, 64), 32, "box"),
        "32 bilinear": lambda sc: S.resize(S.render(sc, 64), 32, "bilinear"),
    }[name]
    scenes = _eval_scenes()
    scores = A.score([make(sc) for sc in scenes], scenes)
    print(name, scores)
    assert scores["all"] >= 0.99, scores
    # Per-object readings, not only the check, match the scene.
    sc = scenes[0]
    det = A.analyse(make(sc))
    assert [(d["shape"], d["color"], d["size"], d["cell"]) for d in det] == sorted(
        [(o.shape, o.color, o.size, o.cell) for o in sc.objects], key=lambda t: S.CELLS.index(t[3]))


def test_analyser_is_robust_to_noise_blur_and_colour_shift():
    scenes = _eval_scenes()[::2]
    cases = {
        "64 noise 30": [_noisy(S.render(sc, 64), 30, i) for i, sc in enumerate(scenes)],
        "32 noise 20": [_noisy(S.resize(S.render(sc, 64), 32), 20, i) for i, sc in enumerate(scenes)],
        "32 blur 0.7": [np.asarray(Image.fromarray(S.render(sc, 32)).filter(
            ImageFilter.GaussianBlur(0.7))) for sc in scenes],
        "32 colour shift": [np.clip(S.render(sc, 32).astype(int) + [25, -20, 15], 0, 255
                                    ).astype(np.uint8) for sc in scenes],
    }
    for name, images in cases.items():
        scores = A.score(images, scenes)
        print(name, scores)
        assert scores["all"] >= 0.95, (name, scores)
    # Float images in [0, 1] are accepted.
    assert A.check(S.render(scenes[0], 32) / 255.0, scenes[0])["all"]


def test_check_detects_mismatches():
    a = S.ShapeObject("square", "blue", "large", "left")
    b = S.ShapeObject("triangle", "green", "small", "right")
    img = S.render(S.Scene((a, b)), 32)
    assert all(A.check(img, S.Scene((a, b))).values())
    assert all(A.check(img, [b.to_dict(), a.to_dict()], position="cell").values())
    r = A.check(img, S.Scene((S.ShapeObject("square", "red", "large", "left"), b)))
    assert not r["color"] and not r["binding"] and not r["all"] and r["shape"] and r["count"]
    r = A.check(img, S.Scene((S.ShapeObject("circle", "blue", "large", "left"), b)))
    assert not r["shape"] and not r["all"] and r["color"]
    # A misread shape still has its placement and size scored (matched by colour) ...
    assert r["position"] and r["size"] and not r["binding"]
    r = A.check(img, S.Scene((S.ShapeObject("circle", "blue", "large", "center"), b)),
                position="cell")
    assert not r["position"]
    # ... but not an absent colour.
    r = A.check(img, S.Scene((S.ShapeObject("square", "red", "large", "left"),)))
    assert not r["position"] and not r["size"]
    r = A.check(img, S.Scene((S.ShapeObject("square", "blue", "small", "left"), b)))
    assert not r["size"] and not r["all"] and r["binding"] and r["position"]
    # Swapped colours: every colour and shape is present, but bound wrongly.
    r = A.check(img, S.Scene((S.ShapeObject("square", "green", "large", "left"),
                              S.ShapeObject("triangle", "blue", "small", "right"))))
    assert r["color"] and r["shape"] and not r["binding"] and not r["all"]
    # Relation: "blue square right of green triangle" is false; cells need not match exactly.
    r = A.check(img, S.Scene((S.ShapeObject("square", "blue", "large", "right"),
                              S.ShapeObject("triangle", "green", "small", "left"))))
    assert not r["position"] and not r["all"]
    r = A.check(img, S.Scene((S.ShapeObject("square", "blue", "large", "top left"),
                              S.ShapeObject("triangle", "green", "small", "center"))))
    assert r["position"] and r["all"]
    assert not A.check(img, S.Scene((S.ShapeObject("square", "blue", "large", "top left"),
                                     S.ShapeObject("triangle", "green", "small", "center"))),
                       position="cell")["position"]
    r = A.check(img, S.Scene((a,)))
    assert not r["count"] and not r["all"] and r["binding"] and r["position"]


def test_analyser_on_blank_and_noise():
    keys = set(A.CHECK_KEYS)
    scene = S.sample_scenes("train", 1, seed=0)[0]
    rng = np.random.default_rng(0)
    for size in (64, 32):
        images = [
            np.full((size, size, 3), S.BACKGROUND, np.uint8),
            np.zeros((size, size, 3), np.uint8),
            np.full((size, size, 3), 255, np.uint8),
            np.full((size, size, 3), S.PALETTE["red"], np.uint8),  # one colour everywhere
            rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            np.clip(rng.normal(128, 60, (size, size, 3)), 0, 255).astype(np.uint8),
            rng.random((size, size, 3)),
        ]
        for img in images:
            assert A.analyse(img) == []
            r = A.check(img, scene)
            assert set(r) == keys and not any(r.values())
    assert A.analyse(np.zeros((1, 1, 3), np.uint8)) == []
    with pytest.raises(ValueError):
        A.analyse(np.zeros((8, 8), np.uint8))


# ---------------------------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------------------------


def test_as_numpy():
    d = T.as_numpy("test", 6, seed=2, image_size=32)
    assert d["image"].shape == (6, 32, 32, 3) and d["image"].dtype == np.uint8
    ref = list(S.generate("test", 6, seed=2, image_size=32))
    assert np.array_equal(d["image"], np.stack([e["image"] for e in ref]))
    assert list(d["caption"]) == [e["caption"] for e in ref]
    assert d["captions"] == [e["captions"] for e in ref]
    assert [json.loads(s) for s in d["scene"]] == [e["scene"] for e in ref]


def test_imports_stay_light():
    code = ("import sys, unclip_jax.data.shapes, unclip_jax.shapes_demo.analyse, "
            "unclip_jax.data.shapes_tfds; "
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'jax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tfds_builder_builds_and_reads_back(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = T.get_builder(str(tmp_path), train_size=16, test_size=8, heldout_size=8)
    assert builder.name == "unclip_shapes" and str(builder.version) == "1.0.0"
    builder.download_and_prepare()
    splits = builder.info.splits
    assert {k: splits[k].num_examples for k in ("train", "test", "heldout")} == {
        "train": 16, "test": 8, "heldout": 8}
    held = list(tfds.as_numpy(builder.as_dataset(split="heldout")))
    assert len(held) == 8
    for ex in held:
        assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
        scene = S.Scene.from_dict(json.loads(ex["scene"].decode()))
        assert scene.has_heldout
        assert ex["caption"].decode() in [c.decode() for c in ex["captions"]]
        assert np.array_equal(ex["image"], S.render(scene, 64))
    train = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert sorted(json.loads(e["scene"].decode())["objects"][0]["cell"] for e in train) == sorted(
        e["scene"]["objects"][0]["cell"] for e in S.generate("train", 16, seed=0))


def test_background_noise_closed_form():
    """A rendered scene's background is flat (0); a known offset / noise on the background
    pixels reads back as its mean absolute value; object pixels do not count."""
    img = S.render(S.sample_scenes("test", 1, seed=4)[0], 64)
    assert A.background_noise(img) < 0.5
    mask = A.background_mask(img)
    assert 0.3 < mask.mean() < 0.99
    shifted = img.astype(np.int64)
    shifted[mask] += 10
    assert abs(A.background_noise(np.clip(shifted, 0, 255).astype(np.uint8)) - 10.0) < 1e-9
    rng = np.random.default_rng(0)
    noise = rng.integers(-6, 7, size=img.shape)
    noisy = np.clip(img.astype(np.int64) + np.where(mask[..., None], noise, 0), 0, 255)
    want = np.mean(np.abs(noisy[mask] - np.asarray(S.BACKGROUND)))
    got = A.background_noise(noisy.astype(np.uint8))
    assert abs(got - want) < 0.2 and 2.5 < got < 4.0  # E|U{-6..6}| = 42/13 = 3.23
