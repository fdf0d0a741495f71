"""Export to diffusers (unclip_jax/convert/export_diffusers.py): a Karlo-architecture peer read
and written back is the same files, tensor for tensor and bit for bit; a workdir of stages
trained here, exported, loads in diffusers' UnCLIPPipeline and samples what ours samples from the
same latents and noise; a stage diffusers cannot express is refused naming the option, and a
refused or failed export leaves nothing behind."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from peers import nchw_to_nhwc, tiny_unclip_pipeline  # noqa: E402
from test_pipeline import _peer_images, _peer_noise  # noqa: E402

from unclip_jax.cli import main  # noqa: E402
from unclip_jax.convert.export_diffusers import ExportError, export_workdir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["total_steps=4", "data.num_examples=64", "log_every=2"]  # as tests/test_workdir.py
STEPS = dict(prior=5, decoder=6, super_res=3)


def load_diffusers(path):
    """diffusers' UnCLIPPipeline.from_pretrained of an exported directory (its deprecated
    text_proj passed in: diffusers no longer loads it by name)."""
    from diffusers import UnCLIPPipeline
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    tp = UnCLIPTextProjModel.from_pretrained(path, subfolder="text_proj")
    pipe = UnCLIPPipeline.from_pretrained(path, text_proj=tp)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture(scope="module")
def peer_and_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("karlo_tiny"))
    pipe = tiny_unclip_pipeline(path, seed=0)
    shutil.rmtree(os.path.join(path, "_tok"))  # the peer builder's scratch tokenizer
    return pipe, path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tiny stack trained here (every stage, 4 steps): configs/*.py:size=tiny, which diffusers
    can express (eps decoder with learned variance, x0 prior with clip_mean / clip_std, one
    plain upsampler)."""
    from unclip_jax.shapes_demo.run import train_stack

    w = str(tmp_path_factory.mktemp("stack"))
    train_stack(w, "tiny", TINY, progress=False)
    return w


