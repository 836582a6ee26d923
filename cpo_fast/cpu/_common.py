"""What both CPU op modules share: tensor checks, dtype names, threads, the head-transform
keywords of the ``_C`` kernels, gradient buffers."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from cpo_fast import _C
from cpo_fast._transform import HeadTransform, active

DTYPES = {torch.float32: _C.DType.float32, torch.bfloat16: _C.DType.bfloat16,
          torch.float16: _C.DType.float16}


def dtype_of(name: str, t: Tensor) -> Any:
    """The ``_C.DType`` of a CPU tensor, or a clear error for another device or dtype."""
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the 'cpu' backend, got {t.device}.")
    code = DTYPES.get(t.dtype)
    if code is None:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the C++ CPU core takes float32, bfloat16 or float16 "
            "(use backend='reference' for float64)."
        )
    return code


def check_vec(name: str, t: Tensor, n: int, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(
            f"{name} must be a contiguous CPU {dtype} tensor of {n} elements, got "
            f"{t.dtype} shape {tuple(t.shape)} contiguous={t.is_contiguous()} on {t.device}."
        )


def check_saved(n: int, lse: Tensor, entropy: Tensor | None, grad_logp: Tensor,
                grad_entropy: Tensor | None) -> None:
    """The O(N) tensors a backward receives: float32 contiguous [N] each."""
    for name, t in (("lse", lse), ("grad_logp", grad_logp)):
        check_vec(name, t, n, torch.float32)
    if grad_entropy is not None:
        check_vec("grad_entropy", grad_entropy, n, torch.float32)
        if entropy is None:
            raise ValueError("grad_entropy was given without the saved entropy.")
        check_vec("entropy", entropy, n, torch.float32)


def addr(t: Tensor | None) -> int:
    """Data address for ``_C`` (0 for a missing tensor)."""
    return 0 if t is None else t.data_ptr()


def threads(config_threads: int | None) -> int:
    """The OpenMP thread count: the Config's, else torch's (``torch.get_num_threads()``)."""
    n = config_threads if config_threads is not None else torch.get_num_threads()
    return max(1, int(n))


def tf_kwargs(transform: HeadTransform | None) -> dict[str, float]:
    """The ``_C`` head-transform keywords ``pre`` (logit_scale), ``post`` (1 / temperature)
    and ``softcap`` (0: none), derived at the call; {} for None or the identity (the
    untransformed kernels)."""
    tf = active(transform)
    if tf is None:
        return {}
    return dict(pre=float(tf.logit_scale), post=1.0 / float(tf.temperature),
                softcap=0.0 if tf.softcap is None else float(tf.softcap))


# ---- gradient buffers (csrc/buffer_pool.h) ------------------------------------------------

POOL_ENV = "CPO_FAST_CPU_GRAD_POOL"
POOL_MIN_BYTES = 4 << 20  # below this a fresh malloc costs little; use torch.empty
POOL_DEFAULT_REGIONS = 2


def pool_limit() -> int:
    """Released gradient buffers kept mapped for reuse: ``CPO_FAST_CPU_GRAD_POOL`` (an int,
    read at call time; 0 turns reuse off), default 2."""
    raw = os.environ.get(POOL_ENV, "").strip()
    if not raw:
        return POOL_DEFAULT_REGIONS
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{POOL_ENV} must be a non-negative integer (regions kept for reuse; "
                         f"0 disables reuse), got {raw!r}.") from None
    if n < 0:
        raise ValueError(f"{POOL_ENV} must be >= 0, got {n}.")
    return n


def empty_grad(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialized contiguous CPU tensor for a large gradient the kernels overwrite.

    Buffers of 4 MiB and more come from ``_C``'s pool: 2 MiB-aligned, huge-page advised, and
    returned to the pool (still mapped, pages present) when the last view of the tensor dies,
    so the next step's gradient of a similar size reuses them without page faults. The pool
    keeps at most :func:`pool_limit` released buffers (``cpo_fast.cpu.release_buffers()``
    unmaps them). Smaller buffers are a plain ``torch.empty``.
    """
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < POOL_MIN_BYTES:
        return torch.empty(tuple(shape), dtype=dtype)
    _C.pool_set_limit(pool_limit())
    buf = _C.PoolBuffer(nbytes=nbytes)
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(tuple(shape))


def release_buffers() -> int:
    """Unmap every gradient buffer the pool keeps for reuse; returns the bytes freed."""
    return int(_C.pool_trim())
