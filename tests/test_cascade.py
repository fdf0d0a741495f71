"""The upsampler cascade (unclip_jax/cascade.py): a tiny stack with two upsamplers (decoder 16 px
-> upsampler 32 -> upsampler2 64, the second trained on BSR-degraded inputs into its own stage
directory through the CLI) samples through `from_workdir`; per-step steps and methods; the keys
of each step; a noise-augmented second step; chains that do not fit; bad arguments."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["total_steps=4", "data.num_examples=64", "log_every=2"]  # as tests/test_workdir.py
UPSAMPLER = os.path.join(ROOT, "configs", "upsampler.py")
KW = dict(prior_steps=2, decoder_steps=2)
GF = dict(KW, prior_candidates=1)  # generate_float's


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The tiny stack of tests/test_workdir.py, then a second upsampler (tiny2: 32 -> 64, BSR)
    trained with `unclip-jax train ... --config.stage_dir=upsampler2`."""
    from unclip_jax.cli import main
    from unclip_jax.shapes_demo.run import train_stack

    w = str(tmp_path_factory.mktemp("cascade"))
    train_stack(w, "tiny", TINY, progress=False)
    rc = main(["train", "--config", UPSAMPLER + ":size=tiny2", "--workdir", w, "--quiet",
               "--config.stage_dir=upsampler2", "--config.checkpoint.async_save=False",
               f"--config.data.cache_dir={os.path.join(w, 'data')}",
               *[f"--config.{o}" for o in TINY]])
    assert rc == 0
    return w


@pytest.fixture(scope="module")
def pipe(stack):
    from unclip_jax.pipeline import UnCLIPPipeline

    return UnCLIPPipeline.from_workdir(stack, progress=False)


def copy_stack(stack, dest):
    shutil.copytree(stack, dest, ignore=shutil.ignore_patterns("data", "tb"))
    return str(dest)


def edit_record(workdir, stage, **data):
    path = os.path.join(workdir, stage, "config.json")
    rec = json.load(open(path))
    rec["data"].update(data)
    json.dump(rec, open(path, "w"))


# ------------------------------------------------------------------------------ train, load
def test_the_second_upsampler_trains_into_its_own_directory(stack, capsys):
    from unclip_jax.train.config import load_config
    from unclip_jax.workdir import load_stack, read_record

    rec = read_record(os.path.join(stack, "upsampler2"), expect="upsampler")
    assert rec.data["low_res_size"] == 32 and rec.data["degradation"] == "bsr"
    assert rec.model_config().sample_size == 64 and rec.train["stage_dir"] == "upsampler2"
    assert read_record(os.path.join(stack, "upsampler")).model_config().sample_size == 32
    # the cascade's second stages default to upsampler2; the others to their stage's name
    assert load_config(UPSAMPLER + ":size=tiny2").stage_dir == "upsampler2"
    assert load_config(UPSAMPLER + ":size=sr1024").stage_dir == "upsampler2"
    assert load_config(UPSAMPLER + ":size=tiny").stage_dir == ""
    st = load_stack(stack)
    assert [u.config.sample_size for u in st.upsamplers] == [32, 64]
    assert st.upsampler is st.upsamplers[0]


def test_from_workdir_builds_the_whole_chain(stack, pipe):
    from unclip_jax.pipeline import UnCLIPPipeline

    assert len(pipe.upsamplers) == 2 and pipe.image_size == 64
    assert pipe.super_res_first is pipe.upsamplers[0].first and pipe.super_res_last is None
    assert [u.low_res_size for u in pipe.upsamplers] == [16, 32]
    images = pipe.generate(["a red circle", "a blue square"], seed=1, super_res_steps=[2, 3],
                           **KW)
    assert images.dtype == np.uint8 and images.shape == (2, 64, 64, 3)
    bare = UnCLIPPipeline.from_workdir(stack, upsampler=False, progress=False)
    assert bare.upsamplers == [] and bare.super_res_first is None and bare.image_size == 16


