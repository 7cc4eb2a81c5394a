#!/usr/bin/env bash
# What launch/tpu_pod.sh runs on every worker of a TPU VM slice (through
# `gcloud compute tpus tpu-vm ssh --worker=all`). It lives in the project's
# folder on the worker (DIR, ~/monoformer_jax by default) and keeps its own
# files in DIR/.launch; a run's log is DIR/logs/worker_<process>.log.
#
#   pod_worker.sh setup ARCHIVE COMMIT   unpack the project, make the environment
#   pod_worker.sh start MODULE ARGS...   stop a stale run, start a supervised one
#   pod_worker.sh stop | status | logs   the run on this worker
#
# A run is supervised: `python -m monoformer_jax.MODULE ARGS` is restarted, up
# to MAX_RESTARTS times, when it ends with status 75 (a preemption stopped it
# after saving: rerunning resumes) or is killed by a signal; never when it
# finished (0), met a bad config or diverged (2) or failed otherwise (a crash
# would repeat). The supervisor runs in its own session, so a dropped SSH
# connection does not reach it. `stop` sends SIGTERM (the agreed preemption
# save) and the supervisor does not restart what `stop` stopped.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)   # the project on this worker
STATE=$HERE/.launch
VENV=${VENV:-$HERE/.venv}
LOG_DIR=${LOG_DIR:-$HERE/logs}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART_DELAY=${RESTART_DELAY:-10}    # seconds before a restart (the other hosts stop too)
STOP_TIMEOUT=${STOP_TIMEOUT:-900}     # seconds `stop` waits for the save
COORDINATOR_PORT=${COORDINATOR_PORT:-8482}  # jax.distributed's (JAX's own default on TPU)
RESUMABLE=75                           # monoformer_jax.parallel.distributed.RESUMABLE
mkdir -p "$STATE"
# Not there yet for the first `setup` (run from .launch/), which needs none of it.
if [[ -f $HERE/launch/common.sh ]]; then source "$HERE/launch/common.sh"; fi

# "process P of N" once a run has started here (start), else the host's name.
say() { echo "${WORKER_NAME:-$(cat "$STATE/process" 2>/dev/null || hostname)}: $*"; }
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# ------------------------------------------------------------ this worker
metadata() {  # metadata KEY: the TPU VM's metadata server, as JAX reads it
  curl -sSf -m 10 -H "Metadata-Flavor: Google" \
    "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/$1"
}

resolve_processes() {
  # One JAX process per worker; slices stack: process = slice * workers + worker.
  # The worker number and the slice's hosts come from the environment when it
  # has them (GKE sets TPU_WORKER_ID and TPU_WORKER_HOSTNAMES), else from the
  # metadata server (a TPU VM). MEGASCALE_* are set by tpu_pod.sh for several
  # slices; the coordinator is slice 0's first worker, as JAX's own TPU cluster
  # chooses it. Exported for jax.distributed (monoformer_jax/parallel/distributed.py).
  local worker hosts endpoints first n slices slice
  worker=${TPU_WORKER_ID:-$(metadata agent-worker-number)}
  if [[ -n ${TPU_WORKER_HOSTNAMES:-} ]]; then
    hosts=$TPU_WORKER_HOSTNAMES
  else  # "host,host,..." or "name:number:ip,..." (the older format)
    endpoints=$(metadata worker-network-endpoints)
    hosts=$(tr ',' '\n' <<< "$endpoints" | awk -F: '{print $NF}' | paste -sd, -)
  fi
  n=$(tr ',' '\n' <<< "$hosts" | grep -c .)
  slices=${MEGASCALE_NUM_SLICES:-1}
  slice=${MEGASCALE_SLICE_ID:-0}
  if [[ -n ${MEGASCALE_COORDINATOR_ADDRESS:-} ]]; then
    first=${MEGASCALE_COORDINATOR_ADDRESS%:*}
  else
    first=${hosts%%,*}
  fi
  [[ $worker =~ ^[0-9]+$ && $worker -lt $n ]] || {
    echo "error: worker number '$worker' is not one of the $n hosts '$hosts'" >&2; exit 2; }
  export JAX_COORDINATOR_ADDRESS=$first:$COORDINATOR_PORT
  export JAX_NUM_PROCESSES=$(( n * slices ))
  export JAX_PROCESS_ID=$(( slice * n + worker ))
  WORKER_NAME="process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES"
}

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pid_of() { cat "$STATE/$1.pid" 2>/dev/null || true; }
ours() {  # whether PID is still one of this project's processes (not a reused PID)
  tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qE "pod_worker\.sh|monoformer_jax\."
}

