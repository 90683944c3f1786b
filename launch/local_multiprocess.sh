#!/usr/bin/env bash
# Runs the multi-host code path on one machine: N CPU processes that find each
# other through jax.distributed on 127.0.0.1, exactly as N hosts of a pod would
# (each process feeds its own share of the global batch, process 0 writes the
# metrics, all processes take part in every checkpoint).
#
# Usage:
#   launch/local_multiprocess.sh [TRAINER FLAGS...]
#   MODULE=bat_jax.evaluate launch/local_multiprocess.sh [EVALUATE FLAGS...]
#
# Example (2 processes, one CPU device each, a few seconds of training):
#   NUM_PROCESSES=2 launch/local_multiprocess.sh \
#       --config=configs/mnist.py:runlocal --config.dataset=mnist_subset \
#       --config.model=tiny_cnn --config.num_train_steps=4 --config.batch_size=32 \
#       --config.attack_steps=2 --config.num_eval_examples=64 \
#       --config.eval_batch_size=32 --workdir=/tmp/mh_run
#
# Settings (environment variables):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  CPU devices each process sees (default 1); >1 also
#                        exercises the pmap over several local devices
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   LOG_DIR              one log file per process (default /tmp/bat_jax_local_mp)
#   PYTHON               interpreter with bat_jax installed (default: python)
#   GRACE_SECONDS        after a failure or Ctrl-C, how long the processes get
#                        after SIGTERM before SIGKILL (default 60)
#   MODULE               the bat_jax program to run (default bat_jax.main;
#                        bat_jax.evaluate evaluates on every process)
#
# Every process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
# JAX_PROCESS_ID. jax.distributed.initialize() reads only the first of the
# three from the environment by itself (jax 0.10.2); bat_jax.util.setup_runtime
# must pass the other two (see launch/README.md).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  -h|--help|help) usage; exit 0 ;;
  "") usage >&2; echo "error: pass the program's flags (for training at least --config and --workdir)." >&2; exit 2 ;;
esac

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
LOG_DIR="${LOG_DIR:-/tmp/bat_jax_local_mp}"
PYTHON="${PYTHON:-python}"
GRACE_SECONDS="${GRACE_SECONDS:-60}"
MODULE="${MODULE:-bat_jax.main}"

if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers." >&2
  exit 2
fi

# A free port, unless one was given: a fixed default would collide with a
# second run (or a coordinator that has not shut down yet).
if [[ -z "${PORT:-}" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

mkdir -p "$LOG_DIR"
echo "Starting $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU device(s), coordinator 127.0.0.1:$PORT; logs in $LOG_DIR/process_<i>.log"

pids=()
# Stops only the processes this script started. SIGTERM first: it lets the
# trainer write a checkpoint before it exits (the path a preempted host takes).
# SIGKILL after GRACE_SECONDS: a process blocked in a collective whose peer has
# gone never gets back to look at its SIGTERM flag.
stop_all() {
  local pid alive deadline=$((SECONDS + GRACE_SECONDS))
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  while ((SECONDS < deadline)); do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    if ((alive == 0)); then return; fi
    sleep 1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "pid $pid still running ${GRACE_SECONDS}s after SIGTERM: sending SIGKILL." >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
trap 'echo "Interrupted: stopping the processes." >&2; stop_all; wait; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  # JAX_PLATFORMS=cpu: this is a test of the multi-process path, not of a GPU.
  # --xla_force_host_platform_device_count: several CPU "devices" per process.
  # Process 0 hosts the coordinator service on PORT; the others connect to it.
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" \
  JAX_NUM_PROCESSES="$NUM_PROCESSES" \
  JAX_PROCESS_ID="$i" \
    "$PYTHON" -m "$MODULE" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done

# Wait for every process. When one fails the others would block in a collective
# (or in distributed initialisation) until a timeout, so stop them at once.
status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  still=()
  for idx in "${!remaining[@]}"; do
    pid="${remaining[$idx]}"
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0)); then
      # Find which process index this pid was, for the message.
      for ((i = 0; i < NUM_PROCESSES; i++)); do
        if [[ "${pids[$i]}" == "$pid" ]]; then break; fi
      done
      echo "process $i (pid $pid) exited with status $rc; stopping the others." >&2
      if ((status == 0)); then status=$rc; fi
      stop_all
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if ((${#remaining[@]})); then sleep 1; fi
done

for ((i = 0; i < NUM_PROCESSES; i++)); do
  echo "===== process $i: last lines of $LOG_DIR/process_$i.log ====="
  tail -n 15 "$LOG_DIR/process_$i.log"
done
if ((status == 0)); then
  echo "All $NUM_PROCESSES processes finished."
elif ((status == 75)); then
  echo "Stopped early (status 75, progress saved): rerun the same command to resume."
else
  echo "FAILED (status $status); see the logs above." >&2
fi
exit "$status"
