#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (or several slices): the same command on
# every worker, one JAX process per worker.
#
#   TPU=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config=configs/imagenet256.py --workdir=gs://bucket/runs/mf256 \
#       --config.data.dir=/data/prepared/monoformer_imagenet/1.0.0
#
# Prepared data in a bucket: DATA_BUCKET=my-bucket mounts it with gcsfuse at
# /data on every worker (read-only, as MaxText does), so that
# --config.data.dir=/data/prepared/monoformer_imagenet/1.0.0 reads
# gs://my-bucket/prepared/monoformer_imagenet/1.0.0 in place. Without a mount,
# data.dir=gs://... also works: each host then copies the dataset to its local
# disk once (array_record opens local files only; docs/data.md).
#
# What it does, printed before it does it:
#   1. copies this checkout to every worker (git archive of HEAD, so what runs
#      is a commit you can name; REPO_URL=... clones that instead),
#   2. installs it there with pip (the `tpu` extra brings the libtpu that
#      matches jax),
#   3. runs `python -m monoformer_jax.train --jax_distributed ARGS` on all
#      workers at once; JAX finds the other workers from the TPU VM's metadata.
#      Each worker's log goes to ~/monoformer_jax/train.log on it and is
#      streamed here prefixed with its worker number by gcloud.
#
# Multi-slice: create the slices as one queued resource (or one per slice
# with SLICES=N, TPU=name-prefix: name-0, name-1, ...) and set the mesh's DCN
# axis, e.g. --config.mesh.dcn_data=2: 'data' then spans the slices over DCN
# and fsdp/tensor stay inside a slice (parallel/sharding.py builds it with
# mesh_utils.create_hybrid_device_mesh).
#
# Preemption: a SIGTERM to any worker (a maintenance event, or `gcloud ...
# ssh --command="pkill -TERM -f monoformer_jax.train"`) makes every worker
# save the same step and exit; the same command resumes it.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name (or the name prefix with SLICES>1)}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
SLICES=${SLICES:-1}
REMOTE_DIR=${REMOTE_DIR:-monoformer_jax}
PYTHON=${PYTHON:-python3}
[[ $# -ge 1 ]] || { echo "usage: TPU=... ZONE=... $0 TRAIN_ARGS..." >&2; exit 2; }

names=()
if (( SLICES == 1 )); then names=("$TPU"); else
  for (( s = 0; s < SLICES; s++ )); do names+=("$TPU-$s"); done
fi

ssh_all() {   # ssh_all NAME COMMAND: COMMAND on every worker of TPU VM NAME
  echo "+ gcloud compute tpus tpu-vm ssh $1 --zone=$ZONE --worker=all --command=$2" >&2
  gcloud compute tpus tpu-vm ssh "$1" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$2"
}

if [[ -n "${REPO_URL:-}" ]]; then
  fetch="rm -rf $REMOTE_DIR && git clone --depth 1 ${REPO_REF:+--branch $REPO_REF} $REPO_URL $REMOTE_DIR"
  for name in "${names[@]}"; do ssh_all "$name" "$fetch"; done
else
  archive=$(mktemp --suffix=.tar.gz)
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  echo "copying $(git -C "$(dirname "$0")/.." rev-parse --short HEAD) to every worker"
  for name in "${names[@]}"; do
    echo "+ gcloud compute tpus tpu-vm scp $archive $name:code.tar.gz --worker=all" >&2
    gcloud compute tpus tpu-vm scp "$archive" "$name:code.tar.gz" --zone="$ZONE" \
        $PROJECT_FLAG --worker=all
    ssh_all "$name" "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf code.tar.gz -C $REMOTE_DIR"
  done
  rm -f "$archive"
fi

for name in "${names[@]}"; do
  ssh_all "$name" "cd $REMOTE_DIR && $PYTHON -m pip install -q -e '.[tpu]'"
done

if [[ -n "${DATA_BUCKET:-}" ]]; then   # gcsfuse (from Google's apt repository) at $DATA_MOUNT
  DATA_MOUNT=${DATA_MOUNT:-/data}
  mount="command -v gcsfuse >/dev/null || { \
export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s) && \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } && \
sudo mkdir -p $DATA_MOUNT && sudo chown \$USER $DATA_MOUNT && \
{ mountpoint -q $DATA_MOUNT || gcsfuse -o ro --implicit-dirs \
--file-cache-max-size-mb=-1 --cache-dir=/tmp/gcsfuse-cache $DATA_BUCKET $DATA_MOUNT; }"
  for name in "${names[@]}"; do ssh_all "$name" "$mount"; done
fi

# Quote the training arguments once, for the remote shell.
args=$(printf ' %q' "$@")
run="cd $REMOTE_DIR && $PYTHON -m monoformer_jax.train --jax_distributed$args 2>&1 | tee train.log"
pids=()
for name in "${names[@]}"; do
  ssh_all "$name" "$run" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