# ------------------------------------------------------------ setup
setup() {
  local archive=$1 commit=$2 new old uv python
  [[ -f $archive ]] || { echo "error: no archive $archive on this worker" >&2; exit 2; }
  if alive "$(pid_of supervisor)" && ours "$(pid_of supervisor)"; then
    echo "error: a run is going on this worker (pid $(pid_of supervisor)); stop it first" \
      "(launch/tpu_pod.sh stop), then set up" >&2
    exit 2
  fi
  # The tracked files of COMMIT replace the previous commit's; files a user put
  # in the folder (a tokenizer, data, logs) are left alone.
  new=$(tar tzf "$archive" | grep -v '/$' | sort)
  old=$(sort "$STATE/files.txt" 2>/dev/null || true)
  tar xzf "$archive" -C "$HERE"
  comm -23 <(echo "$old") <(echo "$new") | while read -r gone; do
    if [[ -n $gone ]]; then rm -f "$HERE/$gone"; fi
  done
  echo "$new" > "$STATE/files.txt"
  echo "$commit" > "$STATE/commit"
  rm -f "$archive"

  # uv (PyPI) brings a Python 3.11+ the VM image may lack (Ubuntu 22.04 has 3.10).
  uv=$(command -v uv || true)
  [[ -n $uv ]] || uv=$HOME/.local/bin/uv
  if [[ ! -x $uv ]]; then
    say "installing uv"
    python3 -m pip install --user --quiet uv
  fi
  python=$VENV/bin/python
  if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    "$uv" venv --quiet --clear --python "${PYTHON_VERSION:-3.11}" "$VENV"
  fi
  "$uv" pip install --quiet --python "$python" -e "$HERE[${EXTRA:-tpu}]"
  say "$("$python" - <<'PY'
import importlib.metadata as m
import platform

def version(name):
  try:
    return m.version(name)
  except m.PackageNotFoundError:
    return "-"

print(f"Python {platform.python_version()}, jax {version('jax')}, jaxlib {version('jaxlib')},"
      f" libtpu {version('libtpu')},", end="")
PY
) commit $commit in $HERE"
}

# ------------------------------------------------------------ a run
stop_run() {  # the run on this worker, if any: SIGTERM, then wait for it
  local supervisor child waited=0
  supervisor=$(pid_of supervisor); child=$(pid_of child)
  alive "$supervisor" && ours "$supervisor" || supervisor=""
  alive "$child" && ours "$child" || child=""
  if [[ -z $supervisor && -z $child ]]; then return 1; fi
  touch "$STATE/stop"   # the supervisor does not restart what is stopped
  if [[ -n $child ]]; then kill -TERM "$child" 2>/dev/null || true; fi
  while alive "$supervisor" || alive "$child"; do
    if (( waited >= STOP_TIMEOUT )); then
      say "still running after ${STOP_TIMEOUT} s; killing pids $supervisor $child"
      kill -KILL $supervisor $child 2>/dev/null || true
      break
    fi
    sleep 1; waited=$(( waited + 1 ))
  done
  return 0
}

start() {
  local name=$1 module; shift
  module=$(module_of "$name") ||
    { echo "error: unknown module '$name'; one of $MODULES" >&2; exit 2; }
  resolve_processes
  local log=$LOG_DIR/worker_$JAX_PROCESS_ID.log
  if [[ -n ${DRY_RUN:-} ]]; then
    say "would run $VENV/bin/python -m $module $* (log $log) with" \
      "$(env | grep -E '^(JAX_COORDINATOR_ADDRESS|JAX_NUM_PROCESSES|JAX_PROCESS_ID|MEGASCALE_[A-Z_]+)=' \
         | sort | paste -sd' ' -)"
    return 0
  fi
  [[ -x $VENV/bin/python ]] || { echo "error: no environment in $VENV: run" \
    "\`launch/tpu_pod.sh setup\` first" >&2; exit 2; }
  if stop_run; then say "stopped the run that was still going (its pids from $STATE)"; fi
  rm -f "$STATE/stop" "$STATE/exit"
  mkdir -p "$LOG_DIR"
  echo "$log" > "$STATE/log"
  echo "$WORKER_NAME" > "$STATE/process"
  {
    echo "=== launched $(now) at commit $(cat "$STATE/commit" 2>/dev/null || echo '?'):" \
      "python -m $module $*"
    echo "=== process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES, coordinator" \
      "$JAX_COORDINATOR_ADDRESS${MEGASCALE_NUM_SLICES:+, slice $MEGASCALE_SLICE_ID of $MEGASCALE_NUM_SLICES (MEGASCALE_COORDINATOR_ADDRESS=$MEGASCALE_COORDINATOR_ADDRESS)}," \
      "up to $MAX_RESTARTS restarts"
  } >> "$log"
  # setsid: its own session, out of reach of the SSH connection's hangup.
  setsid nohup bash "${BASH_SOURCE[0]}" supervise "$module" "$@" >> "$log" 2>&1 < /dev/null &
  echo $! > "$STATE/supervisor.pid"  # setsid and nohup exec: the supervisor's own pid
  say "started python -m $module (supervisor pid $!), log $log"
}