# ------------------------------------------------------------------------------ sampling
def test_the_chain_runs_each_step_with_its_steps_method_and_key(pipe):
    """generate_float = the decoder, then step 0 from fold_in(key(seed), 2) as the single
    upsampler always drew, then step 1 from cascade.step_key; each with its own steps and
    method; step 0 alone is its sampler called directly."""
    from unclip_jax.cascade import step_key
    from unclip_jax.diffusion import Sampler
    from unclip_jax.models.unet import super_res_denoiser, upsample_input
    from unclip_jax.pipeline import UnCLIPPipeline

    out = pipe.generate_float(["a red circle", "green"], seed=3, super_res_steps=(2, 3),
                              super_res_method=[None, "ddim"], **GF)
    low = out["low_res"]
    key = jax.random.fold_in(jax.random.key(3), 2)
    mid = pipe.sample_upsampler(0, low, steps=2, rng=key)
    assert mid.shape == (2, 32, 32, 3)
    final = pipe.sample_upsampler(1, mid, steps=3, method="ddim", rng=step_key(key, 1))
    np.testing.assert_array_equal(out["images"], jnp.clip(final * 0.5 + 0.5, 0, 1))

    # step 0 is its sampler, called directly (initial latents fold_in(key, 0), noise (key, 1))
    up = pipe.upsamplers[0].first
    sampler = Sampler.for_stage(super_res_denoiser(up.config), up.sampling, 2)
    x = jax.random.normal(jax.random.fold_in(key, 0), (2, 32, 32, 3))
    want = sampler(up.params, x, {"low_res": upsample_input(low, 32, "bicubic")},
                   rng=jax.random.fold_in(key, 1))
    np.testing.assert_allclose(mid, jnp.clip(want, -1, 1), atol=1e-5)
    # ... and what a pipeline holding step 0 alone makes (what it drew before the cascade)
    one = UnCLIPPipeline(pipe.tokenizer, (pipe.text_config, pipe.text_params), pipe.prior,
                         pipe.decoder, pipe.upsamplers[0], progress=False)
    assert one.image_size == 32
    alone = one.generate_float(["a red circle", "green"], seed=3, super_res_steps=2, **GF)
    np.testing.assert_allclose(alone["images"], jnp.clip(mid * 0.5 + 0.5, 0, 1), atol=1e-6)

    # the per-step choices are used: step 1 by DDPM (its record) or with other steps differs
    ddpm = pipe.sample_upsampler(1, mid, steps=3, rng=step_key(key, 1))
    fewer = pipe.sample_upsampler(1, mid, steps=2, method="ddim", rng=step_key(key, 1))
    assert pipe.upsamplers[1].sampling.method == "ddpm"
    assert np.abs(np.asarray(ddpm - final)).max() > 1e-3
    assert np.abs(np.asarray(fewer - final)).max() > 1e-3
    assert {k[:3] for k in pipe._samplers if k[0] == "super_res"} >= {
        ("super_res", 0, 2), ("super_res", 1, 3), ("super_res", 1, 2)}


def test_later_steps_draw_per_row_from_a_batch_of_keys():
    from unclip_jax.cascade import step_key

    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(3))
    assert step_key(keys, 0) is keys
    batch = jax.random.key_data(step_key(keys, 2))
    rows = jnp.stack([jax.random.key_data(step_key(keys[i], 2)) for i in range(3)])
    np.testing.assert_array_equal(batch, rows)
    assert not np.array_equal(np.asarray(batch), np.asarray(jax.random.key_data(keys)))


