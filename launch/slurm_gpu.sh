#!/usr/bin/env bash
# SLURM: one process per GPU on every node of the allocation.
#   sbatch --nodes=2 launch/slurm_gpu.sh configs/default.py /shared/workdirs/run1 --config.key.secret=S
#
# One process per GPU because that is what jax.distributed.initialize() binds under SLURM: each task
# takes the GPU of its SLURM_LOCALID, so 8 tasks on an 8-GPU node use all 8 (a single task per node
# would see only GPU 0). Each process feeds its slice of the global batch. The workdir must be on
# storage every node shares (Orbax writes from every process; a gs:// path works too), and the key
# secret must be explicit so that every process derives the same keys.
#
# Preemption and time limits: SLURM sends SIGTERM to every task (--signal below asks for it 120 s
# before the limit); the processes agree on one step, checkpoint it together and exit 0. Resubmit the
# same command to resume.
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=TERM@120
set -euo pipefail
config=${1:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [--config.x=y ...]}
workdir=${2:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
cd "${SLURM_SUBMIT_DIR:-.}"
python=${PYTHON:-.venv/bin/python}
srun --kill-on-bad-exit=1 "$python" -m securenet_jax.main --config "$config" --workdir "$workdir" "$@"
