#!/usr/bin/env bash
# Set up compose in ./.venv. Where no NVIDIA GPU is present, the CPU build of torch is
# installed first (small and fast); with a GPU, pip resolves torch from the project's range.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" >/dev/null 2>&1; then
  pip install -q torch==2.13.0
fi
pip install -q -e ".[test]"
