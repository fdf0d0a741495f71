"""`config.init_from`: every stage's step-0 parameters from imported weights (a diffusers
UnCLIPPipeline, a transformers CLIP, a stage trained here), checked, recorded, never re-read on
resume; fine-tuning an imported prior lowers its loss. Peers are built locally with random weights
(tests/peers.py); nothing is downloaded."""
import json
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from unclip_jax.stages import train_stage
from unclip_jax.train.config import apply_override, load_config
from unclip_jax.train.init_from import InitFromError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]  # most runs on one device (2 CPU cores); the sharded one on all 8


def config(stage, *overrides, model=None):
    """configs/<stage>.py:size=tiny with `model` (the peer's, as converted) as its whole model
    config, then the overrides."""
    cfg = load_config(os.path.join(ROOT, "configs", f"{stage}.py") + ":size=tiny",
                      ["checkpoint.async_save=False", "log_every=1", "data.num_examples=64"])
    if model is not None:
        with cfg.unlocked():
            cfg.model = ml_collections.ConfigDict(model)
    for ov in overrides:
        key, _, value = ov.partition("=")
        apply_override(cfg, key, value)
    return cfg


def by_name(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in by_name(tree).items()}


def assert_same(got, want):
    """Every tensor the same, bit for bit."""
    g, w = flat(got), flat(want)
    assert sorted(g) == sorted(w)
    for k in w:
        assert g[k].shape == w[k].shape and g[k].dtype == w[k].dtype, k
        assert np.array_equal(g[k], w[k]), k


