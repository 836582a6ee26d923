"""Backend selection for the fused ops.

Backends:
  - ``"triton"``: Triton kernels (``cpo_fast.kernels``). Native on CUDA tensors; on CPU
    tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set before import).
  - ``"cpu"``: the C++/OpenMP core (``cpo_fast._C``), CPU tensors only.
  - ``"reference"``: plain PyTorch (materializes log-softmax; the ground truth in tests).

``backend=None`` picks the best available for the tensor's device; the environment
variable ``CPO_FAST_BACKEND`` overrides that default (an explicit argument wins over both).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("triton", "cpu", "reference")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_cpu_extension() -> bool:
    try:
        from cpo_fast import _C  # noqa: F401
    except ImportError:
        return False
    return True


# Probed once at import: plain module constants keep resolve_backend traceable by
# torch.compile (dynamo warns on functools.cache wrappers and cannot trace importlib).
_TRITON = importlib.util.find_spec("triton") is not None
_CPU_EXT = _probe_cpu_extension()


def triton_available() -> bool:
    return _TRITON


def cpu_extension_available() -> bool:
    return _CPU_EXT


@functools.cache
def _warn_no_extension() -> None:
    warnings.warn(
        "cpo_fast: the C++ CPU core (cpo_fast._C) is not built, so CPU tensors use the "
        "PyTorch reference path (slower, materializes log-softmax). Build it with "
        "`pip install -e .` from a checkout with a C++ compiler and pybind11.",
        stacklevel=3,
    )


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return the backend name to run on ``device``, or raise a ValueError saying why not."""
    source = "the backend argument"
    if backend is None:
        backend = os.environ.get("CPO_FAST_BACKEND") or None
        source = "the environment variable CPO_FAST_BACKEND"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"backend={backend!r} (from {source}) is not one of {BACKENDS}; use one of them, "
            "or None for the best available."
        )
    if backend is None:
        if device.type == "cuda":
            return "triton" if triton_available() else "reference"
        if device.type == "cpu":
            if cpu_extension_available():
                return "cpu"
            _warn_no_extension()
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: `pip install triton`.")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError(
                "backend='triton' got CPU tensors: Triton runs on CPU tensors only under its "
                "interpreter. Set TRITON_INTERPRET=1 before importing triton, move the tensors "
                "to a CUDA device, or use backend='cpu' / 'reference'."
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support device {device}.")
    elif backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device}.")
        if not cpu_extension_available():
            raise ValueError(
                "backend='cpu' needs the C++ extension cpo_fast._C, which is not built: "
                "run `pip install -e .` with a C++ compiler available."
            )
    return backend
