#!/usr/bin/env bash
# A monoformer_jax job on a SLURM GPU cluster: one JAX process per GPU.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh --config=configs/imagenet256.py \
#       --workdir=/shared/runs/mf256 --config.data.dir=/shared/prepared/monoformer_imagenet/1.0.0
#
# Submit from the checkout (it is SLURM_SUBMIT_DIR, where this finds the
# code and its .venv); the checkout, the data and the workdir must be on a
# filesystem every node sees (or the data and workdir in gs://). Settings,
# in the environment of `sbatch` (SLURM passes it on):
#   MODULE=train       or prepare, evaluate, sample, compile, convert:
#                      `python -m monoformer_jax.MODULE ARGS` on every task
#   VENV=DIR           the virtual environment to activate (default the
#                      checkout's .venv); CONDA_ENV=NAME activates a conda one
#   PER_NODE=1         one process per node driving all its GPUs, with all of
#                      the node's CPUs (for the input pipeline), instead of one per GPU
#   LOG_DIR=DIR        the tasks' logs (default WORKDIR/logs for a local
#                      --workdir, else SUBMIT_DIR/slurm_logs/JOBID), on the
#                      shared filesystem: task_T.log per task, appended to
#                      across requeues, and task_T.exit, its exit status
#   MAX_REQUEUES=5     how many times a preempted run is requeued
#   GPU_XLA_FLAGS=...  replaces the XLA flags below; XLA_FLAGS adds to them
#
# Training gets --config.mesh.dcn_data=-1 unless ARGS set it: JAX gives each
# node's GPUs one slice_index, so the data axis spans the nodes and FSDP (and
# tensor) stay inside each node on NVLink (monoformer_jax/parallel/sharding.py).
#
# Preemption: SLURM's --signal=TERM@120 (below) or `scancel --signal=TERM JOB`
# reaches every task; they agree on one step, save it and exit 75. This script
# then requeues the job (`scontrol requeue`, allowed by --requeue), which starts
# again with the same arguments and resumes from that checkpoint; exit 2 (a
# config error, a diverged run) is never requeued. launch/README.md has the
# whole journey and why each flag below is set.
#SBATCH --job-name=monoformer
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

fail() { echo "error: $*" >&2; exit 2; }
# SLURM runs a copy of this script: common.sh is the submitted checkout's.
REPO=${SLURM_SUBMIT_DIR:-$PWD}
source "$REPO/launch/common.sh" 2> /dev/null ||
  fail "no launch/common.sh in $REPO: sbatch from the checkout's folder"

MODULE=${MODULE:-train}
module=$(module_of "$MODULE") || fail "MODULE=$MODULE is not one of $MODULES"
[[ -n ${SLURM_JOB_ID:-} ]] || fail "not inside a SLURM job: submit it with sbatch $0 ARGS"
MAX_REQUEUES=${MAX_REQUEUES:-5}
[[ $MAX_REQUEUES =~ ^[0-9]+$ ]] || fail "MAX_REQUEUES=$MAX_REQUEUES must be a number >= 0"
PER_NODE=${PER_NODE:-0}
[[ $PER_NODE == [01] ]] || fail "PER_NODE=$PER_NODE must be 1 (one process per node) or 0"

# --- the tasks
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
srun_flags=(--kill-on-bad-exit=1)
if (( PER_NODE )); then
  gpus=${SLURM_GPUS_ON_NODE:-8}
  # JAX's SLURM detection would give each process the GPU of its local rank
  # only; one process per node takes them all.
  export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
  srun_flags+=(--ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}")
  tasks=$nodes
else
  tasks=${SLURM_NTASKS:-1}
  # JAX gives task L of a node the node's GPU L: more tasks than GPUs would
  # leave tasks without a GPU, fewer would leave GPUs idle.
  per_node=${SLURM_NTASKS_PER_NODE:-} gpus=${SLURM_GPUS_ON_NODE:-}
  if [[ -n $per_node && -n $gpus && $per_node != "$gpus" ]]; then
    fail "$per_node tasks per node but $gpus GPUs per node: one task per GPU" \
      "(sbatch --ntasks-per-node=$gpus), or PER_NODE=1 for one process per node"
  fi
