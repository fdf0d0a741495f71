#!/usr/bin/env bash
# Train on all the GPUs of this machine: ONE process that sees every local GPU (JAX's
# single-process multi-device; the trainer's mesh spans them, no jax.distributed needed).
#
#   launch/gpu_local.sh --config configs/decoder.py:size=base --workdir workdir/decoder
#   launch/gpu_local.sh --gpus 0,1 --config configs/prior.py --workdir gs://bucket/prior -- --config.lr=1e-4
#
# Installs '.[cuda]' (jax[cuda13]) into the virtual environment first if it is missing.
# `--dry-run` prints the commands (shell-quoted, prefixed by "+ ") instead of running them.
set -euo pipefail

PROG=launch/gpu_local.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# XLA:GPU flags for training. Each was checked to parse with jaxlib 0.10 (an unknown flag in
# XLA_FLAGS aborts start-up); a user's own $XLA_FLAGS comes after these and wins.
#  - latency-hiding scheduler: overlap the FSDP all-gathers / reduce-scatters with compute
#  - larger combine thresholds: fewer, bigger collectives for the per-layer parameter shards
#  - triton GEMM off: cuBLAS(Lt) is as fast for the UNet's matmuls and autotuning compiles faster
DEFAULT_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_enable_triton_gemm=false"

usage() {
  cat <<'EOF'
usage: launch/gpu_local.sh --config CONFIG [options] [-- ARGS for `unclip-jax train`]

Runs `unclip-jax train --config CONFIG --workdir DIR ARGS` as one process over all local GPUs.

Options
  --config CONFIG     configs/<stage>.py[:size=...]                               (required)
  --workdir DIR       checkpoints and logs (local path or gs://)   [workdir/<config name>]
  --gpus LIST         restrict to these GPUs, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES)       [all]
  --mem-fraction F    XLA_PYTHON_CLIENT_MEM_FRACTION, share of each GPU JAX preallocates [0.90]
  --xla-flags FLAGS   replace the default XLA_FLAGS (see the top of this script)
  --venv DIR          the virtual environment to use / create                      [.venv]
  --python PY         interpreter that creates the venv                          [python3]
  --no-install        never pip install; use the venv (or the current PATH) as it is
  --dry-run           print the commands instead of running them
  -h, --help          this help
Everything after `--` is passed to `unclip-jax train` unchanged. Relative paths (--venv,
--workdir, the config) are relative to the repository root, where the command runs.
EOF
}


DRY_RUN=0
run() {
  echo "+ $(qall "$@")" >&$(( DRY_RUN ? 1 : 2 ))
  (( DRY_RUN )) || "$@"
}

CONFIG=""
WORKDIR=""
GPUS=""
MEM_FRACTION="0.90"
XLA_FLAGS_SET=0
XLA_FLAGS_VALUE="$DEFAULT_XLA_FLAGS"
VENV=".venv"
PYTHON="python3"
INSTALL=1
TRAIN_ARGS=()


while [[ $# -gt 0 ]]; do
  arg="$1"; val=""; has_val=0
  if [[ "$arg" == --*=* ]]; then val="${arg#*=}"; arg="${arg%%=*}"; has_val=1; fi
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --config) take "$@"; CONFIG="$val" ;;
    --workdir) take "$@"; WORKDIR="$val" ;;
    --gpus) take "$@"; GPUS="$val" ;;
    --mem-fraction) take "$@"; MEM_FRACTION="$val" ;;
    --xla-flags) take "$@"; XLA_FLAGS_VALUE="$val"; XLA_FLAGS_SET=1 ;;
    --venv) take "$@"; VENV="$val" ;;
    --python) take "$@"; PYTHON="$val" ;;
    --no-install|--dry-run)
      (( has_val )) && die "option $arg takes no value"
      SHIFT=1
      if [[ "$arg" == --dry-run ]]; then DRY_RUN=1; else INSTALL=0; fi ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *) die "unexpected argument '$arg' (arguments for unclip-jax train go after --)" ;;
  esac
  shift "$SHIFT"
done

[[ -n "$CONFIG" ]] || die "missing --config (e.g. --config configs/decoder.py:size=base)"
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus wants a list like 0,1,2,3, got '$GPUS'"
[[ "$MEM_FRACTION" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction wants a number in (0, 1], got '$MEM_FRACTION'"
if [[ -z "$WORKDIR" ]]; then
  name="${CONFIG##*/}"; name="${name%%:*}"; WORKDIR="workdir/${name%.py}"
fi

cd "$REPO_ROOT"

# ------------------------------------------------------------------------ install if missing
UNCLIP=unclip-jax
if (( INSTALL )); then
  # Installed = the venv has the console script and the CUDA plugin of jax[cuda13].
  if [[ -x "$VENV/bin/unclip-jax" ]] \
     && "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("jax-cuda13-plugin")' \
        >/dev/null 2>&1; then
    :
  else
    [[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "$VENV"
    run "$VENV/bin/python" -m pip install --upgrade pip
    run "$VENV/bin/python" -m pip install -e '.[cuda]'
  fi
  UNCLIP="$VENV/bin/unclip-jax"
elif [[ -x "$VENV/bin/unclip-jax" ]]; then
  UNCLIP="$VENV/bin/unclip-jax"
fi

# ---------------------------------------------------------------------------------- train
# One process: clear anything that would make the trainer look for other hosts.
ENV=(env -u JAX_COORDINATOR_ADDRESS -u JAX_NUM_PROCESSES -u JAX_PROCESS_ID
     JAX_PLATFORMS=cuda "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
if (( XLA_FLAGS_SET )); then
  ENV+=("XLA_FLAGS=$XLA_FLAGS_VALUE")
else
  ENV+=("XLA_FLAGS=${XLA_FLAGS_VALUE}${XLA_FLAGS:+ $XLA_FLAGS}")
fi
[[ -n "$GPUS" ]] && ENV+=("CUDA_VISIBLE_DEVICES=$GPUS")

run "${ENV[@]}" "$UNCLIP" train --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}"
