"""Orbax checkpoints per stage: WORKDIR/<stage>/{config.json, checkpoints/<step>/}.

The stage record (`unclip_jax.workdir.StageRecord`, config.json) is written beside the
checkpoints so a sampler can rebuild the model with no config file; loading a trained stage lives
in `unclip_jax.workdir`. A workdir whose record describes a different model is refused before
anything is written. If the newest checkpoint cannot be read (a partial write), the one before it
is used, with a warning, and the unreadable one is moved aside to
WORKDIR/<stage>/checkpoints_unreadable/<step>/ (kept for inspection, never deleted), so that the
run writes that step again and later loads find it. Half-written Orbax directories
(`<step>.orbax-checkpoint-tmp-*`, left by a kill during a save) are removed when a run starts.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from unclip_jax.workdir import RECORD_FILE, StageRecord, has_checkpoints, read_record

log = logging.getLogger(__name__)

TMP_MARK = ".orbax-checkpoint-tmp"  # a save in progress: <step>.orbax-checkpoint-tmp-<time>
UNREADABLE_DIR = "checkpoints_unreadable"  # beside checkpoints/: what a fallback moved aside


class ConfigMismatchError(ValueError):
    """The workdir holds a checkpoint of another model configuration."""


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


class StageCheckpointer:
    """An async Orbax CheckpointManager for one stage, with keep-last-N and a save interval."""

    def __init__(self, stage_dir: str, record: StageRecord, *, keep: int = 3,
                 every: int = 1000, async_save: bool = True):
        self.dir = os.path.abspath(stage_dir) if "://" not in stage_dir else stage_dir
        self.every = max(1, int(every))  # the trainer saves at multiples of it, and at the end
        self._check_and_write_record(record)
        self._remove_half_written()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.join(self.dir, "checkpoints"),
                                             options=options, item_names=("state", "meta"))

    def _check_and_write_record(self, record: StageRecord):
        if os.path.exists(os.path.join(self.dir, RECORD_FILE)) and has_checkpoints(self.dir):
            diffs = _diff(read_record(self.dir).identity(), record.identity())
            if diffs:
                raise ConfigMismatchError(
                    f"{self.dir} holds a checkpoint of another model configuration ("
                    + "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
                    + "); use another --workdir or remove it")
        if jax.process_index() == 0:
            record.write(self.dir)

    def _remove_half_written(self):
        """Remove the `<step>.orbax-checkpoint-tmp-*` directories a killed save left behind
        (Orbax never reads them; they only take space and confuse people), saying so."""
        root = epath.Path(self.dir) / "checkpoints"
        if jax.process_index() != 0 or not root.exists():
            return
        tmps = sorted((p for p in root.iterdir() if TMP_MARK in p.name), key=lambda p: p.name)
        for p in tmps:
            p.rmtree() if p.is_dir() else p.unlink()
        if tmps:
            n = len(tmps)
            print(f"removed {n} half-written checkpoint director{'y' if n == 1 else 'ies'} left "
                  f"by an interrupted save: {', '.join(p.name for p in tmps)} (in {root})",
                  flush=True)

    def _move_aside(self, steps: list[int]):
        """Move unreadable checkpoints out of checkpoints/ into checkpoints_unreadable/, so the
        run saves those steps again (Orbax skips a step it already lists) and loaders stop
        falling back to an older one. Moved, not deleted: an unreadable read may be transient."""
        if jax.process_index() == 0:
            aside = epath.Path(self.dir) / UNREADABLE_DIR
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dest, n = aside / str(step), 1
                while dest.exists():
                    dest, n = aside / f"{step}-{n}", n + 1
                (epath.Path(self.dir) / "checkpoints" / str(step)).rename(dest)
                print(f"moved the unreadable checkpoint at step {step} to {dest} (kept for "
                      f"inspection; delete it when done): this run writes step {step} again",
                      flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("unclip_jax: unreadable checkpoints moved")
        self.manager.reload()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state) -> tuple[Any, dict, int] | None:
        """Restore the newest readable checkpoint into the shapes/shardings of `abstract_state`
        (a tree of jax.ShapeDtypeStruct with shardings). None when there is no checkpoint.
        Unreadable checkpoints newer than the one restored are moved aside (`_move_aside`)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        unreadable: list[int] = []
        for i, step in enumerate(steps):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 -- a partial write surfaces as many types
                if _is_shape_mismatch(e):
                    raise ConfigMismatchError(
                        f"the checkpoint at step {step} in {self.dir} does not fit this model: "
                        f"{str(e).splitlines()[0][:300]}") from None
                nxt = f"; trying step {steps[i + 1]}" if i + 1 < len(steps) else ""
                log.warning("checkpoint at step %d in %s is unreadable (%s)%s", step, self.dir,
                            type(e).__name__, nxt)
                print(f"warning: checkpoint at step {step} is unreadable "
                      f"({type(e).__name__}){nxt}", flush=True)
                unreadable.append(step)
                continue
            if unreadable:
                self._move_aside(unreadable)
            return out["state"], dict(out["meta"] or {}), step
        if steps:
            print("warning: no readable checkpoint; starting from scratch", flush=True)
            self._move_aside(unreadable)
        return None

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _is_shape_mismatch(e: Exception) -> bool:
    s = str(e).lower()
    return "shape" in s and ("mismatch" in s or "does not match" in s or "incompatible" in s
                             or "expected" in s)