def test_a_noise_augmented_second_step_samples_at_its_level(pipe):
    """A second step trained with noise augmentation (noise_level_cond) sees its input noised
    to its recorded level, and that level, inside the chain too."""
    import flax.linen as nn

    from unclip_jax.cascade import UpsamplerStep, step_key
    from unclip_jax.diffusion import GaussianDiffusion, Sampler
    from unclip_jax.models.unet import UNet, init_inputs, super_res_denoiser, upsample_input
    from unclip_jax.pipeline import Component, UnCLIPPipeline

    base = pipe.upsamplers[1].first
    cfg = dataclasses.replace(base.config, noise_level_cond=True)
    x0, t0, kw = init_inputs(cfg)
    params = nn.meta.unbox(UNet(cfg).init(jax.random.key(1), x0, t0, **kw))["params"]
    sampling = dataclasses.replace(base.sampling, noise_level=150)
    aug = UnCLIPPipeline(pipe.tokenizer, (pipe.text_config, pipe.text_params), pipe.prior,
                         pipe.decoder, pipe.upsamplers[0],
                         more_upsamplers=[UpsamplerStep(Component(cfg, params, sampling), None,
                                                        32)], progress=False)
    low = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    key = jax.random.key(5)
    got = aug.sample_upsampler(1, low, steps=2, rng=key)

    level = jnp.full((2,), 150, jnp.int32)
    noised = GaussianDiffusion(sampling.diffusion).q_sample(
        low, level, jax.random.normal(jax.random.fold_in(key, 2), low.shape))
    sampler = Sampler.for_stage(super_res_denoiser(cfg), sampling, 2)
    x = jax.random.normal(jax.random.fold_in(key, 0), (2, 64, 64, 3))

    def run(cond):
        return jnp.clip(sampler(params, x, cond, rng=jax.random.fold_in(key, 1)), -1, 1)
    want = run({"low_res": upsample_input(noised, 64, "bicubic"), "noise_level": level})
    np.testing.assert_allclose(got, want, atol=1e-5)
    clean = run({"low_res": upsample_input(low, 64, "bicubic"), "noise_level": level * 0})
    assert np.abs(np.asarray(clean - got)).max() > 1e-3  # the level matters
    # inside the chain: step 1 gets step 0's output, noised at its level
    low16 = low[:, ::2, ::2]
    chain = aug.sample_super_res(low16, steps=2, rng=key)
    mid = aug.sample_upsampler(0, low16, steps=2, rng=key)
    last = aug.sample_upsampler(1, mid, steps=2, rng=step_key(key, 1))
    np.testing.assert_array_equal(chain, jnp.clip(last * 0.5 + 0.5, 0, 1))


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("stage,low,needle", [
    ("upsampler2", 16, "upsampler2 upsamples 16x16 images, but {w}/upsampler before it makes "
                       "32x32 ones"),
    ("upsampler", 32, "upsampler upsamples 32x32 images, but the decoder before it makes "
                      "16x16 ones"),
])
def test_a_chain_whose_sizes_do_not_follow_on_is_refused(stack, tmp_path, monkeypatch, stage,
                                                         low, needle):
    from unclip_jax import workdir
    from unclip_jax.pipeline import UnCLIPPipeline

    w = copy_stack(stack, tmp_path / "w")
    edit_record(w, stage, low_res_size=low)

    def boom(*a, **k):
        raise AssertionError("a checkpoint was read before the chain was checked")
    monkeypatch.setattr(workdir, "load_stage", boom)
    with pytest.raises(workdir.RecordError, match="low_res_size") as e:
        UnCLIPPipeline.from_workdir(w, progress=False)
    assert needle.format(w=w) in str(e.value)


def test_the_constructor_refuses_a_chain_that_does_not_fit(pipe):
    from unclip_jax.cascade import UpsamplerStep
    from unclip_jax.pipeline import UnCLIPPipeline

    second = pipe.upsamplers[1]
    bad = UpsamplerStep(second.first, None, 16)
    with pytest.raises(ValueError, match="upsampler step 1 upsamples 16x16 images, but "
                                         "upsampler step 0 before it makes 32x32"):
        UnCLIPPipeline(pipe.tokenizer, (pipe.text_config, pipe.text_params), pipe.prior,
                       pipe.decoder, pipe.upsamplers[0], more_upsamplers=[bad], progress=False)
    with pytest.raises(ValueError, match="takes 32x32 images"):
        pipe.sample_upsampler(1, jnp.zeros((1, 16, 16, 3)), steps=1, rng=jax.random.key(0))


