#!/usr/bin/env bash
# Command 1 of README: set everything up and serve the demo on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/loraswap serve --demo "$@"
