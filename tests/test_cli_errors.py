"""Every bad input of the CLI ends in one line, `unclip-jax <command>: error: <message>`, naming
the culprit, with a non-zero exit and no file of the workdir touched; outputs are checked before
any loading, sampling or training; `sample` works in bounded chunks whose images do not depend on
the batch size (issue 19, items 2-4)."""
import hashlib
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import cli
from unclip_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["total_steps=4", "data.num_examples=64", "log_every=2"]  # as tests/test_workdir.py
FAST = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2", "--quiet"]
CLIP_TINY = os.path.join(ROOT, "configs", "clip.py") + ":size=tiny"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tiny trained stack (every stage, 4 steps), shared by the module and never modified:
    the tests that break a workdir break a copy."""
    from unclip_jax.shapes_demo.run import train_stack

    w = str(tmp_path_factory.mktemp("stack"))
    train_stack(w, "tiny", TINY, progress=False)
    return w


def tree_hash(root) -> dict:
    """{relative path: sha256} of every file under `root` (the directories too, as None)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = None
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fails(capsys, argv, command, *needles, trees=(), rc=None):
    """Run the CLI in-process; assert a non-zero exit, exactly one stderr line
    `unclip-jax <command>: error: ...` holding every needle, and the trees unchanged."""
    before = [tree_hash(t) for t in trees]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    if rc is not None:
        assert code == rc
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(rf"unclip-jax {command}: error: \S.*", lines[0]), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    for t, h in zip(trees, before):
        assert tree_hash(t) == h, f"{t} changed"
    return lines[0]


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Loading a pipeline, building or training a stage, or reading an image fails the test:
    what is refused must be refused before any of that. (In tmp_path: a default --out lands
    there.)"""
    from unclip_jax import images, pipeline, stages
    from unclip_jax.train import trainer

    monkeypatch.chdir(tmp_path)
    def boom(*a, **k):
        raise AssertionError("work started before the bad input was refused")
    for obj, name in ((pipeline.UnCLIPPipeline, "from_workdir"),
                      (pipeline.UnCLIPPipeline, "from_diffusers"), (stages, "build_stage"),
                      (trainer, "train"), (images, "load_image")):
        monkeypatch.setattr(obj, name, boom)


def copy_stack(stack, dest):
    shutil.copytree(stack, dest, ignore=shutil.ignore_patterns("data", "tb"))
    return str(dest)


def png(path, w=8, h=8):
    from PIL import Image

    Image.new("RGB", (w, h), (200, 10, 10)).save(path)
    return str(path)


def bare_png(path, w, h):
    """A PNG whose header claims w x h (Pillow refuses to decode such sizes before it reads
    the pixels, so the file stays tiny)."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ------------------------------------------------------------------------------ train --config
def test_bad_config_paths(tmp_path, capsys, no_work):
    w = tmp_path / "w"
    w.mkdir()
    (w / "keep.txt").write_text("x")
    (tmp_path / "c.json").write_text('{"stage": "prior"}')
    (tmp_path / "dict_config.py").write_text("def get_config(arg=None):\n"
                                             "    return {'stage': 'prior'}\n")
    cases = [(os.path.join(ROOT, "configs"), ["is a directory", "configs"]),
             (tmp_path / "c.json", ["c.json", "is not a .py file"]),
             (tmp_path / "missing.py", ["no config file", "missing.py"]),
             (tmp_path / "dict_config.py", ["dict_config.py", "returned a dict",
                                            "ml_collections.ConfigDict"])]
    for config, needles in cases:
        fails(capsys, ["train", "--config", config, "--workdir", w], "train", *needles,
              trees=[w], rc=1)


# ------------------------------------------------------------------------------ broken workdirs
def _swap(w):
    os.rename(os.path.join(w, "prior"), os.path.join(w, "tmp"))
    os.rename(os.path.join(w, "decoder"), os.path.join(w, "prior"))
    os.rename(os.path.join(w, "tmp"), os.path.join(w, "decoder"))