@pytest.fixture(scope="module")
def exported(stack, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exp") / "pipe")
    lines = []
    export_workdir(stack, out, log=lines.append)
    assert any("guidance=8.0" in ln for ln in lines)  # noted, not expressible in the files
    return out


# ------------------------------------------------------------------------ (a) the round trip
def test_a_diffusers_pipeline_reads_and_writes_back_bit_for_bit(peer_and_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    peer, peer_dir = peer_and_dir
    out = str(tmp_path / "back")
    assert main(["export", "--pipeline", peer_dir, "--out", out]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert files_under(out) == files_under(peer_dir)
    for rel in files_under(peer_dir):
        a, b = os.path.join(peer_dir, rel), os.path.join(out, rel)
        if rel.endswith(".safetensors"):
            x, y = load_file(a), load_file(b)
            assert sorted(x) == sorted(y), rel
            for k in x:
                assert x[k].dtype == y[k].dtype == np.float32 and x[k].shape == y[k].shape, k
                assert np.array_equal(x[k].view(np.uint32), y[k].view(np.uint32)), (rel, k)
            with safe_open(b, "np") as f:
                assert f.metadata() == {"format": "pt"}
        else:
            with open(a, encoding="utf-8") as f:
                want = json.load(f)
            with open(b, encoding="utf-8") as f:
                got = json.load(f)
            if rel == "model_index.json":  # the one entry diffusers can load text_proj by
                assert got.pop("text_proj") == ["deprecated", "UnCLIPTextProjModel"]
                want.pop("text_proj")
            assert got == want, rel
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files_under(out))
    # diffusers loads it: the same configs and the same tensors as the peer's modules
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    back = load_diffusers(out)
    assert isinstance(back.text_proj, UnCLIPTextProjModel)
    for name in ("text_encoder", "prior", "text_proj", "decoder", "super_res_first",
                 "super_res_last"):
        m, n = getattr(peer, name), getattr(back, name)
        assert config_of(m) == config_of(n), name
        sd_m, sd_n = m.state_dict(), n.state_dict()
        assert sorted(sd_m) == sorted(sd_n), name
        assert all(torch.equal(sd_m[k], sd_n[k]) for k in sd_m), name
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        assert config_of(getattr(peer, name)) == config_of(getattr(back, name)), name
    text = ["a red circle!", "", "a long prompt that the context cuts short"]
    assert peer.tokenizer(text, padding="max_length", truncation=True).input_ids == \
        back.tokenizer(text, padding="max_length", truncation=True).input_ids


def config_of(module) -> dict:
    c = module.config
    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    return json.loads(json.dumps(d, default=str))  # tuples and lists alike


# ------------------------------------------------------------ (b) a workdir trained here
@pytest.fixture(scope="module")
def both(stack, exported):
    from unclip_jax.pipeline import UnCLIPPipeline

    return load_diffusers(exported), UnCLIPPipeline.from_workdir(stack, progress=False)


@pytest.mark.parametrize("prompts,guidance", [
    (["a red circle", "a blue square at the top"], (4.0, 8.0)),
    (["", "a green triangle"], (1.0, 1.0)),
])
def test_b_an_exported_workdir_samples_in_diffusers_as_ours(both, prompts, guidance):
    peer, ours = both
    n = len(prompts)
    d = peer.prior.config.embedding_dim
    ds, ss = peer.decoder.config.sample_size, peer.super_res_first.config.sample_size
    assert (d, ds, ss) == (32, 16, 32)  # configs/*:size=tiny
    shapes = dict(prior=(n, d), decoder=(n, 3, ds, ds), super_res=(n, 3, ss, ss))
    g = torch.Generator().manual_seed(11)
    latents = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    # what diffusers' schedulers step to: the prior's last sample, the decoder's last sample
    seen = {}
    for name in ("prior", "decoder"):
        sched = getattr(peer, f"{name}_scheduler")

        def step(*a, _s=sched, _n=name, **k):
            o = type(_s).step(_s, *a, **k)
            seen[_n] = o.prev_sample.detach().clone()
            return o
        sched.step = step
    ref = _peer_images(peer, prompts, latents, guidance, STEPS)
    noise = _peer_noise(peer, STEPS, shapes, 5)
    res = ours.generate_float(
        prompts, prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
        super_res_steps=STEPS["super_res"], prior_guidance=guidance[0],
        decoder_guidance=guidance[1], prior_candidates=1,
        latents={k: jnp.asarray(nchw_to_nhwc(v)) for k, v in latents.items()},
        noise={k: jnp.asarray(v) for k, v in noise.items()}, coefficient_dtype="float32")
    emb = peer.prior.post_process_latents(seen["prior"]).detach().numpy()
    low = nchw_to_nhwc(seen["decoder"].clamp(-1, 1))
    np.testing.assert_allclose(np.asarray(res["image_embeds"]), emb, atol=1e-4, rtol=0)
    assert np.abs(np.asarray(res["low_res"]) - low).max() <= 1e-3
    got = np.asarray(res["images"])
    assert got.shape == ref.shape == (n, ss, ss, 3)
    assert np.abs(got - ref).max() <= 1e-3
    # not trivially equal: the embeddings are far from zero, the images vary and are not all
    # saturated (x0 clipping would hide differences there)
    assert np.abs(emb).max() > 0.5 and ref.std() > 0.05
    assert (np.abs(ref - 0.5) < 0.45).mean() > 0.2


def test_b_the_export_holds_the_workdir_as_recorded(stack, exported):
    from unclip_jax.convert.diffusers_pipeline import load_components
    from unclip_jax.workdir import load_stack

    st, c = load_stack(stack), load_components(exported)
    with open(os.path.join(exported, "model_index.json"), encoding="utf-8") as f:
        assert json.load(f)["tokenizer"] == ["transformers", type(st.tokenizer).__name__]
    assert c["tokenizer"].model_max_length == st.prior.config.num_text_tokens == 24
    # one upsampler: it is super_res_first and super_res_last
    for name in ("super_res_first", "super_res_last"):
        a, b = c[name][1], st.upsamplers[0].params
        assert jnp.array_equal(a["conv_in"]["kernel"], b["conv_in"]["kernel"])
    assert c["prior_sampling"].clip_x0 == st.prior.sampling.clip_x0 == 5.0
    assert c["decoder_sampling"].diffusion.variance == "learned_range"


# ------------------------------------------------------------------------ (c) refusals
def copy_stack(stack, dest):
    shutil.copytree(stack, dest, ignore=shutil.ignore_patterns("data", "tb"))
    return str(dest)


def edit_record(workdir, stage, fn):
    path = os.path.join(workdir, stage, "config.json")
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    fn(rec)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rec, f)


def _demo_decoder(rec):
    from unclip_jax.train.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "decoder.py") + ":size=demo", [])
    rec["model"]["unet"].update(cfg.model.unet.to_dict())
    rec["model"]["unet"]["block_out_channels"] = list(cfg.model.unet.block_out_channels)
    rec["model"]["unet"]["attention_levels"] = list(cfg.model.unet.attention_levels)


