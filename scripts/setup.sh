#!/usr/bin/env bash
# Sets up .venv with everything radixfleet needs, then exits. Safe to run again: what is installed at
# the right version is not installed again (a re-run takes seconds).
#
# torch: `pip install torch==2.13.0` takes the build pip's configured indexes serve. On a machine with no
# NVIDIA driver you want the CPU build (no CUDA libraries to download): if your index serves the CUDA
# build, run  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# triton: installed on CPU machines too, because the tests run the Triton kernels in Triton's interpreter
# (TRITON_INTERPRET=1) and compare them with their torch references.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TRITON_VERSION=3.6.0
start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
PIP="$PY -m pip"

# has NAME VERSION: is that distribution installed at that version (a local +cpu / +cu128 tag is ignored)?
has() {
  "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import importlib.metadata as metadata, sys
try:
    sys.exit(0 if metadata.version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PYEOF
}

if has torch "$TORCH_VERSION"; then
  echo "[setup] torch $TORCH_VERSION: already installed"
else
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] installing torch $TORCH_VERSION (an NVIDIA driver is present: the CUDA build)"
  else
    echo "[setup] installing torch $TORCH_VERSION (no NVIDIA driver: the radixfleet workers run on the CPU)"
  fi
  $PIP install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi

if has triton "$TRITON_VERSION"; then
  echo "[setup] triton $TRITON_VERSION: already installed"
else
  echo "[setup] installing triton $TRITON_VERSION (GPU kernels; on a CPU machine the tests run them in Triton's interpreter)"
  $PIP install -q "triton==$TRITON_VERSION"
fi

# radixfleet itself (editable) with its test and bench extras: again only when pyproject.toml changed.
stamp=.venv/.radixfleet-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/radixfleet ]; then
  echo "[setup] radixfleet and its test/bench extras: already installed"
else
  echo "[setup] installing radixfleet (editable) and its test/bench extras"
  $PIP install -q -e ".[test,bench]"
  echo "$want" > "$stamp"
fi
echo "[setup] ready in $(( $(date +%s) - start )) s: .venv/bin/radixfleet up  |  .venv/bin/python -m pytest -q"
