#!/usr/bin/env bash
# Run the GPU compile gate (benchmarks/gpu_static.py --gate) under the lowest Triton that
# pyproject.toml allows, in a throwaway venv that sees the system's torch but shadows its
# triton. Usage: benchmarks/check_triton_min.sh [TRITON_VERSION] [VENV_DIR]
# Needs: a python3 with torch importable (system site-packages), network or a local index
# for `pip install triton==VERSION`. Prints the gate's verdict; exits with its status.
set -euo pipefail
VERSION="${1:-3.6.0}"
VENV="${2:-/tmp/venv-tmin}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/pip" install -q "triton==$VERSION"

# cpo_fast without installing it: a package tree of symlinks, kernels/ as cpo_fast.kernels
# (what setup.py's package_dir does), so the checkout's files are the ones compiled.
SHIM="$(mktemp -d)"
mkdir "$SHIM/cpo_fast"
for f in "$ROOT"/cpo_fast/*; do ln -s "$f" "$SHIM/cpo_fast/$(basename "$f")"; done
ln -s "$ROOT/kernels" "$SHIM/cpo_fast/kernels"

export PYTHONPATH="$SHIM"
unset TRITON_INTERPRET
# Not from the checkout's root: there, '' on sys.path would find ./cpo_fast without kernels/.
cd "$SHIM"
"$VENV/bin/python" -c '
import torch, triton, cpo_fast.kernels.linear_token_logprobs as k
print(f"triton {triton.__version__} from {triton.__file__}; torch {torch.__version__}; kernels from {k.__file__}")'
"$VENV/bin/python" "$ROOT/benchmarks/gpu_static.py" --gate --jobs "${JOBS:-2}" \
    --json "${OUT_JSON:-/tmp/gate-triton-$VERSION.json}"
