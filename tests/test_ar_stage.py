"""The AR prior as a stage of the one trainer and a choice of the pipeline and the CLI; the
paper's comparison of priors (`unclip-jax compare`) on a tiny trained stack."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from unclip_jax.cli import main

TINY = ["total_steps=4", "data.num_examples=64", "log_every=2"]
AR_OVERRIDES = ["--config.data.num_examples=64", "--config.total_steps=6",
                "--config.log_every=2", "--config.codebook.fit_batches=4"]


def _train_ar(w, *extra, stop_at=None):
    args = ["train", "--config", "configs/ar_prior.py:size=tiny", "--workdir", w, "--quiet",
            *AR_OVERRIDES, *extra]
    if stop_at:
        args += ["--stop-at", str(stop_at)]
    return main(args)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tiny trained stack (clip, prior, decoder, upsampler) with an AR prior, trained in two
    runs (stopped at step 3, resumed)."""
    from unclip_jax.shapes_demo.run import train_stack

    w = str(tmp_path_factory.mktemp("arstack"))
    train_stack(w, "tiny", TINY, progress=False)
    assert _train_ar(w, stop_at=3) == 0
    book = os.path.join(w, "ar_prior", "codebook.npz")
    first = open(book, "rb").read()
    assert _train_ar(w) == 0
    return w, first


def test_the_codebook_is_fitted_once_and_kept(stack):
    from unclip_jax.models.ar_codes import Codebook
    from unclip_jax.workdir import read_record

    w, first = stack
    book = os.path.join(w, "ar_prior", "codebook.npz")
    assert open(book, "rb").read() == first  # the resumed run read it back, did not refit
    rec = read_record(os.path.join(w, "ar_prior"), expect="ar_prior")
    cb = Codebook.load(book)
    assert rec.model["num_components"] == cb.num_components >= 1
    assert np.cumsum(cb.explained)[-1] >= 0.99 or cb.num_components == cb.embed_dim
    assert rec.data["codebook"] == "codebook.npz"
    steps = sorted(int(s) for s in os.listdir(os.path.join(w, "ar_prior", "checkpoints")))
    assert steps[-1] == 6


def test_pipeline_samples_the_ar_prior_through_its_codebook(stack):
    import jax.numpy as jnp

    from unclip_jax.models import ar_prior as ar_lib
    from unclip_jax.pipeline import UnCLIPPipeline

    w, _ = stack
    pipe = UnCLIPPipeline.from_workdir(w, progress=False)
    assert pipe.ar_prior is not None
    ar = pipe.ar_prior
    prompts = ["a red circle", "a blue square on the left"]
    cond, uncond = pipe.text_conditioning(prompts)
    rng = jax.random.key(3)
    z = np.asarray(pipe.sample_ar_prior(cond, uncond, guidance=2.0, rng=rng, candidates=1,
                                        temperature=0.8, top_k=5, dot_quantiles=(0.5, 1.0)))
    # the same draw by hand: the dot bucket from fold_in(rng, 0) in the upper half, the codes
    # from the cached sampler with fold_in(rng, 1), decoded by the stored codebook
    cb = ar.codebook
    lo, hi = cb.dot_bucket_at(0.5), min(cb.dot_bucket_at(1.0), cb.num_dot_buckets - 1)
    dot = jax.random.randint(jax.random.fold_in(rng, 0), (2,), lo, hi + 1)
    codes = ar_lib.sample(ar.config, ar.params, cond, uncond, dot=dot,
                          rng=jax.random.fold_in(rng, 1), temperature=0.8, top_k=5,
                          guidance_scale=2.0)
    np.testing.assert_allclose(z, np.asarray(cb.decode(jnp.asarray(codes))), atol=1e-5)
    # every sampled embedding is a point of the codebook's grid: encoding it gives its codes
    np.testing.assert_array_equal(np.asarray(cb.encode(z.astype(np.float64))),
                                  np.asarray(codes))
    images = pipe.generate(prompts, prior="ar", seed=0, prior_steps=3, decoder_steps=3,
                           super_res_steps=2)
    assert images.shape == (2, pipe.image_size, pipe.image_size, 3)
    again = pipe.generate(prompts, prior="ar", seed=0, prior_steps=3, decoder_steps=3,
                          super_res_steps=2)
    np.testing.assert_array_equal(images, again)
    other = pipe.generate(prompts, prior="diffusion", seed=0, prior_steps=3, decoder_steps=3,
                          super_res_steps=2)
    assert not np.array_equal(images, other)
    # batches of row keys (generate_batches) draw each image from its own key
    chunks = [im for _, im in pipe.generate_batches(prompts * 2, prior="ar", batch_size=3,
                                                    prior_steps=3, decoder_steps=3,
                                                    super_res_steps=2)]
    assert np.concatenate(chunks).shape == (4, pipe.image_size, pipe.image_size, 3)


