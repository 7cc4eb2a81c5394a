#!/usr/bin/env bash
# A Cloud TPU VM pod slice (or several) from your machine, through gcloud:
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh setup
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh run train \
#       --config=configs/imagenet256.py --workdir=gs://my-bucket/runs/mf256 \
#       --config.data.dir=gs://my-bucket/prepared/monoformer_imagenet/1.0.0
#   TPU=... ZONE=... launch/tpu_pod.sh logs [WORKER] | status | stop
#
#   setup        copies this checkout at COMMIT (default HEAD; a `git archive`, so
#                what runs is a commit you can name) to ~/$REMOTE_DIR on every
#                worker, leaving files you put there; makes a Python 3.11+
#                environment there with uv (PyPI) and installs `.[tpu]` into
#                it; prints the versions. Run it again after a new commit.
#                DATA_BUCKET=b also mounts gs://b read-only at /data (gcsfuse).
#   run MODULE ARGS...
#                `python -m monoformer_jax.MODULE ARGS` on every worker at
#                once, MODULE one of train, prepare, evaluate, sample, compile,
#                convert. Detached: the run outlives this command and the SSH
#                connection; a run still going from before is stopped first
#                (SIGTERM by its pid). It is restarted after a preemption, up to
#                MAX_RESTARTS (3) times, RESTART_DELAY (10) s later, and not
#                after a config error or a divergence. Then follows worker 0's log (FOLLOW=0: don't);
#                Ctrl-C leaves the run going.
#   logs [W]     worker W's log (default 0; SLICE=s: of slice s), followed
#                while the run goes.
#   status       each worker's run: going (with its last line) or how it ended.
#   stop         SIGTERM on every worker: they save the same step and stop
#                (waits up to STOP_TIMEOUT, 900 s, for the save).
#
# Several slices (multi-slice over the data-center network): SLICES=N with
# TPU=prefix names the slices prefix-0 .. prefix-(N-1) (what a queued resource
# with --node-count=N creates); `run` gives each worker the MEGASCALE_*
# variables that join them (slice 0's first worker coordinates) and you set
# the mesh's DCN axis, e.g. --config.mesh.dcn_data=N.
#
# Each gcloud command is printed before it runs. launch/pod_worker.sh is what
# runs on the workers; launch/README.md has the whole journey.
set -euo pipefail

