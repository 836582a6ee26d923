"""C++ CPU backend of ``token_logprobs`` (contract: cpo_fast/_backend.py).

Forward and backward each make one pass over the rows of a ``[B, T, V]`` view of any
element strides (rows split over OpenMP threads; per-row work is SIMD in C++); ignored rows
are not read and get logp = entropy = lse = 0 and a zero gradient.

Head transforms (``transform``, cpo_fast._transform.HeadTransform) are fused into the same
C++ row loops: the kernels receive ``pre`` (logit_scale), ``post`` (1 / temperature) and
``softcap`` (0 = none) and transform each element in float32 as they read it (forward:
before the max, sum-exp, label pick and entropy; backward: z' is recomputed, dL/dz' formed
as without a transform, then multiplied by dz'/dz). No extra pass over memory and no
temporary. Cost, 1024 x 32000 fp32 forward + backward on a shared 2-core machine (load
about 1): about 1.2-1.5x the untransformed time with a temperature and 1.5-2x with a
softcap (its tanh costs an exp and a division per element, twice: forward and backward),
where the former torch float32 row-chunk path took about 2x and 4.5x (more under load).
tanh comes from e = exp(-2|x|) (the kernels' vectorized exp, so no overflow): a -inf logit
becomes -softcap / temperature with a zero factor under a softcap, and stays -inf without
one. The identity (no transform) runs the untransformed code unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from cpo_fast import _C
from cpo_fast._backend import Knobs
from cpo_fast._transform import HeadTransform
from cpo_fast.cpu import _common as c


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs of the CPU token_logprobs kernels."""

    num_threads: int | None = None  # None: torch.get_num_threads()


_KNOBS = Knobs(Config)
# ``with override_config(num_threads=1): ...`` (tests; no module constants to patch).
override_config = _KNOBS.override_config


def default_config() -> Config:
    """The Config in effect (with any :func:`override_config` fields applied)."""
    return _KNOBS.resolve()


def _check_view3(name: str, t: Tensor) -> Any:
    code = c.dtype_of(name, t)
    if t.dim() != 3 or t.shape[-1] < 1:
        raise ValueError(f"{name} must be a [B, T, V] view with V >= 1, got {tuple(t.shape)}.")
    return code


def token_logprobs_forward(
    logits3: Tensor, labels: Tensor, ignore_index: int, with_entropy: bool, *,
    config: Config | None = None, transform: HeadTransform | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(logp[N], entropy[N] or None, lse[N]) in float32 from a [B, T, V] view, of the
    transformed logits when ``transform`` is given (fused, see the module docstring)."""
    cfg = config or default_config()
    dtype = _check_view3("logits", logits3)
    B, T, V = logits3.shape
    N = B * T
    c.check_vec("labels", labels, N, torch.int64)
    f = lambda: torch.empty(N, dtype=torch.float32)
    logp, lse = f(), f()
    ent = f() if with_entropy else None
    if N > 0:
        sb, st, sv = logits3.stride()
        _C.token_logprobs_forward(
            logits=logits3.data_ptr(), dtype=dtype, B=B, T=T, V=V, stride_b=sb, stride_t=st,
            stride_v=sv, labels=labels.data_ptr(), ignore_index=int(ignore_index),
            logp=logp.data_ptr(), entropy=c.addr(ent), lse=lse.data_ptr(),
            nthreads=c.threads(cfg.num_threads), **c.tf_kwargs(transform),
        )
    return logp, ent, lse


def token_logprobs_backward(
    logits3: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor | None, grad_logp: Tensor,
    grad_entropy: Tensor | None, ignore_index: int, grad_out3: Tensor, *,
    config: Config | None = None, transform: HeadTransform | None = None,
) -> None:
    """Write dL/dz into ``grad_out3`` ([B, T, V], logits' dtype, any strides; may be
    ``logits3`` itself: each element is read before it is overwritten). Ignored rows get 0.
    With ``transform``: dL/dz' times dz'/dz, fused in the kernel (see the module docstring).
    """
    cfg = config or default_config()
    dtype = _check_view3("logits", logits3)
    if grad_out3.dtype != logits3.dtype or grad_out3.shape != logits3.shape:
        raise ValueError(
            f"grad_out3 must match logits3 in dtype and shape: got {grad_out3.dtype} "
            f"{tuple(grad_out3.shape)} vs {logits3.dtype} {tuple(logits3.shape)}."
        )
    c.dtype_of("grad_out3", grad_out3)
    B, T, V = logits3.shape
    N = B * T
    c.check_vec("labels", labels, N, torch.int64)
    c.check_saved(N, lse, entropy, grad_logp, grad_entropy)
    if N == 0:
        return
    sb, st, sv = logits3.stride()
    osb, ost, osv = grad_out3.stride()
    _C.token_logprobs_backward(
        logits=logits3.data_ptr(), dtype=dtype, B=B, T=T, V=V, stride_b=sb, stride_t=st,
        stride_v=sv, grad_out=grad_out3.data_ptr(), out_stride_b=osb, out_stride_t=ost,
        out_stride_v=osv, labels=labels.data_ptr(), label_offset=0,
        ignore_index=int(ignore_index), lse=lse.data_ptr(),
        entropy=c.addr(entropy) if grad_entropy is not None else 0,
        grad_logp=grad_logp.data_ptr(), grad_entropy=c.addr(grad_entropy),
        nthreads=c.threads(cfg.num_threads), **c.tf_kwargs(transform),
    )


def new_grad_buffer(logits: Tensor) -> Tensor:
    """An uninitialized gradient buffer of ``logits``' shape and dtype for
    :func:`token_logprobs_backward` (optional backend hook, cpo_fast/_backend.py): from the
    reuse pool when large (see :func:`cpo_fast.cpu._common.empty_grad`), so steady-state
    training steps do not fault in a fresh N x V buffer every time."""
    return c.empty_grad(logits.shape, logits.dtype)


__all__ = ["Config", "default_config", "new_grad_buffer", "override_config",
           "token_logprobs_backward", "token_logprobs_forward"]
