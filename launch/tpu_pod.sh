#!/usr/bin/env bash
# Cloud TPU pod slice: run the same command on every host.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/default.py gs://bucket/workdirs/run1 --config.key.secret=S
# On TPU VMs jax.distributed.initialize() needs no arguments; --config.distributed.initialize=True
# asks for it. Install the package on every host first, with jax[tpu].
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd securenet-jax && python3 -m securenet_jax.main --config $CONFIG --workdir $WORKDIR --config.distributed.initialize=True $*"