def test_a_gap_in_the_chain_is_refused(stack, tmp_path):
    from unclip_jax.workdir import RecordError, load_stack

    w = copy_stack(stack, tmp_path / "w")
    os.rename(os.path.join(w, "upsampler2"), os.path.join(w, "upsampler3"))
    with pytest.raises(RecordError, match="has upsampler3/ but no upsampler2/"):
        load_stack(w)
    os.rename(os.path.join(w, "upsampler3"), os.path.join(w, "upsampler2"))
    shutil.rmtree(os.path.join(w, "upsampler2", "checkpoints"))
    with pytest.raises(FileNotFoundError, match="no trained upsampler2 stage: train it with "
                                                r"`unclip-jax train --config configs/upsampler"
                                                r"\.py:size=\.\.\. --config\.stage_dir="
                                                "upsampler2"):
        load_stack(w)


@pytest.mark.parametrize("kw,msg", [
    (dict(super_res_steps=[2]), "super_res_steps has 1 entry, but the pipeline has 2 "
                                "upsampler steps"),
    (dict(super_res_steps=(2, 3, 4)), "super_res_steps has 3 entries"),
    (dict(super_res_steps=[2, 0]), r"super_res_steps\[1\] must be a positive integer, got 0"),
    (dict(super_res_steps=[2, 1.5]), r"super_res_steps\[1\] must be a positive integer"),
    (dict(super_res_steps=[True, 2]), r"super_res_steps\[0\] must be a positive integer"),
    (dict(super_res_steps=0), "super_res_steps must be a positive integer"),
    (dict(super_res_method="euler"), "super_res_method must be None .* or one of 'ddpm', "
                                     "'ddim', got 'euler'"),
    (dict(super_res_method=["ddim"]), "super_res_method has 1 entry"),
    (dict(super_res_method=["ddim", "x"]), r"super_res_method\[1\]"),
])
def test_bad_per_step_arguments(pipe, kw, msg):
    with pytest.raises(ValueError, match=msg):
        pipe.generate(["x"], **KW, **kw)
    with pytest.raises(ValueError, match=msg):  # at the call, not at the first next()
        pipe.generate_batches(["x"], **KW, **kw)


def test_stage_dir_must_be_a_plain_name(tmp_path, capsys):
    from unclip_jax.cli import main

    for bad, needle in (("../x", "one plain directory name"), ("a/b", "one plain directory"),
                        ("decoder", "is where the decoder stage trains")):
        rc = main(["train", "--config", UPSAMPLER + ":size=tiny", "--workdir",
                   str(tmp_path / "w"), f"--config.stage_dir={bad}"])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and "\n" not in err and needle in err, err
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------ the CLI
def test_cli_samples_through_the_chain(stack, pipe, tmp_path, capsys, monkeypatch):
    from unclip_jax.cli import main
    from unclip_jax.pipeline import UnCLIPPipeline

    # the module's pipeline (already loaded: from_workdir is tested above)
    monkeypatch.setattr(UnCLIPPipeline, "from_workdir", lambda *a, **k: pipe)
    out = tmp_path / "g.png"
    fast = ["--prior-steps", "2", "--decoder-steps", "2", "--quiet", "--prompt", "a red circle"]
    rc = main(["sample", "--workdir", stack, "--out", str(out), "--super-res-steps", "2,3",
               "--super-res-method", "ddim,ddpm", *fast])
    assert rc == 0 and "wrote 1 images (64x64)" in capsys.readouterr().out
    rc = main(["sample", "--workdir", stack, "--out", str(tmp_path / "h.png"),
               "--super-res-steps", "2,2,2", *fast])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err
    assert "super_res_steps has 3 entries, but the pipeline has 2 upsampler steps" in err
    rc = main(["sample", "--workdir", stack, "--out", str(tmp_path / "i.png"),
               "--super-res-steps", "2,x", *fast])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "entry 2 of '2,x'" in err
