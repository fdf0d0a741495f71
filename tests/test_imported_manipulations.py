"""The paper's manipulations on imported (diffusers / transformers) weights: a CLIP image tower
from a transformers CLIP or a diffusers UnCLIPImageVariationPipeline directory as `pipe.clip`,
checked against transformers (the tower, the CLIPImageProcessor preprocessing) and diffusers
(the variation pipeline's decoding); DDIM inversion round trips and interpolation endpoints on
an imported Karlo-type decoder (learned-range variance, text_proj, eps prediction); every
manipulation from the CLI on `--pipeline [--clip]`; the refusals."""
import dataclasses
import json
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from peers import (clip_image_processor, nchw_to_nhwc, tiny_clip_model,  # noqa: E402
                   tiny_unclip_pipeline, unclip_image_variation_pipeline)

from unclip_jax.cli import main  # noqa: E402

EMBED = 32  # the tiny decoder's CLIP embedding width (UnCLIPArch.text_dim)
#: uint8 -> embedding, ours against CLIPImageProcessor + the transformers model: max abs
#: difference over the embedding's norm. Measured <= 5e-5 (a few pixels one grey level apart
#: after resizing, where Pillow's fixed-point filter rounds the other way); resizing in float
#: without Pillow's rounding between its two passes gives 3e-4 to 5e-4, squashing the image to
#: a square as the old preprocessing did 1e-2 to 4e-2.
EMBED_RTOL = 2e-4


def smooth_image(seed, h, w, noise=8.0):
    """A uint8 image with structure at every scale: bicubic-upsampled random colours plus
    pixel noise."""
    from PIL import Image

    r = np.random.default_rng(seed)
    base = (r.random((5, 5, 3)) * 255).astype(np.uint8)
    im = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.float64)
    return np.clip(im + r.normal(0, noise, im.shape), 0, 255).astype(np.uint8)