def _set(stage_key, *path_value):
    *path, value = path_value

    def fn(rec):
        node = rec
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return stage_key, fn


@pytest.mark.parametrize("edit,needles", [
    (_set("upsampler", "model", "output_skip", 3), ["upsampler", "model.output_skip=3"]),
    (_set("upsampler", "model", "noise_level_cond", True),
     ["upsampler", "model.noise_level_cond=True", "without a noise level"]),
    (_set("decoder", "sampling", "diffusion", "prediction", "v"),
     ["decoder", "diffusion.prediction='v'", "UnCLIPScheduler"]),
    (_set("decoder", "sampling", "diffusion", "schedule", "linear"),
     ["decoder", "diffusion.schedule='linear'"]),
    (_set("prior", "model", "embedding_norm", "scale"),
     ["prior", "model.embedding_norm='scale'", "clip_mean / clip_std"]),
    # the `make demo` decoder: 2x2 patches and coordinate channels
    (("decoder", _demo_decoder),
     ["decoder", "model.unet.patch_size=2", "model.unet.coord_input=True"]),
])
def test_c_an_inexpressible_stage_is_refused_before_loading(stack, tmp_path, monkeypatch,
                                                            edit, needles):
    import unclip_jax.workdir as wd

    w = copy_stack(stack, tmp_path / "w")
    stage, fn = edit
    edit_record(w, stage, fn)
    monkeypatch.setattr(wd, "load_stack", lambda *a, **k: pytest.fail("loaded checkpoints"))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ExportError) as e:
        export_workdir(w, str(tmp_path / "out"))
    msg = str(e.value)
    assert os.path.join(w, stage) in msg
    for needle in needles:
        assert needle in msg
    assert sorted(os.listdir(tmp_path)) == before  # no out, no temporary sibling


def test_c_a_cascade_and_a_missing_upsampler_are_refused(stack, tmp_path):
    w = copy_stack(stack, tmp_path / "w")
    shutil.copytree(os.path.join(w, "upsampler"), os.path.join(w, "upsampler2"))
    with pytest.raises(ExportError, match="cascade of 2 upsamplers"):
        export_workdir(w, str(tmp_path / "out"))
    shutil.rmtree(os.path.join(w, "upsampler"))
    shutil.rmtree(os.path.join(w, "upsampler2"))
    with pytest.raises(ExportError, match="no trained upsampler"):
        export_workdir(w, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_c_cli_refuses_an_existing_out_in_one_line(stack, tmp_path, capsys, monkeypatch):
    import unclip_jax.workdir as wd

    monkeypatch.setattr(wd, "load_stack", lambda *a, **k: pytest.fail("loaded checkpoints"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["export", "--workdir", stack, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err
    assert err.startswith("unclip-jax export: error: --out") and "not empty" in err
    assert os.listdir(out) == ["keep.txt"]
    rc = main(["export", "--workdir", stack, "--pipeline", stack, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "give either --workdir" in err and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_c_a_failed_write_leaves_nothing(stack, tmp_path, monkeypatch):
    from unclip_jax.convert import export_diffusers

    real = export_diffusers._write_files

    def half(files, tokenizer, length, root):
        real(dict(list(files.items())[:3]), tokenizer, length, root)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export_diffusers, "_write_files", half)
    (tmp_path / "out").mkdir()  # an empty --out is fine, and stays as it was
    with pytest.raises(OSError, match="No space"):
        export_workdir(stack, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == []
