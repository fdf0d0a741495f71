"""The one trainer: sharded step == single-device step, two processes == one, interrupt and
resume == uninterrupted, every stage overfits a tiny batch, bad input."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unclip_jax.train.config import load_config
from unclip_jax.stages import train_stage as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(stage, *overrides):
    return load_config(os.path.join(ROOT, "configs", f"{stage}.py") + ":size=tiny",
                       ["checkpoint.async_save=False", "log_every=1", *overrides])


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_close(a, b, atol):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    worst = max(float(np.abs(x - y).max()) for x, y in zip(la, lb))
    assert worst <= atol, worst


# Adam's first steps are nearly sign(g): a gradient entry within float rounding of zero can flip
# and move its parameter by ~2 lr whatever the sharding. A larger eps keeps the update linear in
# the gradient, so the comparison measures the sharded computation, not Adam's conditioning.
CLIP_DATA = ["data.num_examples=64", "batch_size=16", "total_steps=2", "optimizer.eps=1e-3",
             "optimizer.warmup_steps=0"]


@pytest.fixture(scope="module")
def sharded_clip_run(tmp_path_factory, shapes_tokenizer):
    """CLIP (global-batch contrastive loss) for 2 steps on a 4 x 2 (data x fsdp) mesh."""
    assert jax.device_count() == 8
    cfg = tiny("clip", f"tokenizer={shapes_tokenizer}", *CLIP_DATA, "mesh.data=4",
               "mesh.fsdp=2", "sharding=fsdp")
    return train(cfg, str(tmp_path_factory.mktemp("w8")), progress=False)


def test_sharded_step_equals_single_device(sharded_clip_run, tmp_path, shapes_tokenizer):
    cfg = tiny("clip", f"tokenizer={shapes_tokenizer}", *CLIP_DATA, "mesh.data=1")
    one = train(cfg, str(tmp_path), progress=False, devices=jax.devices()[:1])
    assert_trees_close(sharded_clip_run.state.params, one.state.params, 1e-5)
    assert_trees_close(sharded_clip_run.state.ema_params, one.state.ema_params, 1e-5)
    for key in ("loss", "grad_norm", "acc_text_to_image"):
        np.testing.assert_allclose([h[key] for h in sharded_clip_run.history],
                                   [h[key] for h in one.history], rtol=1e-5)


def test_parameters_are_sharded_as_the_rules_say(sharded_clip_run):
    p = sharded_clip_run.state.params
    fc1 = p["text_model"]["layers_0"]["mlp"]["fc1"]["dense"]["kernel"]  # ('embed', 'mlp')
    assert fc1.sharding.spec == P("fsdp", None)
    assert fc1.addressable_shards[0].data.shape == (fc1.shape[0] // 2, fc1.shape[1])
    emb = p["text_model"]["token_embedding"]["embedding"]  # ('vocab', 'embed')
    assert emb.sharding.spec == P(None, "fsdp")  # the 'embed' rule comes first in the preset
    patch = p["vision_model"]["patch_embedding"]["kernel"]  # (conv_h, conv_w, conv_in, 'embed')
    assert patch.sharding.spec == P(None, None, None, "fsdp")
    # Adam's moments follow their parameters; the EMA too
    assert sharded_clip_run.state.ema_params["text_model"]["layers_0"]["mlp"]["fc1"]["dense"][
        "kernel"].sharding.spec == P("fsdp", None)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from unclip_jax.train.config import load_config
from unclip_jax.stages import train_stage as train
cfg = load_config(sys.argv[3], json.loads(sys.argv[4]))
res = train(cfg, sys.argv[5], progress=False)
params = jax.tree.map(lambda a: np.asarray(jax.experimental.multihost_utils.process_allgather(a, tiled=True)), res.state.params)
if jax.process_index() == 0:
    flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(sys.argv[6], **flat)
print("done", jax.process_index(), jax.device_count(), flush=True)
"""