def save_png(path, im):
    from PIL import Image

    Image.fromarray(im).save(path)
    return str(path)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The peers on disk: an UnCLIPImageVariationPipeline, an UnCLIPPipeline of the same shapes,
    a transformers CLIPModel (with a CLIPImageProcessor of its own sizes and statistics), the
    variation pipeline's image encoder as a CLIPVisionModelWithProjection directory, and a
    CLIPModel whose projection is too narrow for the decoder."""
    root = tmp_path_factory.mktemp("imported")
    d = {k: str(root / k) for k in ("variation", "karlo", "clip_model", "vision", "narrow")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        var = unclip_image_variation_pipeline(d["variation"], seed=0)
        tiny_unclip_pipeline(d["karlo"], seed=1)
        tiny_clip_model(d["clip_model"], EMBED, image_size=16, patch_size=4, seed=2,
                        processor=clip_image_processor(20, 16, image_mean=[0.5, 0.4, 0.3],
                                                       image_std=[0.2, 0.3, 0.25]))
        var.image_encoder.save_pretrained(d["vision"])
        var.feature_extractor.save_pretrained(d["vision"])
        tiny_clip_model(d["narrow"], 24, image_size=16, patch_size=4, seed=3)
    var.set_progress_bar_config(disable=True)
    d["peer"] = var
    return d


@pytest.fixture(scope="module")
def var_pipe(dirs):
    from unclip_jax.pipeline import UnCLIPPipeline

    return UnCLIPPipeline.from_diffusers(dirs["variation"], progress=False)


@pytest.fixture(scope="module")
def images():
    """Two different 8x8 images (the tiny decoder's size) and a non-square one."""
    return smooth_image(1, 8, 8), smooth_image(2, 8, 8), smooth_image(3, 11, 15)


def _hf_tower(path):
    """(transformers image-embedding function, CLIPImageProcessor) of a tower directory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if os.path.exists(os.path.join(path, "model_index.json")):
            model = transformers.CLIPVisionModelWithProjection.from_pretrained(
                os.path.join(path, "image_encoder")).eval()
            proc = transformers.CLIPImageProcessor.from_pretrained(
                os.path.join(path, "feature_extractor"))
            return (lambda px: model(pixel_values=px).image_embeds), proc
        cfg = json.load(open(os.path.join(path, "config.json")))
        proc = transformers.CLIPImageProcessor.from_pretrained(path)
        if cfg.get("model_type") == "clip":
            model = transformers.CLIPModel.from_pretrained(path).eval()

            def features(px):  # transformers 5 wraps the projected features in an output
                out = model.get_image_features(pixel_values=px)
                return getattr(out, "pooler_output", out)
            return features, proc
        model = transformers.CLIPVisionModelWithProjection.from_pretrained(path).eval()
        return (lambda px: model(pixel_values=px).image_embeds), proc


# ------------------------------------------------------------------------------ the tower
@pytest.mark.parametrize("which", ["variation", "clip_model", "vision"])
def test_image_tower_matches_transformers(dirs, which):
    """The same pixel values give the same embeddings (<= 1e-4); uint8 images of any size give
    the embeddings of CLIPImageProcessor + the model, within EMBED_RTOL of their norm, because
    the preprocessing follows the directory's preprocessor_config.json (sizes, crop, mean/std)
    and resizes as Pillow does."""
    from unclip_jax.images import clip_pixels
    from unclip_jax.workdir import CLIPImageTower, load_image_tower

    tower = load_image_tower(dirs[which])
    assert isinstance(tower, CLIPImageTower) and tower.embed_dim == EMBED
    if which == "clip_model":  # its own processor: shortest edge 20, crop 16, other statistics
        assert tower.preprocess.size == 20 and tower.preprocess.crop == (16, 16)
        assert tower.preprocess.mean == (0.5, 0.4, 0.3)
    hf, proc = _hf_tower(dirs[which])
    worst, old_worst = 0.0, 0.0
    for k, (h, w) in enumerate([(8, 8), (40, 57), (23, 31), (64, 64), (300, 200)]):
        im = smooth_image(10 + k, h, w)
        px = proc(images=[im], return_tensors="pt").pixel_values
        with torch.no_grad():
            ref = hf(px).numpy()
        same_px = np.asarray(tower.encode_image(tower.params,
                                                jnp.asarray(nchw_to_nhwc(px))))
        assert np.abs(same_px - ref).max() <= 1e-4
        got = tower.embed_images(im[None])
        assert got.shape == ref.shape == (1, EMBED)
        worst = max(worst, np.abs(got - ref).max() / np.linalg.norm(ref))
        # the float resize without Pillow's rounding (ClipPreprocess.for_size's path) is
        # measurably further from transformers: the tolerance tells the two apart
        unrounded = dataclasses.replace(tower.preprocess, pil_rounding=False)
        old = np.asarray(tower.encode_image(tower.params,
                                            clip_pixels(jnp.asarray(im[None]), unrounded)))
        old_worst = max(old_worst, np.abs(old - ref).max() / np.linalg.norm(ref))
    assert worst <= EMBED_RTOL, worst
    assert old_worst > EMBED_RTOL, old_worst


def test_clip_pixels_of_a_square_size_are_unchanged():
    """A CLIP trained here (`clip_pixels(x, size)`) sees square images exactly as before the
    preprocessing followed CLIPImageProcessor: one antialiased bicubic resize in float."""
    from unclip_jax.images import CLIP_MEAN, CLIP_STD, clip_pixels

    x = jnp.asarray(smooth_image(5, 24, 24)[None])
    old = (jax.image.resize(x.astype(jnp.float32) / 255.0, (1, 16, 16, 3), "bicubic",
                            antialias=True) - CLIP_MEAN) / CLIP_STD
    np.testing.assert_array_equal(np.asarray(clip_pixels(x, 16)), np.asarray(old))


# ------------------------------------------------------------------------------ loading
def test_variation_pipeline_loads_on_its_own(var_pipe, dirs):
    from unclip_jax.workdir import CLIPImageTower

    assert var_pipe.prior is None and isinstance(var_pipe.clip, CLIPImageTower)
    assert var_pipe.clip.embed_dim == var_pipe.decoder.config.clip_embed_dim == EMBED
    assert var_pipe.decoder.sampling.diffusion.variance == "learned_range"
    assert var_pipe.decoder.sampling.diffusion.prediction == "eps"
    assert var_pipe.image_size == 16 and var_pipe.super_res_last is not None
    for call in (lambda: var_pipe.generate(["a frog"]),
                 lambda: next(var_pipe.generate_batches(["a frog"]))):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "UnCLIPImageVariationPipeline" in msg and "no prior" in msg
        assert "variations" in msg and "UnCLIPPipeline" in msg and "\n" not in msg


def test_from_diffusers_clip_argument(dirs, monkeypatch, tmp_path):
    import unclip_jax.pipeline as pl
    from unclip_jax.manipulate import Manipulator
    from unclip_jax.pipeline import UnCLIPPipeline

    bare = UnCLIPPipeline.from_diffusers(dirs["karlo"], progress=False)
    assert bare.clip is None
    with pytest.raises(ValueError, match=r"from_diffusers\(path, clip=DIR\)"):
        Manipulator(bare)
    # what is not a CLIP image tower of the decoder's width is refused before anything loads
    monkeypatch.setattr(pl, "load_components", _boom)
    with pytest.raises(ValueError, match=r"makes 24-dim image embeddings, but the decoder .* "
                                         r"takes 32-dim"):
        UnCLIPPipeline.from_diffusers(dirs["karlo"], clip=dirs["narrow"])
    with pytest.raises(ValueError, match="has no CLIP image encoder"):
        UnCLIPPipeline.from_diffusers(dirs["karlo"], clip=dirs["karlo"])
    no_proj = tmp_path / "no_proj"
    shutil.copytree(dirs["vision"], no_proj)
    cfg = json.load(open(no_proj / "config.json"))
    json.dump(dict(cfg, architectures=["CLIPVisionModel"]), open(no_proj / "config.json", "w"))
    with pytest.raises(ValueError, match="without the visual projection"):
        UnCLIPPipeline.from_diffusers(dirs["karlo"], clip=str(no_proj))
    with pytest.raises(ValueError, match="is a CLIP text model, not an image tower"):
        UnCLIPPipeline.from_diffusers(dirs["karlo"],
                                      clip=os.path.join(dirs["karlo"], "text_encoder"))


def _boom(*a, **k):
    raise AssertionError("loaded before the bad input was refused")


def test_pipeline_dir_errors_for_both_classes(dirs, tmp_path):
    from unclip_jax.convert.diffusers_pipeline import NotAPipelineError, check_pipeline_dir

    assert check_pipeline_dir(dirs["variation"])["_class_name"] == "UnCLIPImageVariationPipeline"
    with pytest.raises(NotAPipelineError, match="is not a directory"):
        check_pipeline_dir(str(tmp_path / "nothing"))
    with pytest.raises(NotAPipelineError, match="no model_index.json"):
        check_pipeline_dir(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(NotAPipelineError, match="not an UnCLIPPipeline or an "
                                                "UnCLIPImageVariationPipeline"):
        check_pipeline_dir(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(dirs["variation"], broken)
    shutil.rmtree(broken / "image_encoder")
    shutil.rmtree(broken / "feature_extractor")
    with pytest.raises(NotAPipelineError, match="missing pipeline components: "
                                                "feature_extractor, image_encoder"):
        check_pipeline_dir(str(broken))


# ------------------------------------------------------------------------------ decoding
def test_variation_decoding_matches_diffusers(dirs, var_pipe, images):
    """What diffusers' UnCLIPImageVariationPipeline makes of an image (its CLIP embedding, the
    decoder at guidance 8 with the empty prompt, the super-res pair), ours from the same
    latents and per-step noise: <= 1e-3 from the same pixel values, as the text-to-image
    pipeline's parity."""
    from PIL import Image

    peer = dirs["peer"]
    steps = dict(decoder=5, super_res=3)
    n, ds, ss = 2, 8, 16
    shapes = dict(decoder=(n, 3, ds, ds), super_res=(n, 3, ss, ss))
    g = torch.Generator().manual_seed(3)
    latents = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    pil = [Image.fromarray(im) for im in images[:2]]
    with torch.no_grad():
        out = peer(image=pil, decoder_num_inference_steps=steps["decoder"],
                   super_res_num_inference_steps=steps["super_res"],
                   generator=torch.Generator().manual_seed(7),
                   decoder_latents=latents["decoder"], super_res_latents=latents["super_res"],
                   decoder_guidance_scale=8.0, output_type="np").images
    g = torch.Generator().manual_seed(7)  # the per-step noise diffusers drew, in its order
    noise = {}
    for stage, sched in (("decoder", peer.decoder_scheduler),
                         ("super_res", peer.super_res_scheduler)):
        sched.set_timesteps(steps[stage])
        noise[stage] = np.stack([nchw_to_nhwc(torch.randn(shapes[stage], generator=g)
                                              if int(t) > 0 else torch.zeros(shapes[stage]))
                                 for t in sched.timesteps])
    px = peer.feature_extractor(images=pil, return_tensors="np").pixel_values
    tower = var_pipe.clip

    def ours(emb):
        cond, uncond = var_pipe.text_conditioning([""] * n)
        low = var_pipe.sample_decoder(emb, cond, uncond, steps=steps["decoder"], guidance=8.0,
                                      latents=jnp.asarray(nchw_to_nhwc(latents["decoder"])),
                                      noise=jnp.asarray(noise["decoder"]),
                                      coefficient_dtype="float32", rng=jax.random.key(0))
        return np.asarray(var_pipe.sample_super_res(
            low, steps=steps["super_res"],
            latents=jnp.asarray(nchw_to_nhwc(latents["super_res"])),
            noise=jnp.asarray(noise["super_res"]), coefficient_dtype="float32"))
    got = ours(tower.encode_image(tower.params, jnp.asarray(nchw_to_nhwc(px))))
    assert got.shape == out.shape == (n, ss, ss, 3)
    assert np.abs(got - out).max() <= 1e-3  # measured 2.4e-4
    # from the uint8 images through our preprocessing: the embeddings differ by ~5e-5 of their
    # norm (a pixel one grey level apart here and there), which guidance 8 through a random
    # decoder amplifies to 2.1e-3 in the image (measured)
    got = ours(jnp.asarray(tower.embed_images(np.stack(images[:2]))))
    assert np.abs(got - out).max() <= 5e-3
    assert out.std() > 0.05 and np.abs(out[0] - out[1]).max() > 0.05


