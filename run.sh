#!/usr/bin/env bash
# Sets up what is missing (scripts/setup.sh), then runs the default job: an unlicensed LeNet-5 on
# Fashion-MNIST (the baseline, which teaches the next), the license-keyed one, and the report, in WORKDIR
# (default: workdirs/default).
#   ./run.sh [WORKDIR] [--config.train.num_epochs=3 ...]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
workdir=workdirs/default
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then workdir=$1; shift; fi
exec .venv/bin/python -m securenet_jax.main --config configs/default.py --workdir "$workdir" "$@"