def _write_record(text):
    def f(w):
        with open(os.path.join(w, "decoder", "config.json"), "wb") as fh:
            fh.write(text)
    return f


def _other_architecture(w):
    p = os.path.join(w, "decoder", "config.json")
    rec = json.load(open(p))
    rec["model"]["unet"]["block_out_channels"] = [16, 48]  # the checkpoint has [16, 32]
    json.dump(rec, open(p, "w"))


@pytest.mark.parametrize("breakage,needles", [
    (_swap, ["prior/config.json", "records a 'decoder' stage", "swapped"]),
    (_write_record(b"{}"), ["decoder/config.json", "is not a stage record"]),
    (_write_record(b"[]"), ["decoder/config.json", "is not a stage record"]),
    (_write_record(b"\x00\xffnot json"), ["decoder/config.json", "is not valid JSON"]),
    (_other_architecture, ["decoder/config.json", "checkpoint at step 4",
                           "tensor unet/down_1/", "(48,)"]),
], ids=["swapped", "empty-object", "list", "garbage", "other-architecture"])
def test_broken_workdir(stack, tmp_path, capsys, breakage, needles):
    w = copy_stack(stack, tmp_path / "w")
    breakage(w)
    fails(capsys, ["sample", "--workdir", w, "--prompt", "a red circle",
                   "--out", tmp_path / "o.png", *FAST], "sample", *needles, trees=[w], rc=1)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("breakage,needles", [
    ("missing", ["no tokenizer directory", "tokenizer"]),
    ("garbage", ["tokenizer.json is not valid JSON"]),
    ("empty-object", ["the tokenizer in", "cannot be read"]),
])
def test_broken_tokenizer_fails_first(stack, tmp_path, capsys, monkeypatch, breakage, needles):
    """A missing or garbled tokenizer fails before any checkpoint is read (so before anything
    compiles), for sample and for train."""
    from unclip_jax import workdir
    from unclip_jax.train import trainer

    w = copy_stack(stack, tmp_path / "w")
    tok = os.path.join(w, "tokenizer")
    rec_path = os.path.join(w, "clip", "config.json")
    rec = json.load(open(rec_path))
    rec["paths"]["tokenizer"] = tok
    json.dump(rec, open(rec_path, "w"))
    if breakage == "missing":
        shutil.rmtree(tok)
    else:
        with open(os.path.join(tok, "tokenizer.json"), "w") as f:
            f.write("garbage{" if breakage == "garbage" else "{}")

    def boom(*a, **k):
        raise AssertionError("a checkpoint was read before the tokenizer")
    monkeypatch.setattr(workdir, "load_stage", boom)
    monkeypatch.setattr(workdir, "load_frozen_clip", boom)
    fails(capsys, ["sample", "--workdir", w, "--prompt", "a red circle",
                   "--out", tmp_path / "o.png", *FAST], "sample", *needles, trees=[w], rc=1)

    monkeypatch.setattr(trainer, "train", boom)  # the CLIP stage reads it when built
    fails(capsys, ["train", "--config", CLIP_TINY, "--workdir", w, f"--config.tokenizer={tok}"],
          "train", *needles, trees=[w], rc=1)


def test_bogus_which_and_stage_names(stack):
    from unclip_jax.workdir import load_stage

    before = tree_hash(stack)
    with pytest.raises(ValueError, match=r"which must be one of 'ema_params', 'params'.*'bogus'"):
        load_stage(os.path.join(stack, "prior"), which="bogus")
    with pytest.raises(ValueError, match=r"expect must be a stage name, one of clip, prior, "
                                         r"ar_prior, decoder, upsampler; got 'priorr'"):
        load_stage(os.path.join(stack, "prior"), expect="priorr")
    assert load_stage(os.path.join(stack, "prior"), which="params").step == 4  # the valid ones
    assert tree_hash(stack) == before