@pytest.fixture(scope="module")
def smooth_manip(dirs):
    """The imported variation pipeline whose decoder's output convolution can be scaled
    (`smooth_manip.scale(k)`).

    A random UNet is no denoiser: its eps changes by O(1) between neighbouring timesteps and
    its Jacobian in x is ~3, so the DDIM ODE it defines is chaotic and no inversion round trip
    survives it (measured: 83 grey levels rms off, as far as another image). Scaled by k it is
    a smooth eps model (rms ~k) that still runs the whole imported network: text_proj, the
    learned-range split, eps prediction, the capped cosine schedule."""
    from unclip_jax.manipulate import Manipulator
    from unclip_jax.pipeline import Component, UnCLIPPipeline

    pipe = UnCLIPPipeline.from_diffusers(dirs["variation"], progress=False)
    m = Manipulator(pipe, steps=25)
    full = pipe.decoder

    def scale(k):
        params = jax.tree_util.tree_map_with_path(
            lambda path, v: v * k if any(getattr(q, "key", None) == "conv_out" for q in path)
            else v, full.params)
        pipe.decoder = Component(full.config, params, full.sampling)
        return m
    m.scale = scale
    return m


def _rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_variations_at_eta_zero_reconstruct_the_input(smooth_manip, images):
    """DDIM inversion with the decoder then decoding at eta = 0 gives the input back (at the
    decoder's resolution), the closer the smoother the decoder's eps: the residual is the
    discretisation of the network's ODE, not an offset of the round trip. At eta = 1 the
    variations differ from the input and from each other."""
    a, b = images[:2]
    far = _rms(a, b)  # to another image: 89 grey levels rms
    errs = {}
    for k in (1e-2, 1e-3):
        m = smooth_manip.scale(k)
        errs[k] = _rms(m.variations(a, n=1, eta=0.0, upsample=False)[0], a)
    # measured 8.0 and 0.54 grey levels rms
    assert errs[1e-2] < 0.15 * far and errs[1e-3] < 0.015 * far, (errs, far)
    assert errs[1e-3] < errs[1e-2] / 3, errs
    m = smooth_manip.scale(1e-2)
    x_T = np.asarray(m.invert(a[None]))
    x0 = np.asarray(a, np.float64) / 127.5 - 1.0
    assert _rms(x_T, x0) > 0.8 * _rms(x0, 0.0)  # the inversion moved far from x_0
    var = m.variations(a, n=2, eta=1.0, upsample=False, seed=4)
    assert _rms(var[0], a) > 3 * errs[1e-2] and _rms(var[0], var[1]) > 3 * errs[1e-2]


