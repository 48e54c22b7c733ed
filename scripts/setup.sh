#!/usr/bin/env bash
# Sets up .venv, then exits. Safe to run again: what is installed at the right version is not installed
# again (a re-run takes seconds).
#
#   bash scripts/setup.sh          what serving needs: torch, radixfleet and its runtime dependencies
#                                  (+ triton when an NVIDIA driver is present: the CUDA executor's kernels)
#   bash scripts/setup.sh --test   also triton and the test and bench extras (pytest, transformers, openai,
#                                  locust, ...), what `python -m pytest` needs
#
# torch: `pip install torch==2.13.0` takes the build pip's configured indexes serve. On a machine with no
# NVIDIA driver you want the CPU build (no CUDA libraries to download): if your index serves the CUDA
# build, run  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# triton: with --test it is installed on CPU machines too, because the tests run the Triton kernels in
# Triton's interpreter (TRITON_INTERPRET=1) and compare them with their torch references. Serving on the
# CPU never imports it.
set -euo pipefail
MODE=serve
case "${1:-}" in
  "") ;;
  --test) MODE=test ;;
  *) echo "usage: bash scripts/setup.sh [--test]   (--test: also what the test suite needs)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TRITON_VERSION=3.6.0
XGRAMMAR_VERSION=0.2.9
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

GPU=no
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=yes; fi
if has torch "$TORCH_VERSION"; then
  echo "[setup] torch $TORCH_VERSION: already installed"
else
  if [ "$GPU" = yes ]; then
    echo "[setup] installing torch $TORCH_VERSION (an NVIDIA driver is present: the CUDA build)"
  else
    echo "[setup] installing torch $TORCH_VERSION (no NVIDIA driver: the radixfleet workers run on the CPU)"
  fi
  $PIP install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi

if [ "$MODE" = test ] || [ "$GPU" = yes ]; then
  if has triton "$TRITON_VERSION"; then
    echo "[setup] triton $TRITON_VERSION: already installed"
  elif [ "$GPU" = yes ]; then
    echo "[setup] installing triton $TRITON_VERSION (the CUDA executor's kernels)"
    $PIP install -q "triton==$TRITON_VERSION"
  else
    echo "[setup] installing triton $TRITON_VERSION (the tests run the GPU kernels in Triton's interpreter on this CPU)"
    $PIP install -q "triton==$TRITON_VERSION"
  fi
else
  echo "[setup] triton: not needed to serve on this CPU-only machine (setup.sh --test installs it for the tests)"
fi

# radixfleet itself (editable), with the test and bench extras under --test: again only when
# pyproject.toml or the mode changed. A serving setup after a test setup keeps the extras.
stamp=.venv/.radixfleet-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ -x .venv/bin/radixfleet ] && { [ "$have" = "$want test" ] || { [ "$MODE" = serve ] && [ "$have" = "$want serve" ]; }; }; then
  echo "[setup] radixfleet$([ "$MODE" = test ] && echo " and its test/bench extras"): already installed"
elif [ "$MODE" = test ]; then
  echo "[setup] installing radixfleet (editable) and its test/bench extras"
  $PIP install -q -e ".[test,bench]"
  echo "$want test" > "$stamp"
else
  echo "[setup] installing radixfleet (editable)"
  $PIP install -q -e .
  if [ "$GPU" = yes ]; then
    $PIP install -q -e ".[structured]"
  else
    # xgrammar (structured outputs) lists triton as a dependency on Linux x86_64 but never needs it on
    # the CPU: install it without dependencies, then the ones it does use.
    echo "[setup] installing xgrammar (structured outputs) without triton"
    $PIP install -q pydantic "transformers>=5.0" "typing-extensions>=4.9"
    # pip then notes that xgrammar "requires triton": expected here, so that note is filtered out
    set +o pipefail
    $PIP install -q --no-deps "xgrammar==$XGRAMMAR_VERSION" "apache-tvm-ffi>=0.1.11" 2>&1 \
      | grep -v -e "dependency resolver does not currently" -e "requires triton" || true
    set -o pipefail
    "$PY" -c "import xgrammar" || { echo "[setup] xgrammar failed to install" >&2; exit 1; }
  fi
  echo "$want serve" > "$stamp"
fi
if [ "$MODE" = test ]; then
  echo "[setup] ready in $(( $(date +%s) - start )) s: .venv/bin/python -m pytest -q"
else
  echo "[setup] ready in $(( $(date +%s) - start )) s: .venv/bin/radixfleet up   (tests: bash scripts/setup.sh --test)"
fi