def test_two_processes_equal_one(sharded_clip_run, tmp_path, shapes_tokenizer):
    overrides = ["checkpoint.async_save=False", "log_every=1", f"tokenizer={shapes_tokenizer}",
                 *CLIP_DATA, "mesh.data=4", "mesh.fsdp=2"]
    addr = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "params.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER, addr, str(i),
         os.path.join(ROOT, "configs", "clip.py") + ":size=tiny", json.dumps(overrides),
         str(tmp_path / "w"), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    assert "done 0 8" in logs[0] and "done 1 8" in logs[1]
    got = np.load(out)
    want = {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in
            jax.tree_util.tree_flatten_with_path(sharded_clip_run.state.params)[0]}
    assert set(got.files) == set(want)
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst <= 1e-5, worst


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    over = ["data.num_examples=32", "total_steps=5", "checkpoint.every=100"]
    full = train(tiny("upsampler", *over), str(tmp_path / "a"), progress=False)
    part = train(tiny("upsampler", *over), str(tmp_path / "b"), progress=False, stop_at_step=2)
    assert part.preempted and part.step == 2
    resumed = train(tiny("upsampler", *over), str(tmp_path / "b"), progress=False)
    assert resumed.step == 5 and resumed.history[0]["step"] == 3
    assert_trees_close(full.state.params, resumed.state.params, 1e-6)
    assert_trees_close(full.state.opt_state, resumed.state.opt_state, 1e-6)
    assert_trees_close(full.state.ema_params, resumed.state.ema_params, 1e-6)


def test_unreadable_newest_checkpoint_falls_back(tmp_path, capsys):
    over = ["data.num_examples=32", "total_steps=4", "checkpoint.every=2"]
    train(tiny("upsampler", *over), str(tmp_path), progress=False)
    ck = tmp_path / "upsampler" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["2", "4"]
    # a partial write of step 4: its array data is gone
    for root, _, files in os.walk(ck / "4" / "state"):
        for f in files:
            if f != "_METADATA":
                os.remove(os.path.join(root, f))
    res = train(tiny("upsampler", *over), str(tmp_path), progress=False)
    assert "checkpoint at step 4 is unreadable" in capsys.readouterr().out
    assert res.history[0]["step"] == 3 and res.step == 4


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory, shapes_tokenizer):
    w = str(tmp_path_factory.mktemp("stack"))
    res = train(tiny("clip", f"tokenizer={shapes_tokenizer}", "data.num_examples=8",
                     "batch_size=8", "total_steps=60", "optimizer.lr=3e-3",
                     "optimizer.warmup_steps=5"), w, progress=False)
    return w, res


def _falls(history, factor):
    # diffusion stages: the MSE term (the hybrid loss's VLB term spikes at t=0 early in training)
    key = "mse" if "mse" in history[0] else "loss"
    losses = [h[key] for h in history]
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert last < factor * first, (first, last)


def test_clip_overfits(clip_workdir):
    _falls(clip_workdir[1].history, 0.5)


@pytest.mark.parametrize("stage,steps", [("prior", 60), ("decoder", 60), ("upsampler", 60)])
def test_stage_overfits_a_tiny_batch(clip_workdir, stage, steps):
    over = ["data.num_examples=8", "batch_size=8", f"total_steps={steps}", "optimizer.lr=3e-3",
            "optimizer.warmup_steps=5", "checkpoint.every=1000"]
    cfg = tiny(stage, *over)
    res = train(cfg, clip_workdir[0], progress=False)
    _falls(res.history, 0.6)
    if stage == "decoder":  # the periodic sample images of the logs
        from unclip_jax.stages import build_stage

        st = build_stage(cfg, clip_workdir[0])
        imgs = st.sample_images(res.state.ema_params, st.frozen()[1], jax.random.key(0), n=4,
                                steps=5)
        assert imgs.shape == (4, 16, 16, 3) and np.all((imgs >= 0) & (imgs <= 1))


def test_unknown_config_key():
    with pytest.raises(ValueError, match="config key 'optimizer.lrr' does not exist"):
        tiny("upsampler", "optimizer.lrr=1")


def test_mesh_that_does_not_divide(tmp_path):
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        train(tiny("upsampler", "mesh.data=3", "mesh.fsdp=-1"), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="does not divide over the mesh's 8 data-parallel"):
        train(tiny("upsampler", "batch_size=12"), str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "upsampler")


def test_workdir_of_another_config_is_refused(tmp_path):
    over = ["data.num_examples=16", "total_steps=1"]
    train(tiny("upsampler", *over), str(tmp_path), progress=False)
    before = (tmp_path / "upsampler" / "config.json").read_text()
    from unclip_jax.train.checkpoint import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="block_out_channels"):
        train(tiny("upsampler", *over, "model.block_out_channels=(16, 16)"), str(tmp_path),
              progress=False)
    assert (tmp_path / "upsampler" / "config.json").read_text() == before