def test_inversion_spacing_skips_the_top_timestep(smooth_manip, images, monkeypatch):
    """Why the manipulations' DDIM takes the "leading" spacing: the "even" one starts at
    t = 999, where abar = 2.4e-9 and an eps model's x0 multiplies any eps mismatch by ~2e4, so
    even the smooth decoder (eps rms 1e-3) that reconstructs to 0.5 grey levels above lands as
    far as another image (measured 129 grey levels rms)."""
    from unclip_jax import manipulate

    a, b = images[:2]
    m = smooth_manip.scale(1e-3)
    monkeypatch.setattr(manipulate, "SPACING", "even")
    assert _rms(m.variations(a, n=1, eta=0.0, upsample=False)[0], a) > 0.5 * _rms(a, b)


def test_interpolation_endpoints_are_the_images_own_decodes(dirs, var_pipe, images):
    """interpolate(a, b)'s first and last images are decode(embed(a), invert(a)) and the same
    for b (the imported decoder as released: deterministic DDIM, no upsampler); the ends
    differ from each other."""
    from unclip_jax.manipulate import Manipulator

    m = Manipulator(var_pipe, steps=10)
    a, b = images[:2]
    out = m.interpolate(a, b, steps=3, upsample=False)
    emb = m.embed(np.stack([a, b]))
    own = [m.decode(emb[i:i + 1], m.invert(x[None], emb[i:i + 1]), upsample=False)[0]
           for i, x in enumerate((a, b))]
    # the same computation in batches of 3 / 2 / 1: XLA may round a pixel one level apart
    assert np.abs(out[0].astype(int) - own[0]).max() <= 1
    assert np.abs(out[-1].astype(int) - own[1]).max() <= 1
    assert _rms(own[0], own[1]) > 10
    fixed = m.interpolate(a, b, steps=3, noise="fixed", upsample=False, seed=1)
    assert fixed.shape == out.shape and _rms(fixed[0], fixed[-1]) > 1


