#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. Without a CUDA device the Triton
# kernels run under Triton's interpreter (TRITON_INTERPRET=1); with one, natively.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
