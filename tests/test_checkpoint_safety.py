"""What the trainer writes is readable and finite: a broken final checkpoint is retrained, bad
checkpoint settings and a batch that cannot fit are refused before any work, a diverging run
saves nothing non-finite, half-written Orbax directories are cleaned up."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unclip_jax.stages import build_stage, train_stage as train
from unclip_jax.train.config import load_config
from unclip_jax.train.trainer import train as trainer_train
from unclip_jax.workdir import load_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(stage, *overrides):
    return load_config(os.path.join(ROOT, "configs", f"{stage}.py") + ":size=tiny",
                       ["checkpoint.async_save=False", "log_every=1", "data.num_examples=32",
                        *overrides])


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def break_step(ck, step):
    """A partial write of `step`: its array data is gone, its metadata left."""
    for root, _, files in os.walk(ck / str(step) / "state"):
        for f in files:
            if f != "_METADATA":
                os.remove(os.path.join(root, f))


def test_unreadable_final_checkpoint_is_retrained(tmp_path, capsys):
    over = ["total_steps=4", "checkpoint.every=2"]
    full = train(tiny("upsampler", *over), str(tmp_path), progress=False)
    stage_dir = tmp_path / "upsampler"
    ck = stage_dir / "checkpoints"
    assert sorted(os.listdir(ck)) == ["2", "4"]
    break_step(ck, 4)
    capsys.readouterr()

    # a loader falls back, and says which step it loaded
    fallback = load_stage(str(stage_dir), which="params")
    out = capsys.readouterr().out
    assert fallback.step == 2
    assert "checkpoint at step 4" in out and "unreadable" in out
    assert "loaded step 2" in out and "not its newest (4)" in out

    # the same command again: it retrains steps 3 and 4 and writes a readable step 4
    res = train(tiny("upsampler", *over), str(tmp_path), progress=False)
    out = capsys.readouterr().out
    assert res.history[0]["step"] == 3 and res.step == 4 and not res.preempted
    aside = stage_dir / "checkpoints_unreadable" / "4"
    assert f"moved the unreadable checkpoint at step 4 to {aside}" in out
    assert aside.is_dir() and sorted(os.listdir(ck)) == ["2", "4"]

    loaded = load_stage(str(stage_dir), which="params")
    out = capsys.readouterr().out
    assert loaded.step == 4 and "warning" not in out
    # bitwise the uninterrupted run's state
    assert_trees_equal(loaded.params, full.state.params)
    assert_trees_equal(load_stage(str(stage_dir)).params, full.state.ema_params)
    assert_trees_equal(res.state.opt_state, full.state.opt_state)


@pytest.mark.parametrize("override,match", [
    ("checkpoint.keep=0", "checkpoint.keep must be at least 1, got 0"),
    ("checkpoint.keep=-2", "checkpoint.keep must be at least 1, got -2"),
    ("checkpoint.every=0", "checkpoint.every must be at least 1, got 0"),
])
def test_bad_checkpoint_settings_are_refused(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        train(tiny("upsampler", "total_steps=2", override), str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "upsampler")


def _saved_states(ck):
    """{step: restored state tree} of every checkpoint in `ck`."""
    mgr = ocp.CheckpointManager(str(ck), item_names=("state", "meta"),
                                options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return {s: mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
                ["state"] for s in mgr.all_steps()}
    finally:
        mgr.close()


def test_diverging_run_saves_no_non_finite_state(tmp_path):
    over = ["total_steps=4", "checkpoint.every=1", "checkpoint.keep=2"]
    first = train(tiny("upsampler", *over), str(tmp_path), progress=False, stop_at_step=2)
    assert first.step == 2
    ck = tmp_path / "upsampler" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["1", "2"]
    # the learning rate overflows to inf: step 3's update makes the parameters non-finite; the
    # loss is logged only at the end (step 4), so the loss check would come too late
    bad = tiny("upsampler", *over, "optimizer.lr=1e999", "log_every=100")
    assert bad.optimizer.lr == float("inf")
    with pytest.raises(FloatingPointError) as e:
        train(bad, str(tmp_path), progress=False)
    msg = str(e.value)
    assert "not finite at step 3" in msg and "params" in msg
    assert "the last good checkpoint is step 2" in msg
    states = _saved_states(ck)
    assert sorted(states) == [1, 2]  # the good ones were not pushed out
    for state in states.values():
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def test_diverging_run_with_no_checkpoint_yet_through_the_cli(tmp_path, capsys):
    from unclip_jax.cli import main

    rc = main(["train", "--config", os.path.join(ROOT, "configs", "upsampler.py") + ":size=tiny",
               "--workdir", str(tmp_path), "--quiet", "--config.checkpoint.async_save=False",
               "--config.data.num_examples=32", "--config.total_steps=2",
               "--config.checkpoint.every=1", "--config.log_every=100",
               "--config.optimizer.lr=1e999"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("unclip-jax train: error: [upsampler] the training state is not "
                             "finite at step 1 (non-finite params")
    assert "no checkpoint has been saved" in err[0]
    ck = tmp_path / "upsampler" / "checkpoints"
    assert not os.path.exists(ck) or os.listdir(ck) == []


def test_half_written_orbax_directories_are_removed(tmp_path, capsys):
    over = ["total_steps=4", "checkpoint.every=2"]
    train(tiny("upsampler", *over), str(tmp_path), progress=False, stop_at_step=2)
    stage_dir = tmp_path / "upsampler"
    ck = stage_dir / "checkpoints"
    # what a kill during the save of step 4 leaves
    tmp = ck / "4.orbax-checkpoint-tmp-1712345678901234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{")
    capsys.readouterr()

    loaded = load_stage(str(stage_dir))
    assert loaded.step == 2 and "warning" not in capsys.readouterr().out

    res = train(tiny("upsampler", *over), str(tmp_path), progress=False)
    out = capsys.readouterr().out
    assert "removed 1 half-written checkpoint directory left by an interrupted save: " \
           f"{tmp.name}" in out
    assert res.history[0]["step"] == 3 and res.step == 4
    assert sorted(os.listdir(ck)) == ["2", "4"]
    assert load_stage(str(stage_dir)).step == 4


def test_batch_that_cannot_fit_in_host_memory_is_refused_at_once(tmp_path):
    cfg = tiny("upsampler", f"batch_size={10 ** 11}")
    stage = build_stage(cfg, str(tmp_path))

    def never(*a, **k):
        raise AssertionError("the trainer went on to init / data / compile")

    stage.init_variables = stage.batches = stage.post_init = never
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_example = sum(a.nbytes for a in stage.dummy_batch(1).values())
    assert per_example * 10 ** 11 > host
    with pytest.raises(ValueError, match=r"batch_size 100000000000 needs at least .* of host "
                                         r"memory for its inputs alone .* this host has"):
        trainer_train(stage, cfg, str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "upsampler")
