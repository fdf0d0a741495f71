#!/usr/bin/env bash
# Create, set up, train on and delete a Cloud TPU VM or pod slice.
#
#   launch/tpu.sh create --name my-pod --zone us-east5-a --accelerator-type v5p-32 [--queued] [--spot]
#   launch/tpu.sh setup  --name my-pod --zone us-east5-a
#   launch/tpu.sh train  --name my-pod --zone us-east5-a --config configs/decoder.py:size=base \
#                        --workdir gs://my-bucket/runs/decoder -- --config.lr=1e-4
#   launch/tpu.sh delete --name my-pod --zone us-east5-a [--queued]
#
# Every command goes through `run`, so `--dry-run` prints exactly what would be executed
# (shell-quoted, one command per line, prefixed by "+ ") and needs no gcloud.
set -euo pipefail

PROG=launch/tpu.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/tpu.sh COMMAND [options] [-- ARGS for `unclip-jax train`]

Commands
  create    create the TPU VM / pod slice (`tpu-vm create`, or a queued resource with --queued)
  setup     copy this checkout (or git-clone --repo) to every worker and
            `pip install -e '.[tpu]'` on all workers at once (--worker=all)
  train     run `unclip-jax train --config C --workdir gs://...` on all workers at once
            (--worker=all); jax.distributed.initialize() finds the other hosts by itself
  logs      follow the training log of one worker (after `train --background`)
  ssh       open a shell on one worker (--worker N), or run --command on --worker=all
  status    describe the TPU (or the queued resource with --queued)
  delete    delete the TPU (or the queued resource and its TPU with --queued)

Options
  --name NAME              TPU (and queued-resource) name               [$TPU_NAME]
  --zone ZONE              e.g. us-east5-a, us-central2-b      [$ZONE, else gcloud config]
  --project PROJECT        GCP project                        [gcloud config]
  --accelerator-type TYPE  e.g. v5p-32, v5litepod-16, v4-8, v6e-8       [v5p-32]
  --version RUNTIME        TPU software version, e.g. v2-alpha-tpuv5, tpu-ubuntu2204-base
                           [chosen from the accelerator type]
  --queued                 create/delete/status through `gcloud compute tpus queued-resources`
  --spot                   Spot capacity (preemptible; the trainer saves on SIGTERM)
  --create-arg ARG         extra flag for the create command (repeatable), e.g.
                           --create-arg=--service-account=SA --create-arg=--reserved
  --repo URL [--ref REF]   setup: git clone URL (at REF) on the workers instead of copying
                           this checkout
  --source DIR             setup: the checkout to copy                  [this repository]
  --remote-dir DIR         where the package lives on the workers         [unclip_jax, in ~]
  --config CONFIG          train: configs/<stage>.py[:size=...]
  --workdir DIR            train: must be gs://... on a multi-host slice
  --env KEY=VALUE          train: extra environment variable on the workers (repeatable)
  --background             train: detach (nohup), log to ~/unclip_jax_train.log; see `logs`
  --worker N|all           ssh/logs: which worker                    [ssh: 0, logs: 0]
  --command CMD            ssh: run CMD instead of an interactive shell
  --yes                    delete: do not ask for confirmation
  --dry-run                print the commands instead of running them
  -h, --help               this help
Everything after `--` is passed to `unclip-jax train` unchanged.
EOF
}


DRY_RUN=0
run() {
  if (( DRY_RUN )); then
    echo "+ $(qall "$@")"
  else
    echo "+ $(qall "$@")" >&2
    "$@"
  fi
}

