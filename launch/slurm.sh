#!/usr/bin/env bash
# Submit unclip-jax training to a SLURM GPU cluster: renders launch/slurm.sbatch with an #SBATCH
# header built from the options below and submits it with sbatch.
#
#   launch/slurm.sh --nodes 2 --gpus-per-node 8 --partition gpu --time 48:00:00 \
#       --config configs/decoder.py:size=base --workdir /shared/runs/decoder -- --config.lr=1e-4
#
# The repository (and its .venv) must be on a file system that every node mounts.
# `--dry-run` prints the rendered job script and the sbatch command (shell-quoted, "+ " prefix)
# instead of writing and submitting anything; it needs no SLURM.
set -euo pipefail

PROG=launch/slurm.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMPLATE="$REPO_ROOT/launch/slurm.sbatch"
MARKER='## ---- end of the #SBATCH header'

usage() {
  cat <<'EOF'
usage: launch/slurm.sh --config CONFIG --workdir DIR [options] [-- ARGS for `unclip-jax train`]

Options
  --config CONFIG        configs/<stage>.py[:size=...]                                 (required)
  --workdir DIR          where checkpoints go; every node must reach it: a shared file
                         system (relative paths are relative to the repo) or gs://  (required)
  --nodes N              nodes                                                              [1]
  --gpus-per-node G      GPUs per node                                                      [8]
  --per-node             one process per node driving its G GPUs
                         (default: one process per GPU, --ntasks-per-node=G)
  --partition P          SLURM partition                                    [cluster default]
  --account A            SLURM account                                      [cluster default]
  --time T               time limit, e.g. 24:00:00                                   [24:00:00]
  --cpus-per-task C      CPUs per process                                   [cluster default]
  --job-name NAME        job name                                                  [unclip-jax]
  --output PATTERN       log file                                       [slurm-%x-%j.out in repo]
  --port PORT            coordinator port                                [derived from job id]
  --venv DIR             virtual environment to activate on the nodes    [.venv if it exists]
  --requeue              let SLURM requeue the job after preemption or node failure
  --sbatch-arg ARG       extra sbatch option (repeatable), e.g. --sbatch-arg=--exclusive
  --dry-run              print the rendered job script and the sbatch command; submit nothing
  -h, --help             this help
Everything after `--` is passed to `unclip-jax train` unchanged.
EOF
}


CONFIG=""
WORKDIR=""
NODES=1
GPUS=8
PER_NODE=0
PARTITION=""
ACCOUNT=""
TIME="24:00:00"
CPUS=""
JOB_NAME="unclip-jax"
OUTPUT="$REPO_ROOT/slurm-%x-%j.out"
PORT=""
VENV=""
REQUEUE=0
SBATCH_ARGS=()
DRY_RUN=0
TRAIN_ARGS=()


while [[ $# -gt 0 ]]; do
  arg="$1"; val=""; has_val=0
  if [[ "$arg" == --*=* ]]; then val="${arg#*=}"; arg="${arg%%=*}"; has_val=1; fi
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --config) take "$@"; CONFIG="$val" ;;
    --workdir) take "$@"; WORKDIR="$val" ;;
    --nodes) take "$@"; NODES="$val" ;;
    --gpus-per-node) take "$@"; GPUS="$val" ;;
    --partition) take "$@"; PARTITION="$val" ;;
    --account) take "$@"; ACCOUNT="$val" ;;
    --time) take "$@"; TIME="$val" ;;
    --cpus-per-task) take "$@"; CPUS="$val" ;;
    --job-name) take "$@"; JOB_NAME="$val" ;;
    --output) take "$@"; OUTPUT="$val" ;;
    --port) take "$@"; PORT="$val" ;;
    --venv) take "$@"; VENV="$val" ;;
    --sbatch-arg) take "$@"; SBATCH_ARGS+=("$val") ;;
    --per-node|--requeue|--dry-run)
      (( has_val )) && die "option $arg takes no value"
      SHIFT=1
      case "$arg" in --per-node) PER_NODE=1 ;; --requeue) REQUEUE=1 ;; --dry-run) DRY_RUN=1 ;; esac ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *) die "unexpected argument '$arg' (arguments for unclip-jax train go after --)" ;;
  esac
  shift "$SHIFT"