# ------------------------------------------------------------------------------ the CLI
FAST_MANIP = ["--steps", "3", "--num", "2", "--seed", "1"]
FAST_SAMPLE = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2",
               "--quiet"]


def _grid(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("source", ["pipeline+clip", "variation"])
def test_cli_manipulations_on_imported_weights(dirs, images, tmp_path, capsys, source):
    a, b = (save_png(tmp_path / f"{k}.png", im) for k, im in zip("ab", images[:2]))
    src = (["--pipeline", dirs["karlo"], "--clip", dirs["variation"]]
           if source == "pipeline+clip" else ["--pipeline", dirs["variation"]])
    runs = {"variations": ["--image", a, "--eta", "1.0"],
            "interpolate": ["--image-a", a, "--image-b", b],
            "textdiff": ["--image", a, "--from", "red", "--to", "blue"]}
    for cmd, args in runs.items():
        out = tmp_path / f"{cmd}.png"
        assert main([cmd] + src + args + FAST_MANIP + ["--out", str(out)]) == 0, \
            capsys.readouterr().err
        assert out.exists() and _grid(out)[0] > 16
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("clip", ["clip_model", "variation", "vision"])
def test_cli_sample_rerank_with_clip(dirs, tmp_path, capsys, clip):
    out = tmp_path / "rerank.png"
    assert main(["sample", "--pipeline", dirs["karlo"], "--clip", dirs[clip], "--prompt",
                 "a red frog", "--num", "2", "--rerank", "2", "--out", str(out)]
                + FAST_SAMPLE) == 0, capsys.readouterr().err
    assert out.exists()
    assert "wrote 2 images (16x16)" in capsys.readouterr().out


def fails(capsys, argv, command, *needles, rc=None):
    """The CLI in-process: a non-zero exit, one stderr line `unclip-jax <command>: error: ...`
    holding every needle."""
    code = main([str(x) for x in argv])
    err = capsys.readouterr().err
    assert code != 0 and (rc is None or code == rc), (code, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(rf"unclip-jax {command}: error: \S.*", lines[0]), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_cli_refusals(dirs, images, tmp_path, capsys, monkeypatch):
    """Refused before any pipeline, tower or image is loaded, and nothing written."""
    from unclip_jax import images as images_lib
    from unclip_jax import pipeline, workdir

    for obj, name in ((pipeline.UnCLIPPipeline, "from_diffusers"),
                      (pipeline.UnCLIPPipeline, "from_workdir"), (workdir, "load_image_tower"),
                      (images_lib, "load_image")):
        monkeypatch.setattr(obj, name, _boom)
    monkeypatch.chdir(tmp_path)
    a = save_png(tmp_path / "a.png", images[0])
    out = tmp_path / "o.png"
    karlo, var = dirs["karlo"], dirs["variation"]
    manips = {"variations": ["--image", a], "interpolate": ["--image-a", a, "--image-b", a],
              "textdiff": ["--image", a, "--to", "blue"]}
    for cmd, args in manips.items():
        tail = args + ["--out", out]
        fails(capsys, [cmd, "--pipeline", karlo] + tail, cmd, "is an UnCLIPPipeline",
              "pass --clip DIR", "UnCLIPImageVariationPipeline", rc=1)
        fails(capsys, [cmd, "--pipeline", karlo, "--workdir", tmp_path] + tail, cmd,
              "either --pipeline", rc=1)
        fails(capsys, [cmd] + tail, cmd, "either --pipeline", rc=1)
        fails(capsys, [cmd, "--workdir", tmp_path, "--clip", var] + tail, cmd,
              "--clip goes with --pipeline", rc=1)
        fails(capsys, [cmd, "--pipeline", karlo, "--clip", dirs["narrow"]] + tail, cmd,
              "makes 24-dim image embeddings", "takes 32-dim", rc=1)
        fails(capsys, [cmd, "--pipeline", karlo, "--clip", karlo] + tail, cmd,
              "has no CLIP image encoder", rc=1)
        fails(capsys, [cmd, "--pipeline", karlo, "--clip", tmp_path / "none"] + tail, cmd,
              "is not a directory", rc=1)
        fails(capsys, [cmd, "--pipeline", tmp_path] + tail, cmd, "no model_index.json", rc=1)
    sample = ["sample", "--prompt", "x", "--out", out]
    fails(capsys, sample + ["--pipeline", karlo, "--rerank", "2"], "sample", "pass --clip DIR",
          rc=1)
    fails(capsys, sample + ["--pipeline", var], "sample", "UnCLIPImageVariationPipeline",
          "no prior", rc=1)
    fails(capsys, sample + ["--pipeline", var, "--rerank", "2"], "sample", "no prior", rc=1)
    fails(capsys, sample + ["--pipeline", karlo, "--clip", var], "sample",
          "give it with --rerank", rc=1)
    fails(capsys, sample + ["--pipeline", karlo, "--clip", dirs["narrow"], "--rerank", "2"],
          "sample", "makes 24-dim", "takes 32-dim", rc=1)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a.png"]
