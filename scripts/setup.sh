#!/usr/bin/env bash
# Installs what the project needs and is missing, then returns: Fashion-MNIST (Debian's
# dataset-fashion-mnist), Python's venv module if the system lacks it, and a virtualenv in .venv with
# the package and its test extras. Idempotent: a second run installs nothing. Works as root and as a
# user with sudo. Sourced by ../run.sh and ../test.sh; run it alone to only set up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "setup: please install $* with your system's package manager" >&2
    exit 1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing the Fashion-MNIST data (dataset-fashion-mnist)"
  apt_install dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "setup: installing Python's venv module"
    apt_install python3-venv
  fi
  echo "setup: creating .venv"
  python3 -m venv .venv
fi

# Reinstall when pyproject.toml changed since the last install.
stamp=.venv/.securenet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the package into .venv (a few minutes the first time)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
