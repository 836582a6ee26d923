"""C++ CPU backend of ``token_logprobs`` (contract: cpo_fast/_backend.py).

Forward and backward each make one pass over the rows of a ``[B, T, V]`` view of any
element strides (rows split over OpenMP threads; per-row work is SIMD in C++); ignored rows
are not read and get logp = entropy = lse = 0 and a zero gradient.

Head transforms (``transform``, cpo_fast._backend.HeadTransform) run in row chunks of at
most ``Config.block_rows`` rows (default: about 16 MiB of float32): each chunk is copied to
a float32 buffer, transformed there with torch (``_common.transform_``), and handed to the
same C++ kernels as a contiguous ``[1, rows, V]`` block; the backward turns the buffer into
dL/dz' in place, multiplies it by dz'/dz and writes it to ``grad_out3`` (which may be the
logits themselves: a chunk is read before it is written). Never an N x V temporary.
Ignored rows are copied with their chunk, but nothing computed depends on their values
(under a softcap they are zeroed before the tanh, so a NaN there cannot make a NaN factor).
Without a transform the C++ kernels read the logits directly, as before. Cost: the extra
float32 passes per chunk (scale, ``torch.tanh``, the factor, the copy out) made a
1024 x 32000 fp32 forward + backward several times slower than the untransformed one
on a shared 2-core machine (about 0.2 s -> 0.9 s with a temperature, 1.4 s with a
softcap); fusing the transform into the C++ row loop would remove them (not done).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import Tensor

from cpo_fast import _C
from cpo_fast._backend import HeadTransform, active, override_fields
from cpo_fast.cpu import _common as c


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs of the CPU token_logprobs kernels."""

    num_threads: int | None = None  # None: torch.get_num_threads()
    block_rows: int | None = None  # head transforms: rows per float32 chunk; None: ~16 MiB


_OVERRIDES: dict[str, Any] = {}


def default_config() -> Config:
    """The Config in effect (with any :func:`override_config` fields applied)."""
    return dataclasses.replace(Config(), **_OVERRIDES)


def override_config(**fields: Any) -> contextlib.AbstractContextManager[None]:
    """``with override_config(num_threads=1): ...`` (tests; no module constants to patch)."""
    return override_fields(Config, _OVERRIDES, fields)


def _check_view3(name: str, t: Tensor) -> Any:
    code = c.dtype_of(name, t)
    if t.dim() != 3 or t.shape[-1] < 1:
        raise ValueError(f"{name} must be a [B, T, V] view with V >= 1, got {tuple(t.shape)}.")
    return code


_CHUNK_ELEMS = 1 << 22  # 16 MiB of float32 per transformed chunk


