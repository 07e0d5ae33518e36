#!/usr/bin/env bash
# Install cacs-node into a virtual environment at .venv (or $CACS_VENV).
#
# torch is pinned to 2.13.0. On a machine whose pip is set up with a CPU
# wheel of that release (as the project's CI machines are) this takes it;
# docs/install.md explains the CPU-only and CUDA installs elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CACS_VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e ".[test]"
echo "cacs-node installed in $venv: run $venv/bin/cacs-node --help"