# ------------------------------------------------------------------------------------ options
CMD=""
NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT=""
ACCEL=""
VERSION=""
QUEUED=0
SPOT=0
CREATE_ARGS=()
REPO_URL=""
REF=""
REMOTE_DIR="unclip_jax"
SOURCE_DIR="$REPO_ROOT"
CONFIG=""
WORKDIR=""
ENVS=()
BACKGROUND=0
WORKER=""
SSH_COMMAND=""
YES=0
TRAIN_ARGS=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  val=""
  has_val=0
  if [[ "$arg" == --*=* ]]; then val="${arg#*=}"; arg="${arg%%=*}"; has_val=1; fi
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --name) take "$@"; NAME="$val" ;;
    --zone) take "$@"; ZONE="$val" ;;
    --project) take "$@"; PROJECT="$val" ;;
    --accelerator-type) take "$@"; ACCEL="$val" ;;
    --version|--runtime-version) take "$@"; VERSION="$val" ;;
    --create-arg) take "$@"; CREATE_ARGS+=("$val") ;;
    --repo) take "$@"; REPO_URL="$val" ;;
    --ref) take "$@"; REF="$val" ;;
    --remote-dir) take "$@"; REMOTE_DIR="$val" ;;
    --source) take "$@"; SOURCE_DIR="$val" ;;
    --config) take "$@"; CONFIG="$val" ;;
    --workdir) take "$@"; WORKDIR="$val" ;;
    --env) take "$@"; [[ "$val" == *=* ]] || die "--env wants KEY=VALUE, got '$val'"; ENVS+=("$val") ;;
    --worker) take "$@"; WORKER="$val" ;;
    --command) take "$@"; SSH_COMMAND="$val" ;;
    --queued|--spot|--background|--yes|--dry-run)
      (( has_val )) && die "option $arg takes no value"
      SHIFT=1
      case "$arg" in
        --queued) QUEUED=1 ;; --spot) SPOT=1 ;; --background) BACKGROUND=1 ;;
        --yes) YES=1 ;; --dry-run) DRY_RUN=1 ;;
      esac ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *)
      [[ -z "$CMD" ]] || die "unexpected argument '$arg' (arguments for unclip-jax train go after --)"
      CMD="$arg"; SHIFT=1 ;;
  esac
  shift "$SHIFT"
done

[[ -n "$CMD" ]] || die "missing command: create, setup, train, logs, ssh, status or delete (see --help)"
case "$CMD" in
  create|setup|train|logs|ssh|status|delete) ;;
  *) die "unknown command '$CMD' (create, setup, train, logs, ssh, status, delete)" ;;
esac
[[ -n "$NAME" ]] || die "missing --name (the TPU name)"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "bad --name '$NAME': lowercase letters, digits and '-', starting with a letter"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "bad --remote-dir '$REMOTE_DIR'"
[[ -z "$WORKER" || "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] \
  || die "--worker wants a number or 'all', got '$WORKER'"

# Default accelerator and runtime: software versions per TPU generation, see
# https://cloud.google.com/tpu/docs/runtimes
ACCEL="${ACCEL:-v5p-32}"
[[ "$ACCEL" =~ ^(v[0-9]+[a-z]*(pod)?)-([0-9]+)$ ]] \
  || die "bad --accelerator-type '$ACCEL' (expected e.g. v5p-32, v5litepod-16, v4-8, v6e-8)"
ACCEL_GEN="${BASH_REMATCH[1]}"
ACCEL_SIZE="${BASH_REMATCH[3]}"
if [[ -z "$VERSION" ]]; then
  case "$ACCEL_GEN" in
    v5p) VERSION=v2-alpha-tpuv5 ;;
    v5litepod|v5e) VERSION=v2-alpha-tpuv5-lite ;;
    v6e) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
# Every type up to "-8" is a single host (v2-8 … v5p-8, v5litepod-8, v6e-8); anything larger
# spans several hosts, each running one process of the same program.
MULTI_HOST=0
(( ACCEL_SIZE > 8 )) && MULTI_HOST=1

LOC=()   # zone first, project last: the order of a hand-written gcloud command
[[ -n "$ZONE" ]] && LOC+=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && LOC+=("--project=$PROJECT")
TPU_VM=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
RDIR="~/$REMOTE_DIR"   # expanded by the workers' shell

# ------------------------------------------------------------------------------ sub-commands
cmd_create() {
  local extra=()
  (( SPOT )) && extra+=(--spot)
  if (( QUEUED )); then
    # The queued resource and the TPU node it provisions share one name, so ssh/scp/train
    # address the node by --name as usual.
    run "${QR[@]}" create "$NAME" "${LOC[@]:0:1}" "--accelerator-type=$ACCEL" \
      "--runtime-version=$VERSION" "--node-id=$NAME" "${extra[@]}" "${CREATE_ARGS[@]}" \
      "${LOC[@]:1}"
    (( DRY_RUN )) || echo "queued: run '$PROG status --queued --name $NAME ...' until the state is ACTIVE" >&2
  else
    run "${TPU_VM[@]}" create "$NAME" "${LOC[@]:0:1}" "--accelerator-type=$ACCEL" \
      "--version=$VERSION" "${extra[@]}" "${CREATE_ARGS[@]}" "${LOC[@]:1}"
  fi
}

