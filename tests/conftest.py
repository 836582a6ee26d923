"""Test setup: run Triton kernels under the interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, at
collection time, before any test module imports cpo_fast.kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under CI (CI=true) hypothesis replays a fixed sequence of examples, so a submission's CI
# result does not depend on the draw; developers' runs keep exploring new examples.
settings.register_profile("ci", deadline=None, print_blob=True,
                          derandomize=os.environ.get("CI", "").lower() in ("1", "true"))
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

EMOBANK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "emobank.csv"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_usable() -> bool:
    from cpo_fast._backend import triton_available, triton_interpreting

    return triton_available() and (torch.cuda.is_available() or triton_interpreting())


def kernel_backends() -> list[str]:
    """The fused backends this machine can test (the reference is the ground truth)."""
    from cpo_fast._backend import cpu_extension_available

    out = []
    if triton_usable():
        out.append("triton")
    if cpu_extension_available():
        out.append("cpu")
    return out


@pytest.fixture
def emobank_path() -> Path:
    if not EMOBANK.exists():
        pytest.skip(f"EmoBank not found at {EMOBANK}")
    return EMOBANK