def _row_chunks(rows: int | None, *views3: Tensor):
    """(r0, r1, [r1 - r0, V] view of each of ``views3``) over the N = B T rows, never copying
    a whole tensor: chunks span batch entries when every view's rows are one uniformly
    strided sequence, and stay within one batch entry otherwise (e.g. ``logits[:, :-1]``)."""
    B, T, V = views3[0].shape
    rows = max(1, rows if rows is not None else _CHUNK_ELEMS // V)
    try:
        flats = [x.view(B * T, V) for x in views3]
    except RuntimeError:
        for b in range(B):
            for t0 in range(0, T, rows):
                t1 = min(t0 + rows, T)
                yield (b * T + t0, b * T + t1, *(x[b, t0:t1] for x in views3))
        return
    for r0 in range(0, B * T, rows):
        r1 = min(r0 + rows, B * T)
        yield (r0, r1, *(f[r0:r1] for f in flats))


def _chunk_kwargs(z: Tensor) -> dict[str, int]:
    """The _C view arguments of a contiguous float32 [rows, V] chunk as a [1, rows, V] one."""
    rows, V = z.shape
    return dict(dtype=_C.DType.float32, B=1, T=rows, V=V, stride_b=rows * V, stride_t=V,
                stride_v=1)


def token_logprobs_forward(
    logits3: Tensor, labels: Tensor, ignore_index: int, with_entropy: bool, *,
    config: Config | None = None, transform: HeadTransform | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(logp[N], entropy[N] or None, lse[N]) in float32 from a [B, T, V] view, of the
    transformed logits when ``transform`` is given (row chunks, see the module docstring)."""
    cfg = config or default_config()
    dtype = _check_view3("logits", logits3)
    B, T, V = logits3.shape
    N = B * T
    c.check_vec("labels", labels, N, torch.int64)
    f = lambda: torch.empty(N, dtype=torch.float32)
    logp, lse = f(), f()
    ent = f() if with_entropy else None
    tf = active(transform)
    if N > 0 and tf is not None:
        buf = None
        for r0, r1, x in _row_chunks(cfg.block_rows, logits3):
            if buf is None:
                buf = torch.empty(x.shape[0] * V, dtype=torch.float32)
            z = buf[: x.numel()].view(x.shape)
            c.transform_(z, tf, src=x)
            _C.token_logprobs_forward(
                logits=z.data_ptr(), **_chunk_kwargs(z), labels=labels[r0:r1].data_ptr(),
                ignore_index=int(ignore_index), logp=logp[r0:r1].data_ptr(),
                entropy=c.addr(None if ent is None else ent[r0:r1]),
                lse=lse[r0:r1].data_ptr(), nthreads=c.threads(cfg.num_threads),
            )
    elif N > 0:
        sb, st, sv = logits3.stride()
        _C.token_logprobs_forward(
            logits=logits3.data_ptr(), dtype=dtype, B=B, T=T, V=V, stride_b=sb, stride_t=st,
            stride_v=sv, labels=labels.data_ptr(), ignore_index=int(ignore_index),
            logp=logp.data_ptr(), entropy=c.addr(ent), lse=lse.data_ptr(),
            nthreads=c.threads(cfg.num_threads),
        )
    return logp, ent, lse


def token_logprobs_backward(
    logits3: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor | None, grad_logp: Tensor,
    grad_entropy: Tensor | None, ignore_index: int, grad_out3: Tensor, *,
    config: Config | None = None, transform: HeadTransform | None = None,
) -> None:
    """Write dL/dz into ``grad_out3`` ([B, T, V], logits' dtype, any strides; may be
    ``logits3`` itself: each element is read before it is overwritten). Ignored rows get 0.
    With ``transform``: dL/dz' times dz'/dz, in row chunks (see the module docstring).
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
    tf = active(transform)
    if tf is not None:
        _backward_transformed(logits3, labels, lse, entropy, grad_logp, grad_entropy,
                              ignore_index, grad_out3, cfg, tf)
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
        nthreads=c.threads(cfg.num_threads),
    )


def _backward_transformed(logits3: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                          grad_logp: Tensor, grad_entropy: Tensor | None, ignore_index: int,
                          grad_out3: Tensor, cfg: Config, tf: HeadTransform) -> None:
    V = logits3.shape[-1]
    buf = tbuf = None
    has_e = grad_entropy is not None
    for r0, r1, x, out in _row_chunks(cfg.block_rows, logits3, grad_out3):
        if buf is None:
            buf = torch.empty(x.shape[0] * V, dtype=torch.float32)
            tbuf = torch.empty_like(buf) if tf.softcap is not None else None
        z = buf[: x.numel()].view(x.shape)
        ignored = labels[r0:r1] == ignore_index
        if tf.softcap is not None:  # their logits are not used, but a NaN would make a NaN factor
            z.copy_(x)
            c.zero_rows_(z, ignored)
            x = z
        t = c.transform_(z, tf, None if tbuf is None else tbuf[: x.numel()].view(x.shape), src=x)
        kw = _chunk_kwargs(z)
        _C.token_logprobs_backward(  # in place: z becomes dL/dz'
            logits=z.data_ptr(), **kw, grad_out=z.data_ptr(), out_stride_b=kw["stride_b"],
            out_stride_t=V, out_stride_v=1, labels=labels[r0:r1].data_ptr(), label_offset=0,
            ignore_index=int(ignore_index), lse=lse[r0:r1].data_ptr(),
            entropy=entropy[r0:r1].data_ptr() if has_e else 0,
            grad_logp=grad_logp[r0:r1].data_ptr(),
            grad_entropy=grad_entropy[r0:r1].data_ptr() if has_e else 0,
            nthreads=c.threads(cfg.num_threads),
        )
        c.grad_factor_(z, t, tf)  # ignored rows: 0 from C++ times a finite factor
        out.copy_(z)


__all__ = ["Config", "default_config", "override_config", "token_logprobs_backward",
           "token_logprobs_forward"]
