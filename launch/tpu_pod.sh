#!/usr/bin/env bash
# Train bat_jax on a Cloud TPU VM pod slice (several hosts, e.g. v4-32 = 4 hosts).
#
# Usage: launch/tpu_pod.sh COMMAND
#
# Commands (run them from your workstation, in the repository root):
#   create   create the TPU VM slice
#   setup    copy this checkout to every worker and install bat_jax + jax[tpu]
#   sync     copy this checkout to every worker again (after code changes)
#   train    start the same training command on every worker, in the background
#   status   the slice's state and the last lines of every worker's log
#   stop     send SIGTERM to the trainer on every worker (it checkpoints, then exits)
#   delete   delete the TPU VM slice
#
# Settings (environment variables, defaults in brackets):
#   TPU_NAME         slice name [bat-jax]
#   ZONE             zone [us-central2-b]
#   PROJECT          GCP project; empty = gcloud's configured default []
#   ACCELERATOR      accelerator type [v4-32]
#   RUNTIME_VERSION  TPU VM software version [tpu-ubuntu2204-base]
#   SPOT             1 = create a Spot (preemptible) slice [0]
#   CREATE_FLAGS     extra flags for `tpu-vm create` (e.g. "--network=my-net") []
#   REPO_URL         if set, `setup`/`sync` git-clone this URL on the workers
#                    instead of copying the local checkout []
#   REPO_REF         branch/tag/commit to check out with REPO_URL []
#   PYTHON_VERSION   Python for the workers' virtualenv [3.11] (jax 0.10 needs >= 3.11)
#   CONFIG           config file (with its :args) [configs/cifar10.py]
#   WORKDIR          REQUIRED for train: a directory every worker sees (see below)
#   EXTRA_ARGS       more trainer flags, e.g. "--config.data_dir=/mnt/shared/tfds" []
#   LOG_LINES        lines of each log that `status` shows [20]
#
# WORKDIR must be the same shared storage on every worker: checkpoints are
# written by all hosts together and resumed from there. A Cloud Storage URL
# (gs://bucket/runs/c10_bat: every file goes through bat_jax/fs.py, checkpoints
# through orbax) or an absolute path on a filesystem mounted at the same place
# on all workers (Filestore/NFS). See launch/README.md.
#
# Example:
#   export TPU_NAME=bat-v4 ZONE=us-central2-b ACCELERATOR=v4-32
#   launch/tpu_pod.sh create && launch/tpu_pod.sh setup
#   CONFIG=configs/cifar10.py WORKDIR=/mnt/shared/runs/c10_bat \
#     EXTRA_ARGS="--config.data_dir=/mnt/shared/tfds" launch/tpu_pod.sh train
#   launch/tpu_pod.sh status
#   launch/tpu_pod.sh delete
set -euo pipefail

TPU_NAME="${TPU_NAME:-bat-jax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
CREATE_FLAGS="${CREATE_FLAGS:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
CONFIG="${CONFIG:-configs/cifar10.py}"
WORKDIR="${WORKDIR:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
LOG_LINES="${LOG_LINES:-20}"

# Where things live on each worker, relative to the remote home directory
# (gcloud ssh commands start there). Every worker has its own disk.
REMOTE_DIR="bat_jax"           # the code
REMOTE_VENV="bat_jax_venv"     # the Python environment
REMOTE_LOGS="bat_jax_logs"     # one log (and pid file) per worker, named by hostname
COORDINATOR_PORT=8476          # JAX's usual port for the TPU coordinator

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

# Flags shared by every `gcloud compute tpus tpu-vm` call. No project id is
# hard-coded: PROJECT, when set, overrides gcloud's configured project.
gcloud_flags=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  gcloud_flags+=(--project="$PROJECT")
fi

# Runs a shell command on every worker of the slice at once.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=all \
    --command="$1"
}