done

[[ -n "$CONFIG" ]] || die "missing --config (e.g. --config configs/decoder.py:size=base)"
[[ -n "$WORKDIR" ]] || die "missing --workdir (a directory on a shared file system, or gs://...)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes wants a positive integer, got '$NODES'"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node wants a positive integer, got '$GPUS'"
[[ -z "$CPUS" || "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task wants a positive integer, got '$CPUS'"
[[ -z "$PORT" || "$PORT" =~ ^[1-9][0-9]*$ ]] || die "--port wants a number, got '$PORT'"
[[ "$JOB_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad --job-name '$JOB_NAME'"
if [[ -z "$VENV" && -f "$REPO_ROOT/.venv/bin/activate" ]]; then VENV="$REPO_ROOT/.venv"; fi
[[ -f "$TEMPLATE" ]] || die "job script template not found: $TEMPLATE"
grep -q "^$MARKER" "$TEMPLATE" || die "$TEMPLATE has no '$MARKER' line"

# ------------------------------------------------------------------------ the sbatch options
if (( PER_NODE )); then TASKS_PER_NODE=1; else TASKS_PER_NODE="$GPUS"; fi
OPTS=("--job-name=$JOB_NAME" "--nodes=$NODES" "--ntasks-per-node=$TASKS_PER_NODE"
      "--gpus-per-node=$GPUS" "--time=$TIME")
[[ -n "$PARTITION" ]] && OPTS+=("--partition=$PARTITION")
[[ -n "$ACCOUNT" ]] && OPTS+=("--account=$ACCOUNT")
[[ -n "$CPUS" ]] && OPTS+=("--cpus-per-task=$CPUS")
(( REQUEUE )) && OPTS+=(--requeue)
OPTS+=("--signal=TERM@120" "--output=$OUTPUT")
OPTS+=("${SBATCH_ARGS[@]}")

EXPORT="ALL,UNCLIP_REPO=$REPO_ROOT,UNCLIP_PER_NODE=$PER_NODE"
[[ -n "$VENV" ]] && EXPORT+=",UNCLIP_VENV=$VENV"
[[ -n "$PORT" ]] && EXPORT+=",JAX_COORDINATOR_PORT=$PORT"
[[ "$EXPORT" != *[[:space:]]* ]] || die "paths with spaces cannot be passed through sbatch --export"

render() {
  echo '#!/bin/bash'
  local o
  for o in "${OPTS[@]}"; do echo "#SBATCH $o"; done
  echo "#SBATCH --export=$EXPORT"
  echo "#SBATCH --chdir=$REPO_ROOT"
  sed -n "/^$MARKER/,\$p" "$TEMPLATE"
}

# The options are given on the command line as well as in the rendered header (same values), so
# the command shows the shape of the job and the stored job script documents it.
SBATCH=(sbatch "${OPTS[@]}" "--export=$EXPORT" "--chdir=$REPO_ROOT")

if (( DRY_RUN )); then
  echo "# ---- rendered job script ----"
  render
  echo "# ---- end of job script ----"
  echo "+ $(qall "${SBATCH[@]}" "${TMPDIR:-/tmp}/$JOB_NAME.XXXXXX.sbatch" \
                   --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")"
  exit 0
fi

command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a SLURM login node, or use --dry-run"
script="$(mktemp --suffix=.sbatch "${TMPDIR:-/tmp}/$JOB_NAME.XXXXXX")"
trap 'rm -f "$script"' EXIT   # sbatch keeps its own copy of the job script
render > "$script"
echo "+ $(qall "${SBATCH[@]}" "$script" --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")" >&2
"${SBATCH[@]}" "$script" --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}"