supervise() {
  local module=$1; shift
  local restarts=0 code child
  echo $$ > "$STATE/supervisor.pid"
  cd "$HERE"
  stopping() { [[ -f $STATE/stop ]]; }
  trap 'touch "$STATE/stop"; alive "$child" && kill -TERM "$child" 2>/dev/null' TERM INT
  while true; do
    echo "running $module$( (( restarts )) && echo " (restart $restarts of $MAX_RESTARTS)")"
    "$VENV/bin/python" -m "$module" "$@" &
    child=$!
    echo "$child" > "$STATE/child.pid"
    status_of "$child"
    rm -f "$STATE/child.pid"
    local why
    if (( code == 0 )); then why="finished"
    elif (( code == RESUMABLE )); then why="preempted after saving (exit $code)"
    elif (( code > 128 )); then why="killed by signal $(( code - 128 ))"
    elif (( code == 2 )); then why="a config error or a diverged run (exit 2)"
    else why="failed (exit $code)"; fi
    if (( code == 0 )); then
      echo "=== $(now) $why"
    elif (( code != RESUMABLE && code <= 128 )); then
      echo "=== $(now) $why: not restarted (a rerun would repeat it)"
    elif stopping; then
      echo "=== $(now) $why: stopped on request, not restarted"
    elif (( restarts >= MAX_RESTARTS )); then
      echo "=== $(now) $why: not restarted, all $MAX_RESTARTS restarts used"
    else
      restarts=$(( restarts + 1 ))
      echo "=== $(now) $why: restart $restarts of $MAX_RESTARTS in $RESTART_DELAY s"
      sleep "$RESTART_DELAY"
      stopping || continue
      echo "=== $(now) stopped on request, not restarted"
    fi
    echo "$code $(now): $why, $restarts restart(s)" > "$STATE/exit"
    rm -f "$STATE/supervisor.pid"
    exit "$code"
  done
}

status() {
  local supervisor child log
  supervisor=$(pid_of supervisor); child=$(pid_of child)
  log=$(cat "$STATE/log" 2>/dev/null || true)
  if alive "$supervisor" && ours "$supervisor"; then
    say "running (supervisor pid $supervisor, python pid ${child:-restarting})," \
      "log $log; last line: $(tail -n 1 "$log" 2>/dev/null)"
  elif [[ -f $STATE/exit ]]; then
    say "ended at $(cut -d' ' -f2- "$STATE/exit"), log $log"
  else
    say "no run here"
  fi
}

logs() {
  local log supervisor
  log=$(cat "$STATE/log" 2>/dev/null || true)
  [[ -n $log && -f $log ]] || { echo "no run has logged on this worker yet" >&2; exit 1; }
  supervisor=$(pid_of supervisor)
  if alive "$supervisor" && ours "$supervisor"; then  # follow it until the run ends
    tail -n "${TAIL_LINES:-100}" -f --pid="$supervisor" "$log"
  else
    tail -n "${TAIL_LINES:-100}" "$log"
  fi
}

command=${1:-}
shift || true
case $command in
  setup) [[ $# -eq 2 ]] || { echo "usage: $0 setup ARCHIVE COMMIT" >&2; exit 2; }; setup "$@" ;;
  start) [[ $# -ge 1 ]] || { echo "usage: $0 start MODULE [ARGS...]" >&2; exit 2; }; start "$@" ;;
  supervise) supervise "$@" ;;
  stop)
    if stop_run; then say "stopped: $(cut -d' ' -f2- "$STATE/exit" 2>/dev/null || echo '?')"
    else say "no run to stop"; fi ;;
  status) status ;;
  logs) logs ;;
  *) echo "usage: $0 setup|start|stop|status|logs ..." >&2; exit 2 ;;
esac