def record(stage_dir):
    with open(os.path.join(stage_dir, "config.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """A diffusers UnCLIPPipeline of Karlo's architecture at tiny shapes, random weights."""
    from peers import tiny_unclip_pipeline

    path = str(tmp_path_factory.mktemp("peer") / "karlo-tiny")
    tiny_unclip_pipeline(path)
    return path


@pytest.fixture(scope="module")
def converted(peer):
    """The peer's components through the converters: (config, host params) each."""
    from unclip_jax.convert.diffusers_prior import load_diffusers_prior
    from unclip_jax.convert.diffusers_unet import load_diffusers_decoder, load_diffusers_unet

    host = lambda cp: (cp[0], jax.tree.map(np.asarray, cp[1]))  # noqa: E731
    sub = lambda c: os.path.join(peer, c)  # noqa: E731
    return {"prior": host(load_diffusers_prior(sub("prior"), sub("prior_scheduler"))),
            "decoder": host(load_diffusers_decoder(sub("decoder"), sub("text_proj"))),
            "super_res_first": host(load_diffusers_unet(sub("super_res_first"))),
            "super_res_last": host(load_diffusers_unet(sub("super_res_last")))}


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny random transformers CLIPModel with its tokenizer saved beside it: text width and
    projection 32 and context 16, as the peer's text encoder (the frozen CLIP of the prior and
    decoder stages, and a source for the CLIP stage)."""
    import torch
    import transformers
    from peers import tiny_clip_tokenizer

    path = str(tmp_path_factory.mktemp("hf_clip"))
    _, vocab = tiny_clip_tokenizer(path, model_max_length=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=4, image_size=16, patch_size=8),
        projection_dim=32))
    model.save_pretrained(path)
    return path


def prior_config(init_from, clip_dir, converted, *overrides):
    m = converted["prior"][0].to_dict()
    return config("prior", f"init_from={init_from}", f"clip_dir={clip_dir}", "batch_size=8",
                  *overrides, model=m)


def upsampler_config(init_from, converted, component="super_res_first", *overrides):
    m = converted[component][0].to_dict()
    return config("upsampler", f"init_from={init_from}", "upsample.low_res_size=8",
                  "upsample.crop_size=16", *overrides, model=m)


# ------------------------------------------------------------------------------ the prior
@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, peer, hf_clip, converted):
    """The prior initialised from a copy of the peer (step 0 saved, nothing trained), then
    the copy deleted and the run resumed for 40 steps of fine-tuning on the shapes data."""
    base = tmp_path_factory.mktemp("prior")
    src = str(base / "karlo-copy")
    shutil.copytree(peer, src)
    w = str(base / "w")
    cfg = prior_config(src, hf_clip, converted, "total_steps=40", "optimizer.warmup_steps=0",
                       "checkpoint.every=100")
    step0 = train_stage(cfg, w, progress=False, devices=ONE, stop_at_step=0)
    rec0 = record(os.path.join(w, "prior"))
    shutil.rmtree(src)  # the source is gone: the resumed run must not read it
    run = train_stage(cfg, w, progress=False, devices=ONE)
    return dict(step0=step0, rec0=rec0, run=run, src=src, w=w)


def test_prior_step0_is_the_peers_prior(prior_run, converted):
    st = prior_run["step0"].state
    assert prior_run["step0"].step == 0 and int(st.step) == 0
    assert_same(st.params, converted["prior"][1])
    assert_same(st.ema_params, converted["prior"][1])  # EMA = the imported params
    # post_init did not overwrite the imported statistics: Karlo-like clip_mean / clip_std of
    # the peer, not the frozen CLIP's data statistics
    p = converted["prior"][1]
    assert np.abs(p["clip_mean"]).max() > 0.05 and np.abs(p["clip_std"] - 1).max() > 0.1
    # the optimizer starts fresh: Adam's moments zero, its counts zero
    leaves = flat(st.opt_state)
    assert leaves and all(not np.any(v) for v in leaves.values()), \
        [k for k, v in leaves.items() if np.any(v)]


def test_prior_record_names_the_source(prior_run):
    entry = prior_run["rec0"]["init_from"]
    assert entry["source"] == os.path.abspath(prior_run["src"]) and os.path.isabs(entry["source"])
    assert entry["kind"] == "diffusers_pipeline" and entry["component"] == "prior"
    assert any("prior" in t and "clip_mean" in t for t in entry["taken"])
    assert entry["tensors"] == len(flat(prior_run["step0"].state.params))
    # the resumed run (source gone) kept the entry and trained from the checkpoint
    assert record(os.path.join(prior_run["w"], "prior"))["init_from"] == entry
    assert prior_run["run"].history[0]["step"] == 1 and prior_run["run"].step == 40


def test_finetuning_the_imported_prior_lowers_its_loss(prior_run, converted):
    loss = np.array([h["loss"] for h in prior_run["run"].history])
    assert len(loss) == 40 and np.all(np.isfinite(loss))
    first, last = loss[:8], loss[-8:]
    # the step-to-step noise (each step draws its own t, noise and batch): the spread of
    # successive differences over the last 16 steps, where the curve has flattened
    noise = float(np.std(np.diff(loss[-16:])) / np.sqrt(2))
    drop = float(first.mean() - last.mean())
    print(f"prior fine-tuning loss: first 8 steps {first.mean():.4f}, last 8 {last.mean():.4f}, "
          f"step-to-step noise {noise:.4f}")
    # measured: 1.31 -> 0.65, noise 0.010 (66x below the drop)
    assert drop > 10 * noise and last.mean() < 0.7 * first.mean(), (loss, noise)
    # the statistics are frozen (the trainable mask): still the peer's after 40 steps
    p = prior_run["run"].state.params
    np.testing.assert_array_equal(np.asarray(p["clip_mean"]), converted["prior"][1]["clip_mean"])
    np.testing.assert_array_equal(np.asarray(p["clip_std"]), converted["prior"][1]["clip_std"])


def test_missing_and_extra_tensors_are_named(tmp_path, peer, hf_clip, converted):
    """A 'scale' prior has clip_norm where Karlo's has clip_mean / clip_std: both named, and
    nothing is written into the stage directory."""
    cfg = prior_config(peer, hf_clip, converted, "model.embedding_norm=scale")
    with pytest.raises(InitFromError) as e:
        train_stage(cfg, str(tmp_path), progress=False, devices=ONE, stop_at_step=0)
    msg = str(e.value)
    assert "the source has no tensor clip_norm (shape (1, 1))" in msg, msg
    assert "the source has tensor clip_mean (shape (1, 32))" in msg and "(2 tensors in all)" in msg
    assert not os.path.exists(tmp_path / "prior")


# ------------------------------------------------------------------------------ decoder, upsampler
def test_decoder_step0_is_the_peers_decoder_with_text_proj(tmp_path, peer, hf_clip, converted):
    cfg = config("decoder", f"init_from={peer}", f"clip_dir={hf_clip}",
                 model=converted["decoder"][0].to_dict())
    res = train_stage(cfg, str(tmp_path), progress=False, devices=ONE, stop_at_step=0)
    want = converted["decoder"][1]
    assert {"null_image_embed", "image_to_tokens", "text_proj", "text_norm"} <= set(want)
    assert_same(res.state.params, want)
    assert_same(res.state.ema_params, want)
    entry = record(tmp_path / "decoder")["init_from"]
    assert entry["taken"] == ["decoder", "text_proj"] and entry["source"] == peer


@pytest.fixture(scope="module")
def upsampler_workdir(tmp_path_factory, peer, converted):
    """W/upsampler initialised from the peer's super_res_first, then trained 2 steps (its EMA
    then differs from its params): a stage trained here, the source of later tests."""
    w = str(tmp_path_factory.mktemp("upw"))
    cfg = upsampler_config(peer, converted, "super_res_first", "total_steps=2")
    step0 = train_stage(cfg, w, progress=False, devices=ONE, stop_at_step=0)
    run = train_stage(cfg, w, progress=False, devices=ONE)
    return dict(w=w, step0=step0, run=run)


def test_upsampler_step0_is_super_res_first(upsampler_workdir, converted):
    assert_same(upsampler_workdir["step0"].state.params, converted["super_res_first"][1])
    entry = record(os.path.join(upsampler_workdir["w"], "upsampler"))["init_from"]
    assert entry["component"] == "super_res_first" and entry["taken"] == ["super_res_first"]


@pytest.mark.parametrize("form", ["selector", "folder"])
def test_super_res_last_by_selector_or_folder(tmp_path, peer, converted, form):
    first, last = converted["super_res_first"][1], converted["super_res_last"][1]
    assert not np.array_equal(first["conv_in"]["kernel"], last["conv_in"]["kernel"])
    spec = f"{peer}:super_res_last" if form == "selector" else os.path.join(peer,
                                                                              "super_res_last")
    cfg = upsampler_config(spec, converted, "super_res_last")
    res = train_stage(cfg, str(tmp_path), progress=False, devices=ONE, stop_at_step=0)
    assert_same(res.state.params, last)
    entry = record(tmp_path / "upsampler")["init_from"]
    assert entry["component"] == "super_res_last" and entry["source"] == peer


def test_sharded_import_on_8_devices(tmp_path, peer, converted, upsampler_workdir):
    """FSDP over 8 devices: the imported arrays are placed with the params' NamedShardings, and
    the first training step's loss is the single-device run's."""
    from unclip_jax.train.sharding import RULE_PRESETS

    assert jax.device_count() == 8
    cfg = upsampler_config(peer, converted, "super_res_first", "total_steps=2", "mesh.data=1",
                           "mesh.fsdp=8", "sharding=fsdp")
    res = train_stage(cfg, str(tmp_path), progress=False, stop_at_step=0)
    params, want = res.state.params, converted["super_res_first"][1]
    assert_same(params, want)
    import flax.linen as nn

    from unclip_jax.stages import build_stage
    from unclip_jax.train.sharding import logical_shardings, make_mesh

    stage, mesh, rules = build_stage(cfg), make_mesh(dict(cfg.mesh)), RULE_PRESETS["fsdp"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: stage.init_variables(r, stage.dummy_batch(8)),
                               jax.random.key(0))
    expect = by_name(logical_shardings(boxed["params"], mesh, rules))
    got = by_name(params)
    assert sorted(got) == sorted(expect)
    sharded = 0
    for k, arr in got.items():
        assert arr.sharding.spec == expect[k].spec, k
        assert len(arr.sharding.device_set) == 8
        if "fsdp" in tuple(arr.sharding.spec):
            sharded += 1
            assert arr.addressable_shards[0].data.shape != arr.shape, k
    assert sharded >= 10  # the convolutions' output channels split over fsdp
    k = "down_1/res_0/conv1/kernel"  # (3, 3, 32, 64): its 64 outputs over 8 devices
    assert got[k].sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    # the EMA and Adam's moments follow their parameters
    assert res.state.ema_params["down_1"]["res_0"]["conv1"]["kernel"].sharding.spec \
        == got[k].sharding.spec
    # resumed on the 8 devices: step 1 sees the imported params, the same batch and noise as
    # the single-device run of upsampler_workdir (same config, mesh aside)
    run = train_stage(cfg, str(tmp_path), progress=False)
    one = upsampler_workdir["run"].history
    assert [h["step"] for h in run.history] == [1, 2] == [h["step"] for h in one]
    np.testing.assert_allclose(run.history[0]["loss"], one[0]["loss"], rtol=1e-5)
    assert np.isfinite(run.history[1]["loss"])
    w = run.state.params["down_1"]["res_0"]["conv1"]["kernel"]
    assert w.sharding.spec == got[k].sharding.spec and not np.array_equal(np.asarray(w),
                                                                           np.asarray(got[k]))


# ------------------------------------------------------------------------------ stages trained here
@pytest.mark.parametrize("form", ["workdir", "stage_dir", "selector"])
def test_from_a_stage_trained_here_takes_its_ema(tmp_path, upsampler_workdir, converted, form):
    from unclip_jax.workdir import load_stage

    w = upsampler_workdir["w"]
    spec = {"workdir": w, "stage_dir": os.path.join(w, "upsampler"),
            "selector": f"{w}:upsampler"}[form]
    src = load_stage(os.path.join(w, "upsampler"))
    trained = upsampler_workdir["run"].state
    assert src.step == 2
    assert not np.array_equal(flat(trained.params)["conv_in/kernel"],
                              flat(trained.ema_params)["conv_in/kernel"])
    cfg = upsampler_config(spec, converted)
    res = train_stage(cfg, str(tmp_path), progress=False, devices=ONE, stop_at_step=0)
    assert_same(res.state.params, src.params)
    assert_same(res.state.params, trained.ema_params)
    entry = record(tmp_path / "upsampler")["init_from"]
    assert entry["kind"] == "stage" and entry["step"] == 2
    assert entry["source"] == os.path.join(os.path.abspath(w), "upsampler")
    assert entry["taken"] == ["ema_params of step 2"]


def test_clip_from_transformers_takes_its_tokenizer(tmp_path, hf_clip):
    """The CLIP stage from a transformers CLIPModel: its weights, and its tokenizer copied into
    the stage directory (no shapes BPE trained), so that a resumed run needs no source."""
    from unclip_jax.convert.hf_clip import load_hf_clip

    src = str(tmp_path / "hf_copy")
    shutil.copytree(hf_clip, src)
    _, ccfg, params = load_hf_clip(src, kind="clip")
    make = lambda: config("clip", f"init_from={src}", "batch_size=8",  # noqa: E731
                          model=ccfg.to_dict())
    w = tmp_path / "w"
    res = train_stage(make(), str(w), progress=False, devices=ONE, stop_at_step=0)
    assert_same(res.state.params, jax.tree.map(np.asarray, params))
    rec = record(w / "clip")
    tok = str(w / "clip" / "tokenizer")
    assert rec["paths"]["tokenizer"] == tok and rec["train"]["tokenizer"] == tok
    assert not os.path.exists(w / "tokenizer")
    assert sorted(os.listdir(tok)) == sorted(n for n in os.listdir(src) if n != "config.json"
                                             and not n.endswith(".safetensors"))
    from unclip_jax.data.tokenizer import load_tokenizer, tokenize

    caption = ["a red circle"]  # 12 characters: within the context of 16
    np.testing.assert_array_equal(tokenize(load_tokenizer(tok), caption, 16)[0],
                                  tokenize(load_tokenizer(src), caption, 16)[0])
    assert rec["init_from"]["kind"] == "transformers_clip" and rec["init_from"]["source"] == src
    shutil.rmtree(src)  # resumed without its source: the recorded tokenizer, the checkpoint
    again = train_stage(make(), str(w), progress=False, devices=ONE, stop_at_step=0)
    assert again.step == 0
    assert_same(again.state.params, res.state.params)
    assert record(w / "clip")["paths"]["tokenizer"] == tok


def test_ar_prior_takes_its_sources_codebook(tmp_path, hf_clip):
    from unclip_jax.workdir import load_stage

    over = [f"clip_dir={hf_clip}", "model.num_text_tokens=16", "codebook.fit_batches=2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_stage(config("ar_prior", *over), a, progress=False, devices=ONE, stop_at_step=0)
    cfg = config("ar_prior", *over, f"init_from={a}")
    from unclip_jax.stages import build_stage

    stage = build_stage(cfg, b)
    assert not os.path.exists(os.path.join(b, "ar_prior"))  # nothing written before the check
    from unclip_jax.train.trainer import train

    res = train(stage, cfg, b, progress=False, devices=ONE, stop_at_step=0)
    with open(os.path.join(a, "ar_prior", "codebook.npz"), "rb") as f1, \
            open(os.path.join(b, "ar_prior", "codebook.npz"), "rb") as f2:
        assert f1.read() == f2.read()
    assert_same(res.state.params, load_stage(os.path.join(a, "ar_prior")).params)


# ------------------------------------------------------------------------------ refusals
def test_shape_mismatch_is_one_error_naming_the_tensor(tmp_path, peer, converted):
    """configs/upsampler.py:size=tiny is 16 / 32 channels wide, the peer's super_res_first 32 /
    64: the first differing tensor is named with both shapes; nothing is written."""
    from unclip_jax.models.unet import UNet, UNetConfig, init_inputs

    cfg = config("upsampler", f"init_from={peer}", "upsample.low_res_size=8",
                 "upsample.crop_size=16")
    with pytest.raises(InitFromError) as e:
        train_stage(cfg, str(tmp_path), progress=False, devices=ONE)
    ucfg = UNetConfig.from_dict(cfg.model.to_dict())
    x, t, kw = init_inputs(ucfg)
    import flax.linen as nn

    mine = by_name(jax.eval_shape(lambda: nn.meta.unbox(
        UNet(ucfg).init(jax.random.key(0), x, t, **kw))["params"]))
    theirs = flat(converted["super_res_first"][1])
    first = sorted(k for k in mine if k in theirs and mine[k].shape != theirs[k].shape)[0]
    msg = str(e.value)
    assert (f"tensor {first} has shape {theirs[first].shape} in the source but "
            f"{mine[first].shape} in the upsampler model of this config") in msg, msg
    assert peer in msg and "super_res_first" in msg
    assert os.listdir(tmp_path) == []


def test_cli_prints_one_line(tmp_path, capsys, peer):
    from unclip_jax.cli import main

    w = tmp_path / "w"
    argv = ["train", "--config", os.path.join(ROOT, "configs", "upsampler.py") + ":size=tiny",
            "--workdir", str(w), f"--config.init_from={peer}", "--config.upsample.low_res_size=8",
            "--config.upsample.crop_size=16", "--quiet"]
    code = main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert re.fullmatch(r"unclip-jax train: error: config\.init_from .*", lines[0]), lines[0]
    assert ("tensor conv_in/bias has shape (32,) in the source but (16,) in the upsampler"
            in lines[0])
    assert not os.path.exists(w / "upsampler")


@pytest.mark.parametrize("case", ["missing", "wrong_kind", "bad_selector", "no_stage",
                                  "other_stage"])
def test_sources_that_do_not_fit_are_refused(tmp_path, case, peer, hf_clip, upsampler_workdir):
    from unclip_jax.train.init_from import resolve

    spec, stage, needles = {
        "missing": (str(tmp_path / "nope"), "prior", ["no such directory",
                                                     "diffusers UnCLIPPipeline directory"]),
        "wrong_kind": (hf_clip, "decoder", ["cannot be initialised from a transformers CLIP",
                                            "its decoder"]),
        "bad_selector": (f"{peer}:decoder", "upsampler", ["super_res_first or super_res_last",
                                                          "not 'decoder'"]),
        "no_stage": (str(tmp_path), "decoder", ["nor a workdir with a decoder/ stage"]),
        "other_stage": (os.path.join(upsampler_workdir["w"], "upsampler"), "prior",
                        ["holds a upsampler stage, not a prior stage"]),
    }[case]
    with pytest.raises(InitFromError) as e:
        resolve(spec, stage)
    for n in needles:
        assert n in str(e.value), str(e.value)



def test_differences_that_change_no_shape_are_a_warning(tmp_path, capsys, peer, converted):
    cfg = upsampler_config(peer, converted, "super_res_first", "model.norm_eps=1e-06")
    train_stage(cfg, str(tmp_path), progress=False, devices=ONE, stop_at_step=0)
    diffs = record(tmp_path / "upsampler")["init_from"]["config_differences"]
    assert diffs == ["norm_eps: 1e-05 in the source, 1e-06 in the config"]
    out = capsys.readouterr().out
    assert "warning: init_from" in out and diffs[0] in out
