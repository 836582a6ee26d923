#!/usr/bin/env bash
# Installs cpo_fast and its test dependencies into the current Python environment.
# On a machine without torch it installs the pinned CPU build first (an unpinned torch
# would pull several GB of CUDA wheels); where torch is already present it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q "torch==2.13.0"
fi
echo "== installing cpo_fast (editable, builds the C++ core) with test extras"
"$PY" -m pip install -q -e ".[test]"
"$PY" - <<'PY'
import torch, cpo_fast
from cpo_fast._backend import cpu_extension_available, triton_available
print(f"torch {torch.__version__}, cuda={torch.cuda.is_available()}, "
      f"triton={triton_available()}, C++ core={cpu_extension_available()}")
PY
