"""The stage record and the loading of trained stages (unclip_jax/workdir.py): the record the
trainer writes is what every loader reads; older records load or fail saying what to do; and the
two bugs the old writer/reader split hid (a noise-augmented upsampler could not be sampled; the
decoder's training preview ignored how the decoder is sampled)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import DiffusionConfig, StageSampling
from unclip_jax.workdir import RECORD_FILE, RecordError, StageRecord, read_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["total_steps=4", "data.num_examples=64", "log_every=2"]


def tiny(stage, workdir, *overrides):
    from unclip_jax.shapes_demo.run import demo_config

    return demo_config(stage, workdir, "tiny", [*TINY, "checkpoint.async_save=False",
                                                *overrides])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from unclip_jax.shapes_demo.run import train_stack

    w = str(tmp_path_factory.mktemp("stack"))
    train_stack(w, "tiny", TINY, progress=False)
    return w


# ------------------------------------------------------------------------------ the record
def test_record_round_trip_and_typed_config():
    from unclip_jax.models.unet import UNetConfig

    s = StageSampling(DiffusionConfig(prediction="v"), 1.0, "ddim", 0.5, 3.0, noise_level=7)
    rec = StageRecord("upsampler", UNetConfig(in_channels=6, out_channels=3).to_dict(), s,
                      data={"low_res_size": 16}, paths={"tokenizer": "rel/tok"})
    back = StageRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert back == rec
    assert back.sampling.noise_level == 7 and back.sampling.diffusion.prediction == "v"
    assert isinstance(back.model_config(), UNetConfig) and back.model_config().in_channels == 6
    assert os.path.isabs(back.paths["tokenizer"])


def test_the_trainer_writes_the_record_loaders_read(stack):
    """Every stage of a trained stack has a current record whose typed config and sampling are
    what the pipeline is built from."""
    from unclip_jax.pipeline import UnCLIPPipeline

    recs = {s: read_record(os.path.join(stack, s), expect=s)
            for s in ("clip", "prior", "decoder", "upsampler")}
    assert all(r.version == 2 for r in recs.values())
    pipe = UnCLIPPipeline.from_workdir(stack, progress=False)
    assert pipe.decoder.config == recs["decoder"].model_config()
    assert pipe.decoder.sampling == recs["decoder"].sampling
    assert pipe.prior.sampling.clip_x0 == recs["prior"].model["clip_x0"]
    assert pipe.super_res_first.config == recs["upsampler"].model_config()
    assert recs["upsampler"].data["low_res_size"] == 16
    assert os.path.isabs(recs["prior"].paths["tokenizer"])


def test_a_version_1_record_loads(stack, tmp_path):
    """A workdir written by the first trainer (model configs nested under 'model', sampling
    under 'train') loads, and samples the same images."""
    from unclip_jax.pipeline import UnCLIPPipeline

    w = str(tmp_path / "w")
    shutil.copytree(stack, w)
    for stage in ("clip", "prior", "decoder", "upsampler"):
        path = os.path.join(w, stage, RECORD_FILE)
        rec = json.load(open(path))
        train = dict(rec["train"], **rec["paths"])
        if stage == "clip":
            old = {"stage": "clip", "model": rec["model"], "train": train}
        else:
            net = {"prior": "prior", "decoder": "decoder", "upsampler": "unet"}[stage]
            model = {net: rec["model"], "diffusion": rec["sampling"]["diffusion"]}
            if stage == "prior":
                model["clip_x0"] = rec["model"]["clip_x0"]
            if stage == "upsampler":
                model.update(low_res_size=rec["data"]["low_res_size"],
                             degradation=rec["data"]["degradation"], noise_aug_level=0)
            old = {"stage": stage, "model": model, "train": train}
        json.dump(old, open(path, "w"))
    kw = dict(seed=3, prior_steps=3, decoder_steps=3, super_res_steps=2)
    a = UnCLIPPipeline.from_workdir(stack, progress=False).generate(["a red circle"], **kw)
    b = UnCLIPPipeline.from_workdir(w, progress=False).generate(["a red circle"], **kw)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("text,needle", [
    ("{}", "is not a stage record"), ("[]", "is not a stage record"),
    ("garbage{", "is not valid JSON"),
    ('{"stage": "decoder", "model": {"nonsense": 1}, "version": 2, "sampling": null}',
     "cannot be read as a 'decoder' stage record"),
    ('{"stage": "decoder", "model": {}, "version": 9}', "newer than this unclip_jax reads"),
])
def test_unreadable_records_say_what_to_do(tmp_path, text, needle):
    (tmp_path / RECORD_FILE).write_text(text)
    with pytest.raises(RecordError, match=needle) as e:
        read_record(str(tmp_path))
    assert str(tmp_path / RECORD_FILE) in str(e.value)


def test_swapped_stages_are_named(stack, tmp_path):
    w = str(tmp_path / "w")
    shutil.copytree(stack, w)
    os.rename(os.path.join(w, "prior"), os.path.join(w, "tmp"))
    os.rename(os.path.join(w, "decoder"), os.path.join(w, "prior"))
    os.rename(os.path.join(w, "tmp"), os.path.join(w, "decoder"))
    from unclip_jax.pipeline import UnCLIPPipeline

    with pytest.raises(RecordError, match="records a 'decoder' stage where a 'prior' stage "
                                          "belongs"):
        UnCLIPPipeline.from_workdir(w, progress=False)


# ------------------------------------------------------------------------------ the two bugs
def test_a_noise_augmented_upsampler_samples_at_its_recorded_level(stack, tmp_path):
    """An upsampler trained with noise augmentation records its sampling level; the pipeline
    noises its input to that level and tells the network (it could not be sampled at all)."""
    from unclip_jax.diffusion import GaussianDiffusion, Sampler
    from unclip_jax.models.unet import super_res_denoiser, upsample_input
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.stages import train_stage

    w = str(tmp_path / "w")
    shutil.copytree(stack, w)
    shutil.rmtree(os.path.join(w, "upsampler"))
    train_stage(tiny("upsampler", w, "upsample.noise_aug_max=200",
                     "upsample.sample_noise_level=150", "model.noise_level_cond=True"), w,
                progress=False)
    assert read_record(os.path.join(w, "upsampler")).sampling.noise_level == 150
    pipe = UnCLIPPipeline.from_workdir(w, progress=False)
    low = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    key = jax.random.key(5)
    got = np.asarray(pipe.sample_super_res(low, steps=3, rng=key))

    # the reference, written out: q_sample at the level, the level as conditioning
    up = pipe.super_res_first
    diffusion = GaussianDiffusion(up.sampling.diffusion)
    level = jnp.full((2,), 150, jnp.int32)
    noised = diffusion.q_sample(low, level, jax.random.normal(jax.random.fold_in(key, 2),
                                                              low.shape))
    cond = {"low_res": upsample_input(noised, 32, "bicubic"), "noise_level": level}
    fn = super_res_denoiser(up.config)
    sampler = Sampler.for_stage(fn, up.sampling, 3)
    x = jax.random.normal(jax.random.fold_in(key, 0), (2, 32, 32, 3))
    want = np.clip(np.asarray(sampler(up.params, x, cond, rng=jax.random.fold_in(key, 1)))
                   * 0.5 + 0.5, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the level matters: conditioning on 0 with the clean input gives other images
    cond0 = {"low_res": upsample_input(low, 32, "bicubic"), "noise_level": level * 0}
    other = np.clip(np.asarray(sampler(up.params, x, cond0, rng=jax.random.fold_in(key, 1)))
                    * 0.5 + 0.5, 0, 1)
    assert np.abs(other - got).max() > 1e-3


@pytest.mark.parametrize("sampling", [
    ["sampling.method=ddim", "sampling.eta=0.5", "sampling.guidance=2.5"],
    ["sampling.method=ddpm", "sampling.guidance=1.0"]])
def test_the_decoder_preview_samples_as_the_pipeline_does(stack, tmp_path, sampling):
    """The training preview of the decoder is the pipeline's sample for the same embeddings,
    captions and key: the recorded method / eta / guidance, the null image embedding with the
    empty prompt as the unconditional branch (it sampled DDPM at guidance 3 keeping the
    caption)."""
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.stages import build_stage, train_stage

    w = str(tmp_path / "w")
    shutil.copytree(stack, w)
    shutil.rmtree(os.path.join(w, "decoder"))
    cfg = tiny("decoder", w, *sampling)
    res = train_stage(cfg, w, progress=False)
    stage = build_stage(cfg, w)
    key = jax.random.key(2)
    preview = stage.sample_images(res.state.ema_params, stage.frozen()[1], key, n=4, steps=5)

    pipe = UnCLIPPipeline.from_workdir(w, progress=False)
    look = stage.preview_batch(4)
    z = jnp.asarray(pipe.clip.embed_images(np.asarray(look["image"])))
    cond, uncond = pipe.text_conditioning(look["caption"])
    np.testing.assert_array_equal(np.asarray(cond["text_mask"]), np.asarray(look["text_mask"]))
    guided = pipe.decoder_guidance_default > 1.0
    want = pipe.sample_decoder(z, cond, uncond if guided else None, steps=5, rng=key)
    np.testing.assert_allclose(preview, np.asarray(want) * 0.5 + 0.5, atol=1e-4)


def test_inference_imports_no_training_room():
    """Loading and sampling trained stages (pipeline, workdir, manipulations) import neither the
    stages nor the trainer; the trainer imports no stage (it is handed one)."""
    import subprocess
    import sys

    code = ("import sys, unclip_jax.pipeline, unclip_jax.workdir, unclip_jax.manipulate; "
            "bad = [m for m in sys.modules if m.startswith(('unclip_jax.stages', "
            "'unclip_jax.train.trainer', 'unclip_jax.shapes_demo'))]; assert not bad, bad; "
            "import unclip_jax.train.trainer; "
            "bad = [m for m in sys.modules if m.startswith('unclip_jax.stages')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
