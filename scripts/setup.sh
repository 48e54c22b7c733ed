#!/usr/bin/env bash
# Sets up .venv with everything radixfleet needs, then exits. Safe to run again (it is quick then).
# CPU machines get the CPU build of torch; a machine with an NVIDIA GPU gets the default CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch"
  $PIP install -q torch==2.13.0
fi
echo "[setup] installing radixfleet and its test/bench extras"
$PIP install -q -e ".[test,bench]" "triton==3.6.0"
echo "[setup] ready: .venv/bin/radixfleet"
