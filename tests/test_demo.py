"""The embedded default end to end at tiny sizes: train every stage, generate the grid, measure,
report; the image manipulations; bad input of the CLI."""
import json
import os

import numpy as np
import pytest

from unclip_jax.cli import main

TINY = ["total_steps=4", "data.num_examples=64", "log_every=2"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from unclip_jax.shapes_demo.run import run_demo

    w = str(tmp_path_factory.mktemp("demo"))
    res = run_demo(w, size="tiny", extra=TINY, eval_sizes=(4, 2, 2), progress=False)
    return w, res


def test_demo_writes_grid_report_and_metrics(demo):
    from PIL import Image

    w, res = demo
    grid = Image.open(os.path.join(w, "grid.png"))
    assert grid.format == "PNG" and grid.size[0] >= 8 * 96
    report = open(os.path.join(w, "report.md")).read()
    for needle in ("![generated images](grid.png)", "## Faithfulness", "| single |",
                   "text -> image", "sampled by the prior", "## CLIP score",
                   "Sampled with: prior 25 steps, guidance 4; decoder DDPM 25 steps, guidance 8;"):
        assert needle in report
    m = json.load(open(os.path.join(w, "metrics.json")))
    for key in ("sampling", "retrieval", "prior", "faithfulness", "faithfulness_true_embedding",
                "clip_score", "seconds"):
        assert key in m
    # the analyser scores the real renderings of the evaluation prompts perfectly
    for k in ("single", "two", "heldout"):
        assert m["faithfulness"][k + "_real_images"]["csp"] == 1.0
        assert 0.0 <= m["faithfulness"][k]["csp"] <= 1.0
    assert -1.0 <= m["prior"]["prior_cosine"] <= 1.0


def test_a_relative_workdir_works(demo, monkeypatch):
    from unclip_jax.pipeline import UnCLIPPipeline

    w = demo[0]
    monkeypatch.chdir(os.path.dirname(w))
    pipe = UnCLIPPipeline.from_workdir(os.path.basename(w), progress=False)
    assert pipe.image_size == 32


def test_rerunning_the_demo_reuses_the_stages(demo, capsys):
    from unclip_jax.shapes_demo.run import train_stack

    w, _ = demo
    before = {s: sorted(os.listdir(os.path.join(w, s, "checkpoints")))
              for s in ("clip", "prior", "decoder", "upsampler")}
    times = train_stack(w, "tiny", TINY, progress=False)
    out = capsys.readouterr().out
    assert out.count("already trained") == 4 and set(times) == {"data"}
    assert before == {s: sorted(os.listdir(os.path.join(w, s, "checkpoints"))) for s in before}


def test_the_decoder_samples_as_its_config_records(demo, tmp_path):
    """configs/decoder.py's `sampling` block (method, eta, guidance) is what the pipeline uses
    when a call names none."""
    import shutil

    import jax
    import jax.numpy as jnp

    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.workdir import RECORD_FILE

    w = str(tmp_path / "w")
    shutil.copytree(demo[0], w)
    path = os.path.join(w, "decoder", RECORD_FILE)
    rec = json.load(open(path))
    s = rec["sampling"]
    assert (s["method"], s["eta"], s["guidance"]) == ("ddpm", 0.0, 8.0)
    rec["sampling"].update(method="ddim", eta=0.5, guidance=2.5)
    json.dump(rec, open(path, "w"))
    pipe = UnCLIPPipeline.from_workdir(w, progress=False)
    assert pipe.decoder_guidance_default == 2.5
    cond, uncond = pipe.text_conditioning(["a red circle", "a blue square"])
    z = jax.random.normal(jax.random.key(0), (2, pipe.clip.embed_dim))
    run = lambda **kw: np.asarray(pipe.sample_decoder(  # noqa: E731
        z, cond, uncond, steps=5, rng=jax.random.key(1), **kw))
    default = run()
    np.testing.assert_array_equal(default, run(method="ddim", eta=0.5, guidance=2.5))
    assert np.abs(default - run(method="ddpm", eta=0.0, guidance=2.5)).max() > 1e-3
    assert np.abs(default - run(method="ddim", eta=0.5, guidance=8.0)).max() > 1e-3


def test_the_prior_samples_at_its_recorded_guidance(demo, tmp_path):
    """configs/prior.py's `sampling.guidance` (the demo's 2, else Karlo's 4) is the scale the
    pipeline samples the prior at when a call names none; a record without one: 4."""
    import shutil

    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.shapes_demo.run import demo_config
    from unclip_jax.workdir import RECORD_FILE

    assert float(demo_config("prior", str(tmp_path), "demo").sampling.guidance) == 2.0
    w = str(tmp_path / "w")
    shutil.copytree(demo[0], w)
    path = os.path.join(w, "prior", RECORD_FILE)
    rec = json.load(open(path))
    assert rec["sampling"]["guidance"] == 4.0  # the tiny config's
    prompts = ["a red circle", "a blue square"]

    def embeds(pipe, **kw):
        return np.asarray(pipe.generate_float(prompts, seed=3, prior_steps=5, decoder_steps=2,
                                              super_res_steps=2, **kw)["image_embeds"])

    for recorded, want in ((2.5, 2.5), (None, 4.0)):
        rec["sampling"]["guidance"] = recorded
        json.dump(rec, open(path, "w"))
        pipe = UnCLIPPipeline.from_workdir(w, progress=False)
        assert pipe.prior_guidance_default() == want
        default = embeds(pipe)
        np.testing.assert_array_equal(default, embeds(pipe, prior_guidance=want))
        assert np.abs(default - embeds(pipe, prior_guidance=want + 3.0)).max() > 1e-4


def test_variance_explained_closed_form():
    """Unit rows a*onehot(A) (+) b*onehot(B) over a balanced factorial of A (3 levels) x B (2):
    A explains a^2 (1 - 1/3) / (a^2 (1 - 1/3) + b^2 (1 - 1/2)) of the variance."""
    from unclip_jax.shapes_demo.evaluate import variance_explained

    a, b = 1.0, 2.0
    A, B = np.repeat(np.arange(3), 2), np.tile(np.arange(2), 3)
    e = np.concatenate([a * np.eye(3)[A], b * np.eye(2)[B]], axis=1)
    e = np.concatenate([e, 3 * e])  # row norms do not matter
    A, B = np.concatenate([A, A]), np.concatenate([B, B])
    va, vb = a * a * (1 - 1 / 3), b * b * (1 - 1 / 2)
    assert variance_explained(e, A) == pytest.approx(va / (va + vb), rel=1e-12)
    assert variance_explained(e, B) == pytest.approx(vb / (va + vb), rel=1e-12)
    assert variance_explained(e, np.arange(len(A))) == pytest.approx(1.0)  # every row a group
    assert variance_explained(e, np.zeros(len(A))) == pytest.approx(0.0, abs=1e-12)


def test_diagnostics_in_metrics_and_report(demo):
    from unclip_jax.shapes_demo.evaluate import ATTRIBUTES, PROBE_STEPS

    w, _ = demo
    d = json.load(open(os.path.join(w, "metrics.json")))["diagnostics"]
    for emb in ("image", "text"):
        v = d["salience"][emb]
        assert set(v) == set(ATTRIBUTES) and all(0.0 <= x <= 1.0 for x in v.values())
        # main effects of a balanced factorial are orthogonal: together at most the total
        assert sum(v.values()) <= 1.0 + 1e-9
    assert list(d["denoising_probe"]) == [str(t) for t in PROBE_STEPS]
    assert all(0.0 <= r["csp"] <= r["color"] <= 1.0 for r in d["denoising_probe"].values())
    probe = d["caption_shape_probe"]
    assert set(probe) == {"hidden_all_tokens", "hidden_mean", "text_embed"}
    assert all(0.0 <= v[k] <= 1.0 for v in probe.values() for k in ("seen", "heldout"))
    report = open(os.path.join(w, "report.md")).read()
    assert "## Diagnostics: where an attribute is lost" in report and "| 700 |" in report
    assert "| hidden all tokens |" in report


def test_predict_decoder_x0_is_the_samplers_estimate(demo):
    """One DDIM step from t=999 to the end returns the decoder's clean-image estimate."""
    import jax

    from unclip_jax.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_workdir(demo[0], progress=False)
    cond, uncond = pipe.text_conditioning(["a red circle", "a blue square"])
    z = jax.random.normal(jax.random.key(0), (2, pipe.clip.embed_dim))
    n = pipe.decoder.config.unet.sample_size
    x = jax.random.normal(jax.random.key(1), (2, n, n, 3))
    one = pipe.sample_decoder(z, cond, uncond, steps=1, guidance=1.0, method="ddim", eta=0.0,
                              latents=x, rng=jax.random.key(2))
    est = pipe.predict_decoder_x0(x, np.full((2,), 999), z, cond)
    np.testing.assert_allclose(np.asarray(est), np.asarray(one), atol=1e-5)
    assert np.abs(np.asarray(est)).max() > 0.05  # not a trivial zero
    with pytest.raises(ValueError, match="the decoder works at"):
        pipe.predict_decoder_x0(jax.numpy.zeros((2, 2 * n, 2 * n, 3)), np.full((2,), 9), z, cond)


def test_denoising_probe_scores_the_estimate(demo, monkeypatch):
    """The probe reads what the decoder estimates: an oracle that returns the clean image scores
    exactly as the real images at the decoder's size, one that returns blank background finds
    no object."""
    import jax.numpy as jnp

    from unclip_jax.shapes_demo.evaluate import Evaluator, eval_sets, faithfulness
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.images import to_model_range, to_uint8

    pipe = UnCLIPPipeline.from_workdir(demo[0], progress=False)
    s = eval_sets(4, 1, 1)["single"]
    clean = to_model_range(jnp.asarray(s["images"]), pipe.decoder.config.unet.sample_size)
    ev = Evaluator(pipe)
    monkeypatch.setattr(pipe, "predict_decoder_x0", lambda x, t, z, c: clean)
    oracle = ev.denoising_probe(s["images"], s["scenes"], s["prompts"], ts=(100, 900))
    real = faithfulness(to_uint8(np.asarray(clean) * 0.5 + 0.5), s["scenes"])
    assert oracle == {"100": real, "900": real} and real["color"] == 1.0
    monkeypatch.setattr(pipe, "predict_decoder_x0", lambda x, t, z, c: jnp.full_like(clean, -0.78))
    blank = ev.denoising_probe(s["images"], s["scenes"], s["prompts"], ts=(100,))
    assert blank["100"]["csp"] == 0.0 and blank["100"]["count"] == 0.0


@pytest.fixture(scope="module")
def manip(demo):
    from unclip_jax.manipulate import Manipulator
    from unclip_jax.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_workdir(demo[0], progress=False)
    return Manipulator(pipe, steps=50)


@pytest.fixture(scope="module")
def shape_image():
    from unclip_jax.data import shapes

    return shapes.render(shapes.sample_scenes("test", 1, seed=3)[0], 64)


def test_variations(manip, shape_image):
    out = manip.variations(shape_image, n=3, eta=1.0, seed=1)
    size = manip.pipe.image_size
    assert out.shape == (3, size, size, 3) and out.dtype == np.uint8
    assert np.abs(out[0].astype(int) - out[1]).max() > 0  # eta > 0: they differ


def test_variations_at_eta_zero_reconstruct_the_input(manip, shape_image):
    """With a decoder that denoises perfectly (an oracle that knows the image), DDIM inversion
    then decoding at eta = 0 returns the input from an x_T far from it. (The tiny stack of
    this test file is trained for 4 steps: too rough a denoiser for an inversion round trip; the
    demo's decoder reconstructs to a mean error of ~0.01.)"""
    import jax.numpy as jnp

    from unclip_jax.diffusion import GaussianDiffusion
    from unclip_jax.images import center_crop_resize

    pipe = manip.pipe
    target = center_crop_resize(shape_image, manip.size)
    x0 = jnp.asarray(target, jnp.float32) / 127.5 - 1.0
    d = GaussianDiffusion(pipe.decoder.sampling.diffusion)
    assert d.config.prediction == "eps" and d.config.learned_variance
    sab = jnp.asarray(d.sqrt_alphas_cumprod, jnp.float32)
    s1m = jnp.asarray(d.sqrt_one_minus_alphas_cumprod, jnp.float32)

    def oracle(params, x, t, c):
        eps = (x - sab[t][:, None, None, None] * x0) / s1m[t][:, None, None, None]
        return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)

    saved = pipe._decoder_fn
    pipe._decoder_fn, pipe._samplers = oracle, {}
    try:
        rec = manip.variations(shape_image, n=1, eta=0.0, upsample=False)[0]
        x_T = np.asarray(manip.invert(shape_image[None]))[0]
    finally:
        pipe._decoder_fn, pipe._samplers = saved, {}
    err = np.abs(rec.astype(np.float64) - target).mean() / 255
    assert err < 0.005, err
    assert np.abs(x_T - np.asarray(x0)).mean() > 0.5