def test_stage_record_keeps_paths_absolute(tmp_path, monkeypatch):
    """A stage trained with relative tokenizer / CLIP paths loads from any directory later."""
    import ml_collections

    from unclip_jax.workdir import StageRecord

    monkeypatch.chdir(tmp_path)
    cfg = ml_collections.ConfigDict({"tokenizer": "w/tokenizer", "clip_dir": "gs://b/clip",
                                     "seed": 0})
    rec = StageRecord("clip", {"d": 1}, paths={"tokenizer": cfg.tokenizer,
                                               "clip_dir": cfg.clip_dir})
    assert rec.paths["tokenizer"] == os.path.join(str(tmp_path), "w", "tokenizer")
    assert rec.paths["clip_dir"] == "gs://b/clip" and rec.model == {"d": 1}


def test_prior_from_precomputed_embeddings_equals_clip_on_the_fly(clip_workdir, tmp_path):
    """A prior trained from an embeddings set (no images, no CLIP in the step) takes the same
    steps as one computing CLIP's embeddings on the fly, for the same examples and seed."""
    from unclip_jax.data.sources import image_text_batches
    from unclip_jax.stages import build_stage
    from unclip_jax.stages.conditioning import precompute_embeddings

    clip_dir = os.path.join(clip_workdir[0], "clip")
    over = ["data.num_examples=16", "batch_size=8", "total_steps=3", "stats_batches=2",
            "optimizer.warmup_steps=0", "optimizer.eps=1e-3", f"clip_dir={clip_dir}"]
    on_the_fly = tiny("prior", *over)
    stage = build_stage(on_the_fly, str(tmp_path / "a"))
    root = str(tmp_path / "emb")
    # the examples of the on-the-fly run's steps 0, 1, 2, in order
    raw = image_text_batches(on_the_fly.data, image_size=int(on_the_fly.data.image_size),
                             batch_size=8, seed=int(on_the_fly.seed), start_step=0)
    precompute_embeddings(stage.clip, stage.tokenizer, (next(raw) for _ in range(3)), root)
    a = train(on_the_fly, str(tmp_path / "a"), progress=False)
    emb_cfg = tiny("prior", *over, "data.source=clip_embeddings", f"data.path={root}",
                   "data.order=sequential")
    b = train(emb_cfg, str(tmp_path / "b"), progress=False)
    assert_trees_close(a.state.params, b.state.params, 1e-5)
    np.testing.assert_allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history],
                               rtol=1e-5)
    assert b.history[-1]["loss"] != a.history[0]["loss"]  # the steps did move the params

    # a set recorded as made by another CLIP is refused, naming what differs
    info_path = os.path.join(root, "embeddings.json")
    info = json.load(open(info_path))
    info["model"]["source"] = "/elsewhere/clip"
    json.dump(info, open(info_path, "w"))
    with pytest.raises(ValueError, match="re-embed"):
        build_stage(emb_cfg, str(tmp_path / "c"))


def test_packed_state_resumes_bitwise(tmp_path):
    """On one device the loop holds the state packed (train/packed.py): a run stopped and resumed
    is bitwise the uninterrupted one. (test_sharded_step_equals_single_device compares the
    packed one-device run with the per-parameter layout of the sharded run.)"""
    over = ["data.num_examples=32", "total_steps=4", "checkpoint.every=100"]
    one = jax.devices()[:1]
    full = train(tiny("upsampler", *over), str(tmp_path / "a"), progress=False, devices=one)
    part = train(tiny("upsampler", *over), str(tmp_path / "b"), progress=False, devices=one,
                 stop_at_step=2)
    assert part.preempted and part.step == 2
    resumed = train(tiny("upsampler", *over), str(tmp_path / "b"), progress=False, devices=one)
    assert resumed.step == 4 and resumed.history[0]["step"] == 3
    for name in ("params", "opt_state", "ema_params"):
        for x, y in zip(leaves(getattr(full.state, name)), leaves(getattr(resumed.state, name))):
            np.testing.assert_array_equal(x, y)