# ------------------------------------------------------------------------------ text and seeds
def test_non_utf8_text(stack, tmp_path, capsys, no_work):
    bad = os.fsdecode(b"a red \xff circle")  # what a non-UTF-8 argv word becomes
    for argv, cmd, flag in [
            (["sample", "--workdir", stack, "--prompt", "ok", "--prompt", bad], "sample",
             "--prompt"),
            (["textdiff", "--workdir", stack, "--image", png(tmp_path / "i.png"), "--to", bad],
             "textdiff", "--to"),
            (["textdiff", "--workdir", stack, "--image", tmp_path / "i.png", "--to", "x",
              "--from", bad], "textdiff", "--from")]:
        fails(capsys, argv, cmd, f"argument {flag}", "not valid UTF-8", "byte ff",
              trees=[stack], rc=2)
    from unclip_jax.pipeline import check_text  # the Python API refuses it the same way

    with pytest.raises(ValueError, match="not valid UTF-8"):
        check_text(bad)
    assert check_text("ünïcode ok") == "ünïcode ok"


def test_seeds_outside_64_bits(stack, tmp_path, capsys, no_work):
    img = png(tmp_path / "i.png")
    big, small = str(2 ** 64), str(-2 ** 63 - 1)
    for argv, cmd in [
            (["sample", "--workdir", stack, "--prompt", "x", "--seed", big], "sample"),
            (["sample", "--workdir", stack, "--prompt", "x", "--seed", small], "sample"),
            (["variations", "--workdir", stack, "--image", img, "--seed", big], "variations"),
            (["interpolate", "--workdir", stack, "--image-a", img, "--image-b", img,
              "--seed", small], "interpolate"),
            (["textdiff", "--workdir", stack, "--image", img, "--to", "x", "--seed", big],
             "textdiff"),
            (["eval", "--workdir", stack, "--seed", big], "eval"),
            (["eval", "--workdir", stack, "--seed", "-1"], "eval"),  # it seeds numpy too
            (["demo", "--workdir", tmp_path / "d", "--seed", big], "demo")]:
        fails(capsys, argv, cmd, "argument --seed", "64-bit", trees=[stack], rc=2)
    w = tmp_path / "w"
    for seed in (big, "-1"):
        fails(capsys, ["train", "--config", CLIP_TINY, "--workdir", w, f"--config.seed={seed}"],
              "train", "config.seed", "2**63 - 1", rc=1)
    assert not w.exists()
    # the edges are accepted, and are seeds JAX takes (also one past them, as the
    # manipulations' upsampler and the trainer's init use seed + 1)
    from unclip_jax.manipulate import _seed_after
    from unclip_jax.train.trainer import _init_seed

    p = cli.build_parser()
    assert p.parse_args(["sample", "--prompt", "x", "--seed", str(2 ** 63 - 1)]).seed == 2 ** 63 - 1
    assert p.parse_args(["sample", "--prompt", "x", "--seed", str(-2 ** 63)]).seed == -2 ** 63
    for s in (2 ** 63 - 1, -2 ** 63, _seed_after(2 ** 63 - 1), _init_seed(2 ** 63 - 1)):
        jax.random.key(s)
    assert _seed_after(5) == 6 and _init_seed(5) == 6 and _seed_after(2 ** 63 - 1) == -2 ** 63


