#!/usr/bin/env bash
# SLURM launch: one process per node, all the node's GPUs per process.
#   sbatch --nodes=2 launch/slurm_gpu.sh configs/default.py /shared/workdirs/run1 [--config.x=y ...]
# jax.distributed.initialize() reads the SLURM environment (securenet_jax.parallel calls it when
# SLURM_NTASKS > 1). Multi-process runs need an explicit --config.key.secret so that every process
# derives the same key, and a --workdir on storage all nodes share (Orbax saves from every process).
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
srun python -m securenet_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