cmd_create() {
  local extra=()
  if [[ "$SPOT" == "1" ]]; then
    extra+=(--spot)  # cheaper, but may be preempted: the trainer resumes from WORKDIR
  fi
  if [[ -n "$CREATE_FLAGS" ]]; then
    read -r -a more <<< "$CREATE_FLAGS"
    extra+=("${more[@]}")
  fi
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_flags[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" \
    "${extra[@]+"${extra[@]}"}"
}

# Puts the code on every worker: a git clone of REPO_URL, or a tarball of this
# checkout (so uncommitted changes are trained too).
cmd_sync() {
  if [[ -n "$REPO_URL" ]]; then
    local url ref
    url="$(printf '%q' "$REPO_URL")"
    ref="$(printf '%q' "$REPO_REF")"
    on_all_workers "set -e
      if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --quiet origin;
      else rm -rf $REMOTE_DIR; git clone --quiet $url $REMOTE_DIR; fi
      if [ -n $ref ]; then git -C $REMOTE_DIR checkout --quiet $ref; fi
      # On a branch, catch up with the remote; a tag or commit stays as it is.
      git -C $REMOTE_DIR merge --quiet --ff-only @{u} 2>/dev/null || true
      echo \"\$(hostname): $REMOTE_DIR at \$(git -C $REMOTE_DIR rev-parse --short HEAD)\""
    return
  fi
  local tmpdir tarball
  tmpdir="$(mktemp -d)"
  tarball="$tmpdir/bat_jax_src.tar.gz"
  # Leave out what is local to this machine: environments, runs, caches, git.
  tar -czf "$tarball" -C "$REPO_ROOT" \
    --exclude=.git --exclude=.venv --exclude=venv --exclude=runs \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:bat_jax_src.tar.gz" \
    "${gcloud_flags[@]}" --worker=all
  rm -rf "$tmpdir"
  on_all_workers "set -e; mkdir -p $REMOTE_DIR
    tar -xzf bat_jax_src.tar.gz -C $REMOTE_DIR && rm -f bat_jax_src.tar.gz
    echo \"\$(hostname): code in ~/$REMOTE_DIR\""
}

cmd_setup() {
  cmd_sync
  # jax 0.10 needs Python >= 3.11; the Ubuntu 22.04 TPU image ships 3.10, so
  # install python3.X from Ubuntu's archive if needed and use a virtualenv
  # (which also keeps the image's own packages out of the way).
  local py="python$PYTHON_VERSION"
  on_all_workers "set -e
    if ! command -v $py >/dev/null || ! $py -c 'import venv, ensurepip' 2>/dev/null; then
      sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv
    fi
    [ -x $REMOTE_VENV/bin/python ] || $py -m venv $REMOTE_VENV
    $REMOTE_VENV/bin/python -m pip install --quiet --upgrade pip
    $REMOTE_VENV/bin/python -m pip install --quiet -e ./$REMOTE_DIR 'jax[tpu]' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    # Only the version: touching the TPUs here would block while a trainer runs.
    echo \"\$(hostname): \$($REMOTE_VENV/bin/python -c 'import jax, bat_jax; print(\"jax\", jax.__version__)')\""
}

cmd_train() {
  if [[ -z "$WORKDIR" ]]; then
    echo "error: set WORKDIR to a directory shared by all workers (see launch/README.md)." >&2
    exit 2
  fi
  # A relative path would be each worker's own disk: demand a gs:// URL or a
  # mounted, absolute path.
  if [[ "$WORKDIR" != /* && "$WORKDIR" != gs://* ]]; then
    echo "error: WORKDIR=$WORKDIR must be a gs:// URL or an absolute path on a" \
      "filesystem mounted on every worker (NFS/Filestore), not a relative path." >&2
    exit 2
  fi
  # jax.distributed.initialize() runs when JAX_COORDINATOR_ADDRESS is set
  # (bat_jax.util.setup_runtime); on a TPU VM it then reads the number of hosts
  # and this host's index from the VM metadata. Worker 0 hosts the coordinator.
  local coordinator_ip
  coordinator_ip="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_flags[@]}" \
    --format='value(networkEndpoints[0].ipAddress)')"
  if [[ -z "$coordinator_ip" ]]; then
    echo "error: could not read worker 0's IP address of $TPU_NAME." >&2
    exit 1
  fi
  # Quote each value for the remote shell; EXTRA_ARGS is split into words there.
  local train_cmd
  train_cmd="\$HOME/$REMOTE_VENV/bin/python -m bat_jax.main --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR") $EXTRA_ARGS"
  echo "On every worker of $TPU_NAME: $train_cmd"
  # nohup + redirections + & : the trainer keeps running after ssh returns.
  # Logs are named by hostname so they stay apart even on a shared home.
  on_all_workers "set -e; mkdir -p $REMOTE_LOGS; h=\$(hostname)
    pidfile=\$HOME/$REMOTE_LOGS/train_\$h.pid; log=\$HOME/$REMOTE_LOGS/train_\$h.log
    if [ -f \$pidfile ] && kill -0 \$(cat \$pidfile) 2>/dev/null; then
      echo \"\$h: a trainer is already running (pid \$(cat \$pidfile)); run 'stop' first.\"; exit 1
    fi
    cd $REMOTE_DIR
    export JAX_COORDINATOR_ADDRESS=$coordinator_ip:$COORDINATOR_PORT
    nohup $train_cmd > \$log 2>&1 < /dev/null &
    echo \$! > \$pidfile
    echo \"\$h: started pid \$!, log \$log\""
}

cmd_status() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_flags[@]}" \
    --format='value(name.basename(), state, acceleratorType, health)'
  # Each line is prefixed with the worker's hostname: the workers answer in parallel.
  on_all_workers "h=\$(hostname); pidfile=$REMOTE_LOGS/train_\$h.pid; log=$REMOTE_LOGS/train_\$h.log
    { if [ -f \$pidfile ] && kill -0 \$(cat \$pidfile) 2>/dev/null; then echo 'trainer RUNNING';
      else echo 'trainer not running'; fi
      if [ -f \$log ]; then tail -n $LOG_LINES \$log; else echo 'no log yet'; fi
    } | sed \"s/^/[\$h] /\""
}

cmd_stop() {
  # SIGTERM, not SIGKILL: the trainer saves a checkpoint in WORKDIR and exits;
  # `train` later resumes from it.
  on_all_workers "h=\$(hostname); pidfile=$REMOTE_LOGS/train_\$h.pid
    if [ -f \$pidfile ] && kill -0 \$(cat \$pidfile) 2>/dev/null; then
      kill -TERM \$(cat \$pidfile) && echo \"\$h: sent SIGTERM to \$(cat \$pidfile)\"
    else echo \"\$h: no trainer running\"; fi"
}

cmd_delete() {
  # gcloud asks for confirmation; the checkpoints in WORKDIR are not touched.
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_flags[@]}"
}

case "${1:-}" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  sync) cmd_sync ;;
  train) cmd_train ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
