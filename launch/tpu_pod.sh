#!/usr/bin/env bash
# Cloud TPU pod slice: install on, run on, or stop every worker of TPU VM $TPU in zone $ZONE.
#   launch/tpu_pod.sh install TPU ZONE
#   launch/tpu_pod.sh run TPU ZONE configs/default.py gs://bucket/workdirs/run1 --config.key.secret=S
#   launch/tpu_pod.sh stop TPU ZONE     # SIGTERM: the workers checkpoint one step together and exit
#
# install copies this repository to ~/securenet-jax on every worker and installs it with jax[tpu].
# run starts the job on every worker at once (jax.distributed finds the pod itself; no flags) and
# logs to ~/securenet-jax.log on each. The workdir must be a gs:// path (every worker writes there)
# and the key secret explicit (every worker derives the same keys).
set -euo pipefail
action=${1:?usage: launch/tpu_pod.sh install|run|stop TPU ZONE [CONFIG WORKDIR ARGS...]}
tpu=${2:?TPU name}
zone=${3:?zone}
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
on_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"
}
case "$action" in
  install)
    tar -C "$repo" --exclude=.venv --exclude=.git --exclude=workdirs -czf /tmp/securenet-jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/securenet-jax.tgz "$tpu":/tmp/ --zone "$zone" --worker=all
    on_all 'mkdir -p ~/securenet-jax && tar -xzf /tmp/securenet-jax.tgz -C ~/securenet-jax &&
            cd ~/securenet-jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip &&
            .venv/bin/pip install -q -e . "jax[tpu]"'
    ;;
  run)
    config=${1:?config}
    workdir=${2:?workdir}
    shift 2
    args=$(printf ' %q' --config "$config" --workdir "$workdir" "$@")
    on_all "cd ~/securenet-jax && nohup .venv/bin/python -m securenet_jax.main$args \
            > ~/securenet-jax.log 2>&1 < /dev/null &"
    ;;
  stop)
    on_all 'pkill -TERM -f "securenet_jax.main" || true'
    ;;
  *)
    echo "unknown action $action (install, run or stop)" >&2
    exit 2
    ;;
esac