fi
# --- the environment
if [[ -n ${CONDA_ENV:-} ]]; then
  command -v conda > /dev/null || fail "CONDA_ENV=$CONDA_ENV but conda is not on PATH"
  # shellcheck disable=SC1091
  source "$(conda info --base)/etc/profile.d/conda.sh"
  conda activate "$CONDA_ENV"
else
  VENV=${VENV:-$REPO/.venv}
  [[ -f $VENV/bin/activate ]] || fail "no virtual environment at VENV=$VENV: make it with" \
    "python3.11 -m venv $VENV && $VENV/bin/pip install -e '$REPO[cuda]' (or set VENV= or CONDA_ENV=)"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
cd "$REPO"

# --- XLA and NCCL (launch/README.md says why each is set)
DEFAULT_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_enable_triton_gemm=false
  --xla_disable_hlo_passes=rematerialization"
# The user's XLA_FLAGS come last: XLA takes a flag's last value.
export XLA_FLAGS="$(tr -s ' \n' '  ' <<< "${GPU_XLA_FLAGS-$DEFAULT_GPU_XLA_FLAGS}")${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

extra=()
if [[ $MODULE == train && " $* " != *" --config.mesh.dcn_data"* ]]; then
  extra+=(--config.mesh.dcn_data=-1)
fi

workdir=$(local_workdir "$@")
LOG_DIR=${LOG_DIR:-${workdir:+$workdir/logs}}
LOG_DIR=${LOG_DIR:-$REPO/slurm_logs/$SLURM_JOB_ID}
mkdir -p "$LOG_DIR"
restarts=${SLURM_RESTART_COUNT:-0}
started="=== job $SLURM_JOB_ID start $((restarts + 1)) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
for (( t = 0; t < tasks; t++ )); do echo "$started" >> "$LOG_DIR/task_$t.log"; done
srun_flags+=(--output="$LOG_DIR/task_%t.log" --open-mode=append)

echo "$started: $nodes node(s), $tasks task(s), $(command -v python)"
python -c 'import sys, importlib.metadata as m
print("python", sys.version.split()[0], *(f"{p} {m.version(p)}" for p in ("jax", "jaxlib")))'
echo "XLA_FLAGS=$XLA_FLAGS"
echo "logs: $LOG_DIR/task_T.log"
# Each task leaves its exit status in LOG_DIR/task_T.exit, and exits 0 for a
# preemption (75): srun's --kill-on-bad-exit (a failed task stops the others
# instead of leaving them waiting in a collective) would otherwise kill the
# tasks still finishing their save, and srun's own status could not tell.
rm -f "$LOG_DIR"/task_*.exit
task='"$@"; code=$?; echo $code > "$LOG_DIR/task_$SLURM_PROCID.exit"; exit $(( code == 75 ? 0 : code ))'
export LOG_DIR
echo "+ srun ${srun_flags[*]} python -m $module $* ${extra[*]-}"
set +e
# ${extra[@]+...}: an empty array is "unbound" to bash < 4.4 under set -u.
srun "${srun_flags[@]}" bash -c "$task" task python -m "$module" "$@" ${extra[@]+"${extra[@]}"}
status=$?
set -e
codes=$(cat "$LOG_DIR"/task_*.exit 2> /dev/null | sort -n | uniq | tr '\n' ' ')
echo "srun exited with status $status; the tasks' statuses: ${codes:-none}"
if [[ " $codes " == *" 2 "* ]]; then
  echo "exit 2 (a config error or a diverged run): not requeued; the tasks' logs say why"
  exit 2
fi
if [[ " $codes " == *" 75 "* ]] && (( status == 0 )); then
  if (( restarts >= MAX_REQUEUES )); then
    echo "preempted (exit 75) after $restarts requeue(s), MAX_REQUEUES=$MAX_REQUEUES:" \
      "not requeued; sbatch the same command again to resume"
    exit 75
  fi
  echo "preempted (exit 75): requeue $((restarts + 1)) of $MAX_REQUEUES;" \
    "the job starts again and resumes from its last checkpoint"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "scontrol requeue failed: sbatch the same command again to resume"
  exit 75
fi
exit $status