def test_interpolate_and_textdiff(manip, shape_image):
    from unclip_jax.data import shapes

    other = shapes.render(shapes.sample_scenes("test", 2, seed=5)[1], 64)
    size = manip.pipe.image_size
    for noise in ("interpolate", "fixed"):
        out = manip.interpolate(shape_image, other, steps=4, noise=noise)
        assert out.shape == (4, size, size, 3)
    out = manip.textdiff(shape_image, "a red circle", "a blue square", steps=3)
    assert out.shape == (3, size, size, 3)
    with pytest.raises(ValueError, match="non-empty target"):
        manip.textdiff(shape_image, "x", "  ")


def test_slerp_endpoints_and_norm():
    from unclip_jax.manipulate import slerp

    a, b = np.array([[3.0, 0.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(np.asarray(slerp(a, b, 0.0)), a, atol=1e-6)
    np.testing.assert_allclose(np.asarray(slerp(a, b, 1.0)), b, atol=1e-6)
    mid = np.asarray(slerp(a, b, 0.5))[0]
    np.testing.assert_allclose(np.linalg.norm(mid), 2.0, rtol=1e-5)
    np.testing.assert_allclose(mid / np.linalg.norm(mid), [np.sqrt(0.5)] * 2, rtol=1e-5)


def test_textdiff_uses_the_normalised_text_diff(monkeypatch):
    """textdiff follows the paper: z_d = norm(z_t - z_t0) of the L2-NORMALISED text embeddings,
    and the decoded embeddings are slerp(z_i, z_d |z_i|, theta) (closed form, in numpy). CLIP and
    the decoder are mocked: textdiff's arithmetic alone is under test."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from unclip_jax.manipulate import Manipulator

    rng = np.random.default_rng(0)
    e = 6
    # text embeddings of very different norms (as raw CLIP text embeddings have): the raw
    # difference points elsewhere than the difference of the unit vectors
    table = {"a red circle": rng.normal(size=e) * 20.0, "a blue square": rng.normal(size=e) * 0.5}
    z_i = rng.normal(size=(1, e)) * 3.0

    class Pipe:
        clip = SimpleNamespace(vision_config=SimpleNamespace(image_size=8), vision_params=None,
                               encode_image=None)
        decoder = SimpleNamespace(config=SimpleNamespace(unet=SimpleNamespace(sample_size=8)))

        def encode_text(self, prompts):
            return {"text_embed": jnp.asarray(np.stack([table[p] for p in prompts]), jnp.float32)}

    manip = Manipulator(Pipe(), steps=5)
    monkeypatch.setattr(manip, "embed", lambda imgs: jnp.asarray(z_i, jnp.float32))
    monkeypatch.setattr(manip, "invert", lambda imgs, emb=None: jnp.zeros((1, 8, 8, 3)))
    monkeypatch.setattr(manip, "decode",
                        lambda z, x_T, seed=0, upsample=True: np.asarray(z, np.float64))
    z = manip.textdiff(np.zeros((8, 8, 3), np.uint8), "a red circle", "a blue square", steps=4,
                       max_theta=0.5)

    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    z_d = unit(unit(table["a blue square"]) - unit(table["a red circle"]))
    u = unit(z_i[0])
    omega = np.arccos(np.clip(u @ z_d, -1.0, 1.0))
    want = np.stack([(np.sin((1 - th) * omega) * u + np.sin(th * omega) * z_d) / np.sin(omega)
                     for th in np.linspace(0.0, 0.5, 4)]) * np.linalg.norm(z_i)
    np.testing.assert_allclose(z, want, atol=1e-5)
    # (the raw difference of the unnormalised embeddings is a different direction)
    raw = unit(table["a blue square"] - table["a red circle"])
    assert np.arccos(np.clip(raw @ z_d, -1, 1)) > 0.3


def test_rerank_keeps_the_best_candidate(manip):
    from unclip_jax.shapes_demo.evaluate import Evaluator
    from unclip_jax.manipulate import rerank

    pipe = manip.pipe
    kw = dict(prior_steps=3, decoder_steps=3, super_res_steps=2)
    best = rerank(pipe, ["a small red circle in the center"], 3, seed=2, **kw)
    cands = pipe.generate(["a small red circle in the center"], seed=2, num_images_per_prompt=3,
                          **kw)
    ev = Evaluator(pipe)
    scores = [ev.clip_score(c[None], ["a small red circle in the center"]) for c in cands]
    np.testing.assert_array_equal(best[0], cands[int(np.argmax(scores))])


def test_cli_manipulations_and_eval(demo, tmp_path, capsys):
    from PIL import Image

    w = demo[0]
    from unclip_jax.data import shapes

    img = shapes.render(shapes.sample_scenes("test", 1)[0], 64)
    rgba = tmp_path / "in.png"
    Image.fromarray(img).convert("RGBA").resize((50, 40)).save(rgba)  # other size and mode
    out = tmp_path / "v.png"
    assert main(["variations", "--workdir", w, "--image", str(rgba), "--num", "2",
                 "--steps", "5", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    assert main(["interpolate", "--workdir", w, "--image-a", str(rgba), "--image-b", str(rgba),
                 "--num", "3", "--steps", "5", "--out", str(tmp_path / "i.png")]) == 0
    assert main(["textdiff", "--workdir", w, "--image", str(rgba), "--to", "a blue square",
                 "--num", "2", "--steps", "5", "--out", str(tmp_path / "t.png")]) == 0
    assert main(["sample", "--workdir", w, "--prompt", "a red circle", "--rerank", "2",
                 "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2",
                 "--out", str(tmp_path / "s.png"), "--quiet"]) == 0
    assert main(["eval", "--workdir", w, "--single", "2", "--two", "2", "--heldout", "2"]) == 0
    assert "faithfulness csp single" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["textdiff", "--image", "IMG", "--to", "   "], "only whitespace"),
    (["variations", "--image", "NOTIMG"], "is not an image"),
    (["variations", "--image", "MISSING"], "no such image file"),
    (["sample", "--prompt", "  "], "only whitespace"),
])
def test_cli_bad_input(demo, tmp_path, capsys, argv, needle):
    from unclip_jax.data import shapes
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(shapes.render(shapes.sample_scenes("test", 1)[0], 64)).save(img)
    (tmp_path / "not.png").write_text("hello")
    subst = {"IMG": str(img), "NOTIMG": str(tmp_path / "not.png"),
             "MISSING": str(tmp_path / "nope.png")}
    argv = [subst.get(a, a) for a in argv] + ["--workdir", demo[0], "--out",
                                               str(tmp_path / "o.png")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "o.png").exists()


def test_workdir_missing_a_stage(tmp_path, capsys):
    from PIL import Image

    os.makedirs(tmp_path / "clip")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["variations", "--workdir", str(tmp_path), "--image",
                 str(tmp_path / "x.png")]) == 1
    assert "train it with" in capsys.readouterr().err


def test_heldout_probe_reads_a_linear_code_and_not_noise():
    from unclip_jax.shapes_demo.evaluate import heldout_probe

    rng = np.random.default_rng(0)
    n, labels = 600, rng.integers(0, 3, 600)
    held = rng.random(n) < 0.3
    code = np.eye(3)[labels] @ rng.standard_normal((3, 16))  # the label, linearly, in 16 dims
    out = heldout_probe(code + 0.05 * rng.standard_normal((n, 16)), labels, held)
    assert out["seen"] == 1.0 and out["heldout"] == 1.0
    # a code entangled with a held-out factor: the label's direction flips where held-out
    flipped = np.where(held[:, None], -code, code)
    assert heldout_probe(flipped, labels, held)["heldout"] < 0.2
    noise = heldout_probe(rng.standard_normal((n, 16)), labels, held)
    assert noise["heldout"] < 0.5  # chance is 1/3
    with pytest.raises(ValueError, match="seen and held-out"):
        heldout_probe(code, labels, np.zeros(n, bool))