ssh_all() {  # ssh_all WORKER REMOTE_COMMAND
  run "${TPU_VM[@]}" ssh "$NAME" "${LOC[@]}" "--worker=$1" "--command=$2"
}

cmd_setup() {
  local install="python3 -m pip install --upgrade pip && python3 -m pip install -e \".[tpu]\""
  if [[ -n "$REPO_URL" ]]; then
    local checkout=""
    [[ -n "$REF" ]] && checkout=" && git -C $RDIR checkout $(q "$REF")"
    ssh_all all "set -e; if [ -d $RDIR/.git ]; then git -C $RDIR fetch --all --tags; else git clone $(q "$REPO_URL") $RDIR; fi$checkout; cd $RDIR && $install"
  else
    [[ -z "$REF" ]] || die "--ref needs --repo"
    [[ -f "$SOURCE_DIR/setup.py" ]] || die "--source '$SOURCE_DIR' is not an unclip_jax checkout (no setup.py)"
    local tarball="${TMPDIR:-/tmp}/unclip_jax-$NAME.tar.gz"
    (( DRY_RUN )) || trap "rm -f $(q "$tarball")" EXIT   # also when a copy fails
    run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=workdir \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache -C "$SOURCE_DIR" .
    run "${TPU_VM[@]}" scp "$tarball" "$NAME:unclip_jax.tar.gz" "${LOC[@]}" --worker=all
    ssh_all all "set -e; mkdir -p $RDIR && tar -xzf ~/unclip_jax.tar.gz -C $RDIR && cd $RDIR && $install"
    run rm -f "$tarball"
  fi
}

cmd_train() {
  [[ -n "$CONFIG" ]] || die "missing --config (e.g. --config configs/decoder.py:size=base)"
  [[ -n "$WORKDIR" ]] || die "missing --workdir (a gs://bucket/path for a TPU pod)"
  if (( MULTI_HOST )) && [[ "$WORKDIR" != gs://* ]]; then
    die "--workdir must be a gs:// path on a multi-host TPU ($ACCEL): every worker writes checkpoints there (got '$WORKDIR')"
  fi
  local env="export PATH=\"\$HOME/.local/bin:\$PATH\" JAX_PLATFORMS=tpu"
  local kv
  for kv in "${ENVS[@]}"; do env+=" $(q "$kv")"; done
  local train
  train="unclip-jax train $(qall --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")"
  if (( BACKGROUND )); then
    train="nohup $train > ~/unclip_jax_train.log 2>&1 < /dev/null &"
  fi
  ssh_all all "cd $RDIR && $env && $train"
  if (( BACKGROUND && ! DRY_RUN )); then
    echo "training in the background; follow it with: $PROG logs --name $NAME ${ZONE:+--zone $ZONE}" >&2
  fi
}

cmd_logs() {
  ssh_all "${WORKER:-0}" "tail -n 200 -F ~/unclip_jax_train.log"
}

cmd_ssh() {
  if [[ -n "$SSH_COMMAND" ]]; then
    ssh_all "${WORKER:-all}" "$SSH_COMMAND"
  else
    [[ "${WORKER:-0}" != all ]] || die "an interactive shell needs one --worker N (or give --command)"
    run "${TPU_VM[@]}" ssh "$NAME" "${LOC[@]}" "--worker=${WORKER:-0}"
  fi
}

cmd_status() {
  if (( QUEUED )); then
    run "${QR[@]}" describe "$NAME" "${LOC[@]}"
  else
    run "${TPU_VM[@]}" describe "$NAME" "${LOC[@]}"
  fi
}

cmd_delete() {
  local extra=()
  (( YES )) && extra+=(--quiet)
  if (( QUEUED )); then
    # --force also deletes the TPU the queued resource provisioned.
    run "${QR[@]}" delete "$NAME" "${LOC[@]}" --force "${extra[@]}"
  else
    run "${TPU_VM[@]}" delete "$NAME" "${LOC[@]}" "${extra[@]}"
  fi
}

if (( ! DRY_RUN )) && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
fi
"cmd_$CMD"