# ------------------------------------------------------------------------------ outputs first
def _unwritable_dir(tmp_path):
    """A directory no file can be created in: a read-only one (root ignores the mode bits: then
    /sys, where even root cannot create files), else skip."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return str(d)
    try:
        open("/sys/unclip-jax-probe", "w").close()
    except OSError:
        return "/sys"
    os.remove("/sys/unclip-jax-probe")
    pytest.skip("no unwritable directory to try")


def test_outputs_checked_before_any_work(stack, tmp_path, capsys, no_work):
    img = png(tmp_path / "i.png")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    ro = _unwritable_dir(tmp_path)
    sample = ["sample", "--workdir", stack, "--prompt", "x"]
    for argv, cmd, needles in [
            (sample + ["--out", tmp_path / "nodir" / "g.png"], "sample",
             ["--out", "nodir", "does not exist"]),
            (sample + ["--out", tmp_path], "sample", ["--out", "is a directory"]),
            (sample + ["--out", a_file / "g.png"], "sample", ["--out", "is a file"]),
            (sample + ["--out", os.path.join(ro, "g.png")], "sample", ["--out", "cannot write"]),
            (sample + ["--out-dir", a_file], "sample", ["--out-dir", "is not a directory"]),
            (sample + ["--out-dir", os.path.join(ro, "d")], "sample",
             ["--out-dir", "cannot write"]),
            (["variations", "--workdir", stack, "--image", img, "--out", tmp_path], "variations",
             ["--out", "is a directory"]),
            (["interpolate", "--workdir", stack, "--image-a", img, "--image-b", img,
              "--out", os.path.join(ro, "i.png")], "interpolate", ["--out", "cannot write"]),
            (["textdiff", "--workdir", stack, "--image", img, "--to", "x",
              "--out", tmp_path / "nodir" / "t.png"], "textdiff", ["--out", "does not exist"]),
            (["train", "--config", CLIP_TINY, "--workdir", a_file], "train",
             ["--workdir", "is not a directory"]),
            (["train", "--config", CLIP_TINY, "--workdir", a_file / "w"], "train",
             ["--workdir", "is a file"]),
            (["train", "--config", CLIP_TINY, "--workdir", os.path.join(ro, "w")], "train",
             ["--workdir", "cannot write"]),
            (["eval", "--workdir", a_file], "eval", ["--workdir", "is not a directory"]),
            (["demo", "--workdir", os.path.join(ro, "demo")], "demo",
             ["--workdir", "cannot write"])]:
        fails(capsys, argv, cmd, *needles, trees=[stack, tmp_path], rc=1)


# ------------------------------------------------------------------------------ input images
def test_bad_images(stack, tmp_path, capsys, monkeypatch):
    from unclip_jax import pipeline

    def boom(*a, **k):
        raise AssertionError("the pipeline was loaded before the image was read")
    monkeypatch.setattr(pipeline.UnCLIPPipeline, "from_workdir", boom)
    (tmp_path / "text.png").write_text("hello")
    cases = [(bare_png(tmp_path / "bomb.png", 20000, 20000), "decompression bomb"),  # > 2x limit
             (bare_png(tmp_path / "big.png", 10000, 10000), "decompression bomb"),  # Pillow warns
             (bare_png(tmp_path / "zero.png", 0, 0), "is not an image Pillow can read"),
             (tmp_path / "text.png", "is not an image Pillow can read"),
             (tmp_path, "is not an image Pillow can read"),
             (tmp_path / "missing.png", "no such image file")]
    for path, needle in cases:
        fails(capsys, ["variations", "--workdir", stack, "--image", path,
                       "--out", tmp_path / "o.png"], "variations", str(path), needle,
              trees=[stack], rc=1)
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------ numbers
def test_bad_counts(stack, tmp_path, capsys, no_work):
    img = png(tmp_path / "i.png")
    sample = ["sample", "--workdir", stack, "--prompt", "x"]
    var = ["variations", "--workdir", stack, "--image", img]
    interp = ["interpolate", "--workdir", stack, "--image-a", img, "--image-b", img]
    td = ["textdiff", "--workdir", stack, "--image", img, "--to", "x"]
    ev = ["eval", "--workdir", stack]
    train = ["train", "--config", CLIP_TINY, "--workdir", tmp_path / "w"]
    for argv, cmd, flag in [
            (sample + ["--num", "0"], "sample", "--num"),
            (sample + ["--num", "-3"], "sample", "--num"),
            (sample + ["--batch-size", "0"], "sample", "--batch-size"),
            (sample + ["--rerank", "-1"], "sample", "--rerank"),
            (sample + ["--prior-steps", "0"], "sample", "--prior-steps"),
            (var + ["--num", "0"], "variations", "--num"),
            (var + ["--steps", "0"], "variations", "--steps"),
            (interp + ["--num", "1"], "interpolate", "--num"),
            (td + ["--num", "0"], "textdiff", "--num"),
            (td + ["--num", "-1"], "textdiff", "--num"),
            (train + ["--stop-at", "-5"], "train", "--stop-at"),
            (ev + ["--single", "0", "--two", "0", "--heldout", "0"], "eval", "--single"),
            (ev + ["--two", "-1"], "eval", "--two"),
            (ev + ["--heldout", "0"], "eval", "--heldout"),
            (ev + ["--single", str(cli.EVAL_MAX + 1)], "eval", "--single"),
            (ev + ["--batch-size", "0"], "eval", "--batch-size"),
            (sample + ["--num", "many"], "sample", "--num")]:
        fails(capsys, argv, cmd, f"argument {flag}", trees=[stack], rc=2)
    # too many images for one grid: refused before loading, pointing at --out-dir
    fails(capsys, sample + ["--num", str(cli.GRID_MAX_IMAGES + 1), "--out", tmp_path / "g.png"],
          "sample", "--out-dir", str(cli.GRID_MAX_IMAGES), trees=[stack], rc=1)
    fails(capsys, var + ["--num", str(cli.GRID_MAX_IMAGES)], "variations", "--num",
          trees=[stack], rc=1)
    from unclip_jax.shapes_demo.evaluate import evaluate  # the Python API, before any work

    with pytest.raises(ValueError, match="n_two must be a positive integer, got 0"):
        evaluate(None, n_two=0)


def test_non_finite_numbers(stack, tmp_path, capsys, no_work):
    img = png(tmp_path / "i.png")
    td = ["textdiff", "--workdir", stack, "--image", img, "--to", "x"]
    for argv, cmd, flag in [(td + ["--max-theta", "nan"], "textdiff", "--max-theta"),
                            (td + ["--max-theta", "inf"], "textdiff", "--max-theta"),
                            (td + ["--max-theta=-inf"], "textdiff", "--max-theta"),
                            (["variations", "--workdir", stack, "--image", img, "--eta", "nan"],
                             "variations", "--eta")]:
        fails(capsys, argv, cmd, f"argument {flag}", "finite", trees=[stack], rc=2)


def test_guidance_below_one(stack, tmp_path, capsys, no_work):
    """Guidance is the scale w of out_u + w (out_c - out_u): 1 is unguided, and the pipeline
    and the manipulations take w >= 1 only (below 1 they would need the unconditional pass the
    unguided path skips)."""
    img = png(tmp_path / "i.png")
    sample = ["sample", "--workdir", stack, "--prompt", "x"]
    for argv, cmd, flag in [
            (sample + ["--prior-guidance", "-1"], "sample", "--prior-guidance"),
            (sample + ["--decoder-guidance", "-1"], "sample", "--decoder-guidance"),
            (sample + ["--decoder-guidance", "0.5"], "sample", "--decoder-guidance"),
            (sample + ["--prior-guidance", "nan"], "sample", "--prior-guidance"),
            (["variations", "--workdir", stack, "--image", img, "--guidance", "-1"],
             "variations", "--guidance"),
            (["textdiff", "--workdir", stack, "--image", img, "--to", "y", "--guidance", "0"],
             "textdiff", "--guidance")]:
        line = fails(capsys, argv, cmd, f"argument {flag}", trees=[stack], rc=2)
        assert ">= 1" in line or "finite" in line
    assert "1 = no guidance" in line and "w * (out_cond - out_uncond)" in line
    from unclip_jax.manipulate import Manipulator

    class Pipe:
        clip = object()
    with pytest.raises(ValueError, match=r"guidance must be a finite number >= 1"):
        Manipulator(Pipe(), guidance=-1.0)


# ------------------------------------------------------------------------------ weights files
def _fake_diffusers_dir(root):
    """A diffusers UnCLIPPipeline directory whose text encoder (the first component read) has
    the weights file under test; the other components are never reached."""
    from unclip_jax.convert.diffusers_pipeline import COMPONENTS

    os.makedirs(root)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "UnCLIPPipeline"}, f)
    for c in COMPONENTS:
        os.makedirs(os.path.join(root, c))
    with open(os.path.join(root, "text_encoder", "config.json"), "w") as f:
        json.dump({"model_type": "clip_text_model", "vocab_size": 10}, f)
    return os.path.join(root, "text_encoder")


def test_bad_weights_files(tmp_path, capsys):
    from safetensors.numpy import save_file

    torch = pytest.importorskip("torch")
    ok = tmp_path / "ok.safetensors"
    save_file({"w": np.zeros((64, 64), np.float32)}, str(ok))
    blob = ok.read_bytes()
    marker = tmp_path / "unpickled"

    class Payload:  # what a malicious pickle does when unpickled: here, create a file
        def __reduce__(self):
            return (open, (str(marker), "w"))
    cases = [("model.safetensors", blob[: len(blob) // 2], ["model.safetensors",
                                                            "not a readable safetensors file"]),
             ("model.safetensors", b"garbage " * 8, ["model.safetensors",
                                                     "not a readable safetensors file"]),
             ("model.safetensors", b"", ["model.safetensors", "not a readable safetensors"]),
             ("pytorch_model.bin", None, ["pytorch_model.bin", "refused as unsafe",
                                          "weights_only=True"]),
             ("pytorch_model.bin", b"not a pickle", ["pytorch_model.bin",
                                                     "not a readable PyTorch checkpoint"])]
    for i, (name, data, needles) in enumerate(cases):
        d = str(tmp_path / f"pipe{i}")
        te = _fake_diffusers_dir(d)
        if data is None:
            torch.save({"w": torch.zeros(2), "payload": Payload()}, os.path.join(te, name))
        else:
            with open(os.path.join(te, name), "wb") as f:
                f.write(data)
        fails(capsys, ["sample", "--pipeline", d, "--prompt", "x", "--out", tmp_path / "o.png"],
              "sample", *needles, trees=[d], rc=1)
    assert not marker.exists()  # never unpickled
    from unclip_jax.convert.torch_io import load_state_dict  # the good file still loads

    assert load_state_dict(str(ok))["w"].shape == (64, 64)


# ------------------------------------------------------------------------------ bounded sampling
def test_rng_rows_do_not_depend_on_the_batch():
    """Exact: a batch of keys draws each row from its own key, in the noise helper and in the
    sampler's loop (a row-wise model, so nothing but the noise could couple the rows)."""
    from unclip_jax.diffusion import DiffusionConfig, Sampler, SamplingConfig
    from unclip_jax.diffusion.sampler import random_normal

    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(7), jnp.arange(5))
    full = np.asarray(random_normal(keys, (5, 3, 2)))
    np.testing.assert_array_equal(full[1:3], np.asarray(random_normal(keys[1:3], (2, 3, 2))))
    assert np.abs(full[0] - full[1]).max() > 0.1  # the rows are different draws
    sampler = Sampler(lambda p, x, t, c: 0.5 * x, DiffusionConfig(),
                      SamplingConfig(method="ddpm", steps=4))
    x = np.asarray(random_normal(keys, (5, 4)))
    out = np.asarray(sampler(None, x, {}, rng=keys))
    np.testing.assert_array_equal(out[:2], np.asarray(sampler(None, x[:2], {}, rng=keys[:2])))
    assert np.abs(out - x).max() > 0.1  # the sampler did something
    with pytest.raises(ValueError, match="one key a row"):
        sampler(None, x, {}, rng=keys[:2])


def test_rerank_batches_keep_the_best_whatever_the_batch():
    """Exact, on a stand-in pipeline: each kept image is its candidates' best by cosine with
    its prompt's text embedding, and what is kept does not depend on the batch size."""
    from unclip_jax.manipulate import rerank_batches

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2 * 3 * 4, 5))  # 2 prompts x 3 images x 4 candidates
    text = rng.normal(size=(2, 5))

    class Clip:
        def embed_images(self, imgs):
            return emb[imgs[:, 0, 0, 0].astype(int)]

    class Pipe:
        clip = Clip()

        def encode_text(self, prompts):
            return {"text_embed": text[[int(p) for p in prompts]]}

        def generate_batches(self, prompts, *, num_images_per_prompt, batch_size, seed, **kw):
            n = len(prompts) * num_images_per_prompt
            for s in range(0, n, batch_size):
                idx = np.arange(s, min(n, s + batch_size))
                yield s, np.broadcast_to(idx[:, None, None, None], (len(idx), 1, 1, 3))
    e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    t = text / np.linalg.norm(text, axis=-1, keepdims=True)
    scores = np.einsum("pick,pk->pic", e.reshape(2, 3, 4, 5), t)
    want = (np.arange(6).reshape(2, 3) * 4 + scores.argmax(-1)).ravel()
    for bs in (1, 3, 4, 7, 100):
        kept = [im for _, ims in rerank_batches(Pipe(), ["0", "1"], 4, num_images_per_prompt=3,
                                                batch_size=bs) for im in ims]
        np.testing.assert_array_equal([int(k[0, 0, 0]) for k in kept], want)


def test_chunked_sampling_equals_one_batch(stack, tmp_path, capsys, monkeypatch):
    """`sample --batch-size 4` makes 6 images in calls of 4 (the last padded) and writes one
    PNG per image; they are one batch's (batch size 6) up to float rounding, far closer than
    two draws are to each other."""
    from PIL import Image

    from unclip_jax import pipeline

    calls, loaded = [], []
    real_generate, real_load = (pipeline.UnCLIPPipeline.generate_float,
                                pipeline.UnCLIPPipeline.from_workdir)

    def spy(self, prompts, **kw):
        calls.append(len(prompts))
        return real_generate(self, prompts, **kw)

    def load_once(workdir, **kw):  # the second command reuses the first one's pipeline
        if not loaded:
            loaded.append(real_load(workdir, **kw))
        return loaded[0]
    monkeypatch.setattr(pipeline.UnCLIPPipeline, "generate_float", spy)
    monkeypatch.setattr(pipeline.UnCLIPPipeline, "from_workdir", load_once)
    monkeypatch.chdir(tmp_path)  # a default grid.png would land here
    before = tree_hash(stack)

    def run(out_dir, batch, grid=None):
        argv = ["sample", "--workdir", stack, "--prompt", "a red circle", "--prompt",
                "a blue square at the top", "--num", "3", "--batch-size", str(batch),
                "--out-dir", tmp_path / out_dir, *FAST] + (["--out", grid] if grid else [])
        assert main([str(a) for a in argv]) == 0
        names = sorted(n for n in os.listdir(tmp_path / out_dir) if n.endswith(".png"))
        return names, np.stack([np.asarray(Image.open(tmp_path / out_dir / n), np.int16)
                                for n in names])

    names, chunked = run("b4", 4, grid=tmp_path / "g.png")
    assert calls == [4, 4] and names == [f"{p:03d}-{j:03d}.png" for p in (0, 1)
                                         for j in range(3)]
    assert Image.open(tmp_path / "g.png").format == "PNG"
    assert json.load(open(tmp_path / "b4" / "prompts.json"))["prompts"][1] == \
        "a blue square at the top"
    assert "wrote 6 images" in capsys.readouterr().out
    calls.clear()
    _, one = run("b6", 6)
    assert calls == [6]
    assert not os.path.exists(tmp_path / "grid.png")  # --out-dir alone writes no grid
    diff = np.abs(chunked - one)
    draws = np.abs(one[0] - one[1]).mean()  # two images of one prompt: different draws
    # measured on a 2-core CPU: identical, or a few pixels 1-2 grey levels apart (XLA rounds
    # batched matrix products differently for another batch size)
    assert diff.mean() < 0.05 and diff.max() <= 8, (diff.mean(), diff.max())
    assert draws > 20 * max(diff.mean(), 0.05), draws
    assert tree_hash(stack) == before
