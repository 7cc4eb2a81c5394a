#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one JAX process per GPU.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh \
#       --config=configs/imagenet256.py --workdir=/shared/runs/mf256 \
#       --config.data.dir=/shared/prepared/monoformer_imagenet/1.0.0
#
# srun starts one task per GPU; JAX reads the job's layout (SLURM_NTASKS,
# SLURM_PROCID, SLURM_LOCALID, the node list for the coordinator) and
# monoformer_jax/parallel/distributed.py calls jax.distributed.initialize()
# because SLURM_NTASKS > 1. Each task sees its node's GPUs and JAX gives it
# the one of its local rank. Logs: slurm-JOBID-TASK.out, one per task.
#
# For one process per node instead (each driving all the node's GPUs):
#   sbatch --nodes=4 --ntasks-per-node=1 launch/gpu_slurm.sh ...
# with PER_NODE=1, which sets JAX_LOCAL_DEVICE_IDS to all of the node's GPUs
# (JAX would otherwise give task 0 of each node GPU 0 only).
#
# Preemption: `scancel --signal=TERM JOBID` (or SLURM's --signal=TERM@120 before
# the time limit) reaches every task; they agree on one step, save it and exit
# 0. Requeue the job with the same arguments to resume.
#SBATCH --job-name=monoformer
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%j-%t.out
set -euo pipefail

PYTHON=${PYTHON:-python3}
echo "job ${SLURM_JOB_ID:-?}: ${SLURM_NNODES:-?} nodes, ${SLURM_NTASKS:-?} tasks"
echo "+ srun $PYTHON -m monoformer_jax.train $*"
# --kill-on-bad-exit: one task failing stops the others instead of leaving
# them waiting in a collective.
if [[ -n "${PER_NODE:-}" ]]; then
  export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $(( ${SLURM_GPUS_ON_NODE:-8} - 1 )))
fi
srun --kill-on-bad-exit=1 "$PYTHON" -m monoformer_jax.train "$@"