usage() {
  echo "usage: TPU=name ZONE=zone $0 setup | run MODULE [ARGS...] | logs [WORKER] | status | stop" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
: "${TPU:?set TPU to the TPU VM name (or the name prefix with SLICES>1)}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
SLICES=${SLICES:-1}
REMOTE_DIR=${REMOTE_DIR:-monoformer_jax}    # under the home folder on each worker
HERE=$(cd "$(dirname "$0")/.." && pwd)
source "$HERE/launch/common.sh"
gcloud_flags=(--zone="$ZONE")
[[ -z ${PROJECT:-} ]] || gcloud_flags+=(--project="$PROJECT")
[[ $SLICES =~ ^[1-9][0-9]*$ ]] || { echo "error: SLICES=$SLICES must be a positive number" >&2; exit 2; }
[[ ${MAX_RESTARTS:-3} =~ ^[0-9]+$ ]] || {
  echo "error: MAX_RESTARTS=$MAX_RESTARTS must be a whole number (0: never restart)" >&2; exit 2; }

names=()
if (( SLICES == 1 )); then names=("$TPU"); else
  for (( s = 0; s < SLICES; s++ )); do names+=("$TPU-$s"); done
fi

tpu_vm() {  # tpu_vm ARGS...: one gcloud TPU VM command, printed first
  echo "+ gcloud compute tpus tpu-vm $*" >&2
  gcloud compute tpus tpu-vm "$@" "${gcloud_flags[@]}"
}
on_workers() {  # on_workers NAME WORKER COMMAND
  tpu_vm ssh "$1" --worker="$2" --command="$3"
}
each_slice() {  # each_slice COMMAND: on every worker of every slice, slices in parallel
  local pids=() status=0 name
  for name in "${names[@]}"; do on_workers "$name" all "$1" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return $status
}
# pod_worker.sh on the workers; on one without it (no `setup` yet), one line saying so.
worker_script="bash $REMOTE_DIR/launch/pod_worker.sh"
guard="test -f $REMOTE_DIR/launch/pod_worker.sh || { echo \"error: no ~/$REMOTE_DIR on \
\$(hostname): run launch/tpu_pod.sh setup first\" >&2; exit 2; }; "

case $1 in
  setup)
    [[ $# -eq 1 ]] || usage
    commit=$(git -C "$HERE" rev-parse --verify -q "${COMMIT:-HEAD}^{commit}") || {
      echo "error: COMMIT=${COMMIT:-HEAD} is not a commit of $HERE (a hash, branch or tag)" >&2
      exit 2; }
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    git -C "$HERE" archive --format=tar.gz -o "$archive" "$commit"
    echo "setting up commit ${commit:0:12} on ${names[*]}, in ~/$REMOTE_DIR"
    git -C "$HERE" diff --quiet HEAD 2>/dev/null ||
      echo "note: this checkout has uncommitted changes; they are not copied (commit them first)"
    for name in "${names[@]}"; do tpu_vm scp "$archive" "$name:monoformer_jax_code.tar.gz" --worker=all; done
    # pod_worker.sh comes out of the archive first: it does the rest.
    each_slice "mkdir -p $REMOTE_DIR/.launch && tar xzf monoformer_jax_code.tar.gz -O \
launch/pod_worker.sh > $REMOTE_DIR/.launch/pod_worker.sh && \
EXTRA=${EXTRA:-tpu} bash $REMOTE_DIR/.launch/pod_worker.sh setup monoformer_jax_code.tar.gz $commit"
    if [[ -n ${DATA_BUCKET:-} ]]; then   # gcsfuse (Google's apt repository) at $DATA_MOUNT
      DATA_MOUNT=${DATA_MOUNT:-/data}
      each_slice "command -v gcsfuse >/dev/null || { \
export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s) && \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } && \
sudo mkdir -p $DATA_MOUNT && sudo chown \$USER $DATA_MOUNT && \
{ mountpoint -q $DATA_MOUNT || gcsfuse -o ro --implicit-dirs \
--file-cache-max-size-mb=-1 --cache-dir=/tmp/gcsfuse-cache $DATA_BUCKET $DATA_MOUNT; }"
    fi
    ;;
  run)
    [[ $# -ge 2 ]] || usage
    shift
    module_of "$1" > /dev/null ||
      { echo "error: MODULE '$1' is not one of $MODULES (the ARGS follow it)" >&2; exit 2; }
    args=$(printf ' %q' "$@")
    settings="MAX_RESTARTS=${MAX_RESTARTS:-3} COORDINATOR_PORT=${COORDINATOR_PORT:-8482}"
    settings+="${RESTART_DELAY:+ RESTART_DELAY=$RESTART_DELAY}${DRY_RUN:+ DRY_RUN=1}"
    if (( SLICES > 1 )); then
      # Slice 0's first worker coordinates the slices (JAX's choice too).
      echo "+ gcloud compute tpus tpu-vm describe ${names[0]}" >&2
      coordinator=$(gcloud compute tpus tpu-vm describe "${names[0]}" "${gcloud_flags[@]}" \
        --format='value(networkEndpoints[0].ipAddress)')
      [[ -n $coordinator ]] || { echo "error: no address for ${names[0]}'s worker 0" >&2; exit 1; }
    fi
    pids=() status=0
    for (( s = 0; s < SLICES; s++ )); do
      slice_settings=$settings
      if (( SLICES > 1 )); then
        port=${MEGASCALE_PORT:-8080}
        slice_settings+=" MEGASCALE_COORDINATOR_ADDRESS=$coordinator:$port"
        slice_settings+=" MEGASCALE_NUM_SLICES=$SLICES MEGASCALE_SLICE_ID=$s MEGASCALE_PORT=$port"
      fi
      on_workers "${names[$s]}" all "$guard$slice_settings $worker_script start$args" & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    (( status == 0 )) || exit $status
    [[ -z ${DRY_RUN:-} && ${FOLLOW:-1} != 0 ]] || exit 0
    echo "following worker 0's log (Ctrl-C leaves the run going; \`$0 logs\` comes back to it)"
    on_workers "${names[0]}" 0 "$guard$worker_script logs"
    ;;
  logs)
    [[ $# -le 2 ]] || usage
    worker=${2:-0}
    [[ $worker =~ ^[0-9]+$ ]] || { echo "error: WORKER '$worker' must be a number" >&2; exit 2; }
    [[ ${SLICE:-0} =~ ^[0-9]+$ && ${SLICE:-0} -lt $SLICES ]] || {
      echo "error: SLICE=$SLICE is not one of the $SLICES slice(s) 0..$(( SLICES - 1 ))" >&2; exit 2; }
    # W numbers the workers of one slice; with SLICES>1, SLICE=s picks the slice (0).
    on_workers "${names[${SLICE:-0}]}" "$worker" "${guard}TAIL_LINES=${TAIL_LINES:-100} $worker_script logs"
    ;;
  status | stop)
    [[ $# -eq 1 ]] || usage
    each_slice "$guard${STOP_TIMEOUT:+STOP_TIMEOUT=$STOP_TIMEOUT }$worker_script $1"
    ;;
  *) usage ;;
esac
