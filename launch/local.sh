#!/usr/bin/env bash
# N processes of one job on this machine, talking over loopback (what the multi-process tests use):
#   launch/local.sh N --config configs/default.py:smoke --workdir /tmp/run --config.key.secret=S
# Each process gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I (PORT: a
# free port, or $SECURENET_PORT). SIGTERM or SIGINT to this script reaches every process, which then
# stop together at one step with one checkpoint. The exit code is the first non-zero exit code of a
# process, else 0. Multi-process runs need an explicit --config.key.secret.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: launch/local.sh N ARGS...}
shift
python=${PYTHON:-.venv/bin/python}
port=${SECURENET_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  "$python" -m securenet_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=("$!")
done
# shellcheck disable=SC2317  # called from the traps below
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
for pid in "${pids[@]}"; do
  while true; do
    set +e
    wait "$pid"
    code=$?
    set -e
    # wait returns early (> 128) when a trapped signal arrives; keep waiting for the process.
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
done
exit "$status"
