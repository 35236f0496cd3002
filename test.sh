#!/usr/bin/env bash
# Sets up what is missing (scripts/setup.sh), then runs the whole test suite on 2 processes.
#   ./test.sh                    everything (11-16 minutes on 2 Xeon cores with a cold compile cache)
#   ./test.sh -m "not slow"      the fast subset
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 --dist worksteal --durations=15 tests "$@"
