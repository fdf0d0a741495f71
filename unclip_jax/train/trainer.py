"""The one trainer: every stage trains through `train(stage, config, workdir)`.

It is handed its stage (`unclip_jax.train.stage.Stage`: model, loss, batches, record); it never
imports the stages (`unclip_jax.stages.train_stage(config, workdir)` builds one and calls this).

Sections, in order: distributed / mesh — stage (model, loss, data) — abstract init and shardings
— checkpoint restore or init — the jitted, sharded, donated step (ahead-of-time compiled, its
compile time, memory and FLOPs logged) — the loop (metrics to TensorBoard through clu, a progress
bar, periodic checkpoints and sample images, a checkpoint on SIGTERM).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from unclip_jax.train import flops as flops_lib
from unclip_jax.train.checkpoint import StageCheckpointer
from unclip_jax.train.optim import make_optimizer
from unclip_jax.train.sharding import (
    batch_sharding, data_parallel_size, get_rules, logical_shardings, make_mesh, replicated)
from unclip_jax.train.state import TrainState, ema_update, opt_state_shardings
from unclip_jax.workdir import has_checkpoints


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched as one of several processes: on a TPU pod
    (auto-detected), under SLURM, or with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES set."""
    env = os.environ
    multi = (int(env.get("JAX_NUM_PROCESSES", "1")) > 1
             or int(env.get("SLURM_NTASKS", "1")) > 1
             or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
             or int(env.get("MEGASCALE_NUM_SLICES", "1")) > 1)
    if not multi or jax.distributed.is_initialized():
        return
    kw: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_PROCESS_ID"):
        kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
    if env.get("JAX_LOCAL_DEVICE_IDS"):  # one process per node (launch/slurm.sh --per-node)
        kw["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    jax.distributed.initialize(**kw)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    history: list[dict[str, float]]
    preempted: bool = False


#: config.seed: it seeds jax.random.key (a signed 64-bit integer) and numpy's SeedSequence
#: (non-negative)
SEED_MAX = 2 ** 63 - 1


def _init_seed(seed: int) -> int:
    """The key of the initial params, seed + 1, wrapped into jax.random.key's signed 64-bit
    range (the same key as seed + 1 wherever that is in range)."""
    return (int(seed) + 1 + 2 ** 63) % 2 ** 64 - 2 ** 63


#: config.stage_dir: one plain directory name under the workdir
_DIR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def stage_dir_name(config, default: str | None = None) -> str:
    """The directory under the workdir a stage trains into: `config.stage_dir` (e.g.
    "upsampler2", the cascade's second upsampler), else the stage's name (`default`, else
    `config.stage`). A name that is not one plain directory name, or that is another stage's
    directory, is refused."""
    stage = default or config.get("stage") or ""
    name = config.get("stage_dir") or ""
    if not name:
        return stage
    if not isinstance(name, str) or not _DIR_NAME.fullmatch(name) or name.strip(".") == "":
        raise ValueError(f"config.stage_dir must be one plain directory name under the workdir "
                         f"(letters, digits, '_', '-', '.'; e.g. upsampler2), got {name!r}")
    from unclip_jax.workdir import STAGES

    if name in STAGES and name != stage:
        raise ValueError(f"config.stage_dir {name!r} is where the {name} stage trains: the "
                         f"{stage} stage cannot train there (e.g. use {stage}2)")
    return name


def check_config(config) -> None:
    """The checks of a training config that need no devices (the CLI runs them before it builds
    the stage, which may already write into the workdir)."""
    stage_dir_name(config)
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= int(seed) <= SEED_MAX:
        raise ValueError(f"config.seed must be an integer from 0 to 2**63 - 1 (it seeds "
                         f"jax.random.key and numpy's SeedSequence), got {seed!r}")
    if int(config.batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {config.batch_size}")
    if int(config.total_steps) <= 0:
        raise ValueError(f"total_steps must be positive, got {config.total_steps}")
    init_from = config.get("init_from", "")
    if not isinstance(init_from, str):
        raise ValueError(f"config.init_from must be a directory path (a source of weights) or "
                         f"'' (random init), got {init_from!r}")
    for key in ("keep", "every"):  # keep=0 would save nothing; every=0 divides by zero
        if int(config.checkpoint[key]) < 1:
            raise ValueError(f"checkpoint.{key} must be at least 1, got {config.checkpoint[key]}")


def _validate(config, mesh):
    check_config(config)
    gb = int(config.batch_size)
    dp = data_parallel_size(mesh)
    if gb % jax.process_count():
        raise ValueError(f"batch_size {gb} does not divide over {jax.process_count()} processes")
    accum = int(config.get("grad_accum", 1))
    if accum < 1 or gb % accum:
        raise ValueError(f"grad_accum {accum} must divide batch_size {gb}")
    if (gb // accum) % dp:
        raise ValueError(f"the micro-batch {gb // accum} (batch_size / grad_accum) does not divide "
                         f"over the mesh's {dp} data-parallel devices (data x fsdp)")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def _check_batch_fits(stage, config, mesh):
    """Refuse at once (before data, init and compile) a batch whose inputs alone cannot fit: the
    host-local batch in this host's memory, or a device's shard of it in that device's memory.
    Inputs only (a lower bound): activations, parameters and the data pipeline come on top."""
    per_example = sum(np.asarray(a).nbytes for a in jax.tree.leaves(stage.dummy_batch(1)))
    gb = int(config.batch_size)
    per_host = gb // jax.process_count()
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX host
        host = 0
    if host and per_example * per_host > host:
        raise ValueError(
            f"batch_size {gb} needs at least {_bytes(per_example * per_host)} of host memory for "
            f"its inputs alone ({_bytes(per_example)} an example x {per_host} examples on this "
            f"host); this host has {_bytes(host)}: lower batch_size")
    try:
        limit = (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit", 0)
    except Exception:  # noqa: BLE001 -- not every backend reports its memory
        limit = 0
    per_device = per_example * -(-gb // data_parallel_size(mesh))
    if limit and per_device > limit:
        raise ValueError(
            f"batch_size {gb} needs at least {_bytes(per_device)} of device memory for its inputs "
            f"alone ({_bytes(per_example)} an example x {gb} / {data_parallel_size(mesh)} "
            f"data-parallel devices); a device has {_bytes(limit)}: lower batch_size or use more "
            f"devices")


def make_update(tx, schedule, config):
    """The step's second half: `update(state, grads) -> (state, metrics)` — optax, EMA and the
    metric norms (grad_norm, param_norm, lr)."""
    ema_decay = float(config.ema.decay)

    def update(state: TrainState, grads):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, state.step, ema_decay)
        metrics = dict(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                       lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    return update


def make_train_step(stage, tx, schedule, config, mesh, rules, packing=None):
    """The pure update: grads (with accumulation over micro-batches), then `make_update`'s
    optax, EMA and metrics. With `packing` (a `packed.StatePacking`) the state is packed: the
    parameters are sliced out of it for the loss, their gradients packed for `tx` (which must
    be `packing.tx`)."""
    accum = int(config.get("grad_accum", 1))
    update = make_update(tx, schedule, config)
    base_rng = jax.random.key(int(config.seed))
    bsh = batch_sharding(mesh)

    def loss_fn(params, batch, rng, frozen):
        return stage.loss(params, batch, rng, frozen)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(base_rng, state.step)
        params = state.params if packing is None else packing.unpack_tree(state.params)
        with nn.logical_axis_rules(rules):
            if accum == 1:
                (loss, aux), grads = grad_fn(params, batch, rng, frozen)
            else:
                def split(x):  # [B, ...] -> [accum, B/accum, ...], each device keeping its rows
                    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
                    return jnp.moveaxis(x, 1, 0)

                micro = jax.tree.map(split, batch)

                def body(carry, xs):
                    i, mb = xs
                    mb = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, bsh), mb)
                    (l, a), g = grad_fn(params, mb, jax.random.fold_in(rng, i), frozen)
                    gs, ls, auxs = carry
                    return (jax.tree.map(jnp.add, gs, g), ls + l,
                            jax.tree.map(jnp.add, auxs, a)), None

                zeros_g = jax.tree.map(jnp.zeros_like, params)
                aux0 = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(
                    lambda a: a[0], micro), rng, frozen)[0][1])
                zeros_a = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
                (grads, loss, aux), _ = jax.lax.scan(
                    body, (zeros_g, jnp.float32(0.0), zeros_a), (jnp.arange(accum), micro))
                grads = jax.tree.map(lambda g: g / accum, grads)
                loss = loss / accum
                aux = jax.tree.map(lambda a: a / accum, aux)
        if packing is not None:
            grads = packing.pack_tree(grads)
        state, metrics = update(state, grads)
        return state, dict(aux, loss=loss, **metrics)

    return step_fn


def _all_finite(tree) -> jax.Array:
    """One bool on device: every floating-point leaf of `tree` is finite (a single reduction;
    the trainer fetches it only at save steps)."""
    ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(ok)) if ok else jnp.bool_(True)