def test_ar_bad_input(stack):
    from unclip_jax.pipeline import UnCLIPPipeline

    w, _ = stack
    pipe = UnCLIPPipeline.from_workdir(w, progress=False)
    cond, uncond = pipe.text_conditioning(["a red circle"])
    for kw, msg in ((dict(top_k=0), "top_k"), (dict(top_k=-1), "top_k"),
                    (dict(temperature=0.0), "temperature"),
                    (dict(temperature=-1.0), "temperature"),
                    (dict(dot_quantiles=(0.9, 0.2)), "dot_quantiles")):
        with pytest.raises(ValueError, match=msg):
            pipe.sample_ar_prior(cond, uncond, rng=jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="prior must be"):
        pipe.generate(["a red circle"], prior="autoregressive")


def test_cli_samples_with_the_ar_prior(stack, tmp_path, capsys):
    w, _ = stack
    out = str(tmp_path / "g.png")
    assert main(["sample", "--workdir", w, "--prior", "ar", "--prompt", "a red circle",
                 "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2",
                 "--ar-temperature", "0.9", "--ar-top-k", "4", "--out", out, "--quiet"]) == 0
    assert os.path.getsize(out) > 0
    for flag, value in (("--ar-top-k", "0"), ("--ar-temperature", "0"),
                        ("--ar-temperature", "-2")):
        code = main(["sample", "--workdir", w, "--prior", "ar", "--prompt", "x", flag, value,
                     "--out", out])
        assert code == 2
        assert flag in capsys.readouterr().err


def test_prior_ar_without_an_ar_prior_is_one_clear_error(stack, tmp_path, capsys):
    w = str(tmp_path / "w")
    shutil.copytree(stack[0], w, ignore=shutil.ignore_patterns("ar_prior"))
    code = main(["sample", "--workdir", w, "--prior", "ar", "--prompt", "a red circle",
                 "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 1 and "no trained ar_prior" in err and "configs/ar_prior.py" in err
    assert len(err.strip().splitlines()) == 1


def test_a_codebook_of_another_clip_width_is_refused(stack, tmp_path, capsys):
    from unclip_jax.models.ar_codes import fit_codebook

    w = str(tmp_path / "w")
    shutil.copytree(stack[0], w, ignore=shutil.ignore_patterns("ar_prior"))
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(w, "ar_prior"))
    fit_codebook(rng.normal(size=(64, 48)), rng.normal(size=(64, 48)), num_buckets=8,
                 num_dot_buckets=4).save(os.path.join(w, "ar_prior", "codebook.npz"))
    assert _train_ar(w) == 1
    err = capsys.readouterr().err
    assert "codebook.npz" in err and "48" in err and "32" in err
    # and the pipeline refuses a stored stage whose codebook does not fit it
    from unclip_jax.pipeline import UnCLIPPipeline

    w2 = str(tmp_path / "w2")
    shutil.copytree(stack[0], w2)
    shutil.copy(os.path.join(w, "ar_prior", "codebook.npz"),
                os.path.join(w2, "ar_prior", "codebook.npz"))
    with pytest.raises(ValueError, match="codebook"):
        UnCLIPPipeline.from_workdir(w2, progress=False)


def test_diversity_is_the_mean_pairwise_rms_distance():
    from unclip_jax.shapes_demo.compare import diversity

    a = np.zeros((4, 2, 2, 3), np.uint8)
    a[1] = 10   # prompt 0: samples 0 and 1, RMS distance 10
    a[3] = 4    # prompt 1: samples 2 and 3, distance 4
    assert diversity(a, 2) == pytest.approx(7.0)
    b = np.zeros((3, 1, 1, 1))
    b[1], b[2] = 3, 6  # one prompt, three samples: distances 3, 6, 3
    assert diversity(b, 3) == pytest.approx(4.0)


def test_compare_writes_the_table_and_grid(stack, tmp_path):
    from unclip_jax.shapes_demo.compare import VARIANTS

    w = str(tmp_path / "w")
    shutil.copytree(stack[0], w)
    assert main(["compare", "--workdir", w, "--single", "2", "--two", "1", "--heldout", "1",
                 "--diversity", "1", "--per-prompt", "2", "--grid-prompts", "2"]) == 0
    res = json.load(open(os.path.join(w, "compare.json")))
    assert list(res["variants"]) == list(VARIANTS)
    for v, r in res["variants"].items():
        for name in ("single", "two", "heldout"):
            assert 0.0 <= r["faithfulness"][name]["csp"] <= 1.0
        assert r["seconds_per_image"] > 0 and r["diversity"] >= 0
        assert (r["prior_cosine"] is None) == (v in ("text_embedding", "caption_only"))
    assert res["real_images"] == {"single": 1.0, "two": 1.0, "heldout": 1.0}
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.shapes_demo.evaluate import Evaluator, eval_sets

    single = eval_sets(2, 1, 1, 0)["single"]  # the real images' CLIP score, recomputed
    ev = Evaluator(UnCLIPPipeline.from_workdir(w, progress=False))
    assert res["real_images_clip_score"] == pytest.approx(
        ev.clip_score(single["images"], single["prompts"]), abs=1e-4)
    md = open(os.path.join(w, "compare.md")).read()
    assert "(b) AR prior" in md and "![the variants](compare.png)" in md
    from PIL import Image

    assert Image.open(os.path.join(w, "compare.png")).size[0] >= 2 * 96
