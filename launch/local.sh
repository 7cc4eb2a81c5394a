#!/usr/bin/env bash
# N processes on this machine as one multi-host JAX run: the way to try (and
# test) what a pod does, without a pod.
#
#   launch/local.sh 2 -- python -m monoformer_jax.train \
#       --config=configs/digits.py:tiny --workdir=/tmp/two_hosts
#
# Each process gets DEVICES/N CPU devices (DEVICES=8 by default) and the
# coordinator's address in JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
# JAX_PROCESS_ID, which monoformer_jax/parallel/distributed.py passes to
# jax.distributed.initialize(). Process i logs to $LOG_DIR/process_i.log,
# appended to, each launch headed by its date; LOG_DIR is by default the
# run's: WORKDIR/logs for a command with a local --workdir, else a new folder
# under ${TMPDIR:-/tmp}/monoformer_logs. Process 0's log is also shown here. Ctrl-C (or a
# SIGTERM to this script) is passed on to every process as SIGTERM: they agree
# on a step, save it and exit with status 75 (resumable), as a preempted pod
# does. The exit status is the first non-zero status of a process, else 0.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { echo "usage: $0 N -- COMMAND [ARGS...]" >&2; exit 2; }
[[ $# -ge 3 && $1 =~ ^[1-9][0-9]*$ && $2 == "--" ]] || usage
N=$1; shift 2
DEVICES=${DEVICES:-8}
(( DEVICES % N == 0 )) || { echo "DEVICES=$DEVICES is not divisible by N=$N" >&2; exit 2; }
PER=$(( DEVICES / N ))
workdir=$(local_workdir "$@")
LOG_DIR=${LOG_DIR:-${workdir:+$workdir/logs}}
LOG_DIR=${LOG_DIR:-${TMPDIR:-/tmp}/monoformer_logs/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$LOG_DIR"
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
# This script's device count replaces any in XLA_FLAGS (other flags are kept).
XLA_REST=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')

echo "launching $N processes of $PER CPU devices, coordinator localhost:$PORT, logs in $LOG_DIR/"
echo "command: $*"
shown_from=$(( $(stat -c %s "$LOG_DIR/process_0.log" 2>/dev/null || echo 0) + 1 ))
pids=()
for (( i = 0; i < N; i++ )); do
  echo "=== launched $(date -u +%Y-%m-%dT%H:%M:%SZ): $*" >> "$LOG_DIR/process_$i.log"
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="$XLA_REST --xla_force_host_platform_device_count=$PER" \
  JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    "$@" >> "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
  echo "process $i: pid ${pids[$i]}, log $LOG_DIR/process_$i.log"
done

forward() { echo "passing SIGTERM to every process" >&2; kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward INT TERM
tail -c "+$shown_from" -f "$LOG_DIR/process_0.log" --pid="${pids[0]}" &  # this launch's lines
tailer=$!

status=0
for (( i = 0; i < N; i++ )); do
  status_of "${pids[$i]}"
  echo "process $i exited with status $code"
  (( status == 0 && code != 0 )) && status=$code
done
wait "$tailer" 2>/dev/null || true
exit $status