def _last_good(ckpt) -> str:
    last = ckpt.latest_step()
    return (f"the last good checkpoint is step {last} in {ckpt.dir}" if last is not None
            else f"no checkpoint has been saved in {ckpt.dir}")


def _non_finite_error(stage_name, step, state, finite, ckpt) -> FloatingPointError:
    """What to say when the state to be saved at `step` is not finite (it is not saved)."""
    parts = [name for name in ("params", "opt_state", "ema_params")
             if not bool(finite(getattr(state, name)))]
    return FloatingPointError(
        f"[{stage_name}] the training state is not finite at step {step} "
        f"(non-finite {', '.join(parts) or 'values'}): not saving it; {_last_good(ckpt)}. The "
        f"run diverged: lower optimizer.lr (or check the data); the same command resumes from "
        f"the last good checkpoint")


def _model_flops_per_device(stage, config, params_abs, batch_abs, frozen) -> float | None:
    """Model FLOPs of one step on one device, for TFLOP/s and MFU: the stage's own count, else
    3 x the loss's forward matrix products / convolutions counted on its jaxpr (every scanned
    layer and accumulation step included; remat recomputation not). Frozen encoders inside the
    loss (CLIP in the prior / decoder steps) count as trained: an overestimate by twice their
    forward pass, small next to the trained network (see docs/PERFORMANCE.md)."""
    per_example = stage.flops_per_example()
    if per_example:
        return per_example * int(config.batch_size) / jax.device_count()
    accum = int(config.get("grad_accum", 1))
    micro = jax.tree.map(lambda a: jax.ShapeDtypeStruct((a.shape[0] // accum,) + a.shape[1:],
                                                        a.dtype), batch_abs)
    try:
        fwd = flops_lib.jaxpr_flops(lambda p, b, f: stage.loss(p, b, jax.random.key(0), f)[0],
                                    params_abs, micro, frozen)
    except Exception:  # noqa: BLE001 -- a count is a nicety; training goes on without it
        return None
    return 3.0 * fwd * accum / jax.device_count() if fwd else None


def train(stage, config, workdir: str, *, stop_at_step: int | None = None,
          progress: bool = True, devices=None, on_log=None) -> TrainResult:
    """Train `stage` (built from `config`) into WORKDIR/<stage>/ (WORKDIR/<config.stage_dir>/
    when that is set, e.g. upsampler2), resuming from its newest checkpoint.

    `stop_at_step` ends the run at that step with a checkpoint, as a preemption would; a run
    already there trains nothing (`stop_at_step=0`: the initial state, e.g. imported with
    `config.init_from`, is saved as checkpoint 0 and returned).

    `config.init_from` (a source of weights, `unclip_jax.train.init_from`) gives a fresh run its
    step-0 parameters (and EMA) instead of a random init and `stage.post_init`; the optimizer
    state starts fresh. The source is read and checked against the model before anything is
    written into the stage directory, and recorded in its config.json; a resumed run never
    reads it.

    `devices` restricts the mesh to these devices (default: all). Throughput figures (steps/s,
    TFLOP/s, MFU) count training steps only: the clock pauses around checkpoint saves and
    preview sampling.

    On one device (and `config.pack_state`, default on) the loop holds the state packed
    (`unclip_jax.train.packed`: a few flat vectors instead of 4 arrays per parameter, one fused
    optimizer / EMA update); checkpoints and the returned state are the per-parameter
    `TrainState` either way.

    `on_log(step, metrics, probe)`, when given, is called after each logged window with the
    clock paused (for benches: `bench/bench_stage_steps.py` times the bare step between the
    trainer's windows); `probe` holds the compiled step (`step_fn(state, batch, frozen)`, which
    donates its state: run it on a copy), `state` (as the step takes it: packed or not),
    `params` (the per-parameter tree), `update` (the step's `make_update` half), the last
    `batch`, `frozen`, `step_flops` and `packing` (None or the StatePacking). It must not change
    them.
    """
    if config.get("stage") and config.stage != stage.name:
        raise ValueError(f"the config is for the {config.stage!r} stage but the trainer was "
                         f"handed the {stage.name!r} stage")
    maybe_initialize_distributed()
    # ---- mesh
    mesh = make_mesh(dict(config.mesh), devices)
    rules = get_rules(config.sharding if isinstance(config.sharding, str)
                      else list(config.sharding))
    _validate(config, mesh)
    _check_batch_fits(stage, config, mesh)
    pc, pi = jax.process_count(), jax.process_index()
    per_host = int(config.batch_size) // pc
    total = int(config.total_steps)

    # ---- stage
    dir_name = stage_dir_name(config, stage.name)
    stage_dir = os.path.join(workdir, dir_name)

    # ---- abstract init and shardings
    dummy = stage.dummy_batch(max(1, data_parallel_size(mesh)))
    init_rng = jax.random.key(_init_seed(config.seed))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: stage.init_variables(r, dummy), init_rng)
    params_sh = logical_shardings(boxed["params"], mesh, rules)
    params_abs = nn.unbox(boxed["params"])
    trainable = stage.trainable(params_abs)
    tx, schedule = make_optimizer(config.optimizer, total, trainable)
    opt_abs = jax.eval_shape(tx.init, params_abs)
    opt_sh = opt_state_shardings(opt_abs, params_abs, params_sh, mesh)
    state_sh = TrainState(replicated(mesh), params_sh, opt_sh, params_sh)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), params_abs, opt_abs, params_abs),
        state_sh)

    # ---- the loop's layout of the state: packed on one device (train/packed.py)
    packing = None
    if config.get("pack_state", True) and mesh.devices.size == 1:
        from unclip_jax.train.packed import StatePacking

        try:
            packing = StatePacking(params_abs, trainable, config.optimizer, total)
        except ValueError as e:  # an optimizer state it cannot map: the per-parameter layout
            if pi == 0:
                print(f"[{stage.name}] training state not packed: {e}", flush=True)

    # ---- config.init_from: the source read and checked before anything is written into the
    # stage directory (a resumed run keeps its record's entry and never reads the source)
    init_spec = str(config.get("init_from") or "")
    imported, init_entry = None, {}
    if init_spec:
        from unclip_jax.train import init_from as init_lib

        init_entry = init_lib.recorded_entry(stage_dir)
        if not has_checkpoints(stage_dir):
            imported, init_entry = init_lib.import_params(
                init_spec, stage.name, dir_name, params_abs, stage.record().model, log=pi == 0)
    stage.write_files(stage_dir)
    record = stage.record()  # after write_files, which may move what the record names
    if init_entry:
        record = dataclasses.replace(record, init_from=init_entry)
    ckpt = StageCheckpointer(stage_dir, record,
                             keep=int(config.checkpoint.keep), every=int(config.checkpoint.every),
                             async_save=bool(config.checkpoint.get("async_save", True)))

    frozen, frozen_sh = None, None
    fz = stage.frozen()
    if fz is not None:
        frozen_boxed, frozen_params = fz
        frozen_sh = logical_shardings(frozen_boxed, mesh, rules)
        frozen = jax.device_put(frozen_params, frozen_sh)

    # ---- restore or init
    restored = ckpt.restore(abstract_state)
    if restored is not None:
        state, meta, start = restored
        skipped_total = int(meta.get("skipped", 0))
        print(f"[{stage.name}] resumed from step {start} in {stage_dir}"
              + (" (config.init_from is not read again)" if init_spec else ""), flush=True)
    else:
        start, skipped_total = 0, 0
        if init_spec and imported is None:  # its checkpoints were all unreadable: import now
            imported, init_entry = init_lib.import_params(
                init_spec, stage.name, dir_name, params_abs, record.model, log=pi == 0)
            if pi == 0:
                dataclasses.replace(record, init_from=init_entry).write(stage_dir)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            if imported is not None:  # the source's parameters as they are: no post_init
                params = init_lib.place(imported, params_sh)
                del imported
            else:
                params = jax.jit(lambda r: nn.unbox(stage.init_variables(r, dummy)["params"]),
                                 out_shardings=params_sh)(init_rng)
                params = stage.post_init(params, stage.batches(
                    batch_size=per_host, seed=int(config.seed), start_step=0, process_index=pi,
                    process_count=pc))
            params = jax.device_put(params, params_sh)
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
            ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=params_sh)(params)
        state = TrainState(jax.device_put(jnp.int32(0), replicated(mesh)), params, opt_state, ema)

    finite = jax.jit(_all_finite, out_shardings=replicated(mesh))  # checked before each save
    if stop_at_step is not None and start >= stop_at_step:  # nothing to train
        try:
            if restored is None:  # the initial state as checkpoint `start` (0)
                if not bool(finite(state)):
                    raise _non_finite_error(stage.name, start, state, finite, ckpt)
                ckpt.save(start, state, {"skipped": 0})
        finally:
            ckpt.close()
        if pi == 0:
            print(f"[{stage.name}] stopped at step {start}; the same command resumes", flush=True)
        return TrainResult(state=state, step=start, history=[], preempted=start < total)

    # ---- the step: jit with shardings (pjit), donated state, compiled ahead of time
    run_sh, run_abstract, unpack = state_sh, abstract_state, (lambda st: st)
    if packing is not None:
        pack_fn = jax.jit(packing.pack_state, out_shardings=replicated(mesh))
        unpack = jax.jit(packing.unpack_state, out_shardings=state_sh)
        run_abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)),
            jax.eval_shape(packing.pack_state, abstract_state))
        run_sh = jax.tree.map(lambda a: a.sharding, run_abstract)
        state = pack_fn(state)
    step_fn = make_train_step(stage, tx if packing is None else packing.tx, schedule, config,
                              mesh, rules, packing)
    bsh = batch_sharding(mesh)
    batch_abs = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((int(config.batch_size),) + a.shape[1:], a.dtype,
                                       sharding=bsh), stage.dummy_batch(1))
    jitted = jax.jit(step_fn, in_shardings=(run_sh, bsh, frozen_sh),
                     out_shardings=(run_sh, replicated(mesh)), donate_argnums=(0,))
    t0 = time.time()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(run_abstract, batch_abs, frozen).compile()
    compile_s = time.time() - t0
    step_flops = _model_flops_per_device(stage, config, params_abs, batch_abs, frozen)
    peak = flops_lib.peak_flops()
    mem = flops_lib.memory_summary(compiled)
    if pi == 0:
        print(f"[{stage.name}] compiled the train step in {compile_s:.1f}s; per device: "
              + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()), flush=True)

    # ---- the loop
    from clu import metric_writers

    writer = metric_writers.create_default_writer(os.path.join(stage_dir, "tb"),
                                                  just_logging=pi > 0)
    if start == 0 and pi == 0:
        hparams = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
        writer.write_hparams({k: v for k, v in hparams.items()
                              if isinstance(v, (int, float, str, bool))})
    preempted = {"flag": False}
    old_handler = _install_sigterm(preempted)
    batches = stage.batches(batch_size=per_host, seed=int(config.seed), start_step=start,
                            process_index=pi, process_count=pc)
    history: list[dict[str, float]] = []
    log_every = max(1, int(config.log_every))
    sample_every = int(config.get("sample_every", 0) or 0)
    bar = None
    if progress and pi == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train {stage.name}", dynamic_ncols=True)
    step = start
    t_last, steps_since = time.time(), 0
    try:
        while step < total:
            host_batch, skipped = next(batches)
            skipped_total += int(skipped)
            batch = {k: jax.make_array_from_process_local_data(bsh, np.asarray(v))
                     for k, v in host_batch.items()}
            state, metrics = compiled(state, batch, frozen)
            step += 1
            steps_since += 1
            if bar is not None:
                bar.update(1)
            stop = (stop_at_step is not None and step >= stop_at_step) or preempted["flag"] \
                or ckpt.reached_preemption(step)
            if step % log_every == 0 or step == total or stop:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = max(time.time() - t_last, 1e-9)
                m["steps_per_s"] = steps_since / dt
                m["examples_per_s"] = m["steps_per_s"] * int(config.batch_size)
                m["skipped_examples"] = float(skipped_total)
                if step_flops:
                    m["tflops_per_device"] = step_flops * m["steps_per_s"] / 1e12
                    if peak:
                        m["mfu"] = step_flops * m["steps_per_s"] / peak
                t_last, steps_since = time.time(), 0
                writer.write_scalars(step, m)
                history.append(dict(m, step=step))
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                if on_log is not None:  # not training time: pause the clock
                    paused = time.time()
                    on_log(step, m, dict(
                        step_fn=compiled, state=state, batch=batch, frozen=frozen,
                        step_flops=step_flops, packing=packing,
                        params=state.params if packing is None
                        else unpack(state).params,
                        update=make_update(tx if packing is None else packing.tx, schedule,
                                           config)))
                    t_last += time.time() - paused
                if not all(math.isfinite(v) for v in (m["loss"], m["grad_norm"])):
                    raise FloatingPointError(
                        f"[{stage.name}] non-finite loss or gradient at step {step}: {m}; "
                        f"{_last_good(ckpt)}")
            preview = bool(sample_every and step % sample_every == 0 and pi == 0)
            save = stop or step == total or step % ckpt.every == 0
            if preview or save:  # previews and saves are not training time: pause the clock
                jax.block_until_ready(state)
                paused = time.time()
                full = unpack(state)  # the per-parameter TrainState (a copy when packed)
                if preview:
                    imgs = stage.sample_images(full.ema_params, frozen, jax.random.key(step))
                    if imgs is not None:
                        writer.write_images(step, {"samples": np.asarray(imgs)})
                if save:  # never a non-finite state: with keep-N it would push out good ones
                    if not bool(finite(full)):
                        raise _non_finite_error(stage.name, step, full, finite, ckpt)
                    ckpt.save(step, full, {"skipped": skipped_total})
                del full
                t_last += time.time() - paused
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
        signal.signal(signal.SIGTERM, old_handler) if old_handler is not None else None
        ckpt.close()
        writer.flush()
    stopped = step < total
    if stopped and pi == 0:
        print(f"[{stage.name}] stopped at step {step}; the same command resumes", flush=True)
    return TrainResult(state=unpack(state), step=step, history=history, preempted=stopped)


def _install_sigterm(flag: dict):
    """On SIGTERM finish the current step, save a checkpoint and return (preemption)."""
    def handler(signum, frame):
        flag["flag"] = True
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        return None
