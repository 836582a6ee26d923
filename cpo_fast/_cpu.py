r"""C++/OpenMP CPU backend (``cpo_fast._C``) of the fused ops.

Math (method.md sections 3 and 6). Per row ``z`` of length V with label ``y``, one pass
keeps a running max ``m`` and, relative to it, ``s = sum_v e^(z_v - m)`` and
``a = sum_v e^(z_v - m) (z_v - m)``; then

    lse = m + log s,    logp = z_y - lse,    H = lse - sum_v p_v z_v = log s - a / s

(no cancellation of large logits), and backward, from ``G = dL/dlogp``, ``E = dL/dH``:

    dL/dz_v = G ([v == y] - p_v) - E p_v (log p_v + H),     p_v = e^(z_v - lse)

with ``p_v log p_v = 0`` at ``z_v = -inf``. The fused-linear op computes logits blocks
``h[rows] @ W[cols].T (+ b)`` in float32 with torch's BLAS (never the whole N x V matrix),
merges each block into the per-row statistics in C++, and in backward recomputes each
block, turns it into ``dL/dz`` in place (C++), and accumulates ``grad_h += dZ @ W_blk``,
``grad_W[blk] = dZ^T @ h``, ``grad_b[blk] = sum_rows dZ``.

This module implements the backend contracts documented in
``cpo_fast/ops/token_logprobs.py`` and ``cpo_fast/ops/linear_token_logprobs.py``. The C++
side receives raw pointers, shapes, element strides and dtype codes (no libtorch link);
tensors are checked here first. The thread count follows ``torch.get_num_threads()``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from cpo_fast import _C

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Fused-linear block shape: the float32 logits buffer is at most ROWS x COLS (16 MiB),
# whatever V is. Overridable for tests through the environment.
BLOCK_ROWS = int(os.environ.get("CPO_FAST_CPU_BLOCK_ROWS", "2048"))
BLOCK_COLS = int(os.environ.get("CPO_FAST_CPU_BLOCK_COLS", "2048"))


def _code(name: str, t: Tensor) -> int:
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the 'cpu' backend, got {t.device}.")
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the C++ CPU core takes float32, bfloat16 or float16 "
            "(use backend='reference' for float64)."
        )
    return code


def _check_vec(name: str, t: Tensor, n: int, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(
            f"{name} must be a contiguous CPU {dtype} tensor of {n} elements, got "
            f"{t.dtype} shape {tuple(t.shape)} contiguous={t.is_contiguous()} on {t.device}."
        )


def _check_view3(name: str, t: Tensor) -> int:
    code = _code(name, t)
    if t.dim() != 3 or t.shape[-1] < 1:
        raise ValueError(f"{name} must be a [B, T, V] view with V >= 1, got {tuple(t.shape)}.")
    return code


def _threads() -> int:
    return max(1, torch.get_num_threads())


def token_logprobs_forward(
    logits3: Tensor, labels: Tensor, ignore_index: int, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp[N], entropy[N] or [0], lse[N]) in float32 from a [B, T, V] view of any strides.

    Ignored rows are not read; they get logp = entropy = lse = 0.
    """
    code = _check_view3("logits", logits3)
    B, T, V = logits3.shape
    N = B * T
    _check_vec("labels", labels, N, torch.int64)
    f = lambda n: torch.empty(n, dtype=torch.float32)
    logp, lse = f(N), f(N)
    ent = f(N) if with_entropy else f(0)
    if N > 0:
        _C.token_logprobs_forward(
            logits3.data_ptr(), code, B, T, V, *logits3.stride(), labels.data_ptr(),
            int(ignore_index), logp.data_ptr(), ent.data_ptr() if with_entropy else 0,
            lse.data_ptr(), _threads(),
        )
    return logp, ent, lse


def token_logprobs_backward(
    logits3: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Tensor | None, ignore_index: int, grad_out3: Tensor,
) -> None:
    """Write dL/dz into ``grad_out3`` ([B, T, V], logits' dtype, any strides; may be
    ``logits3`` itself: each element is read before it is overwritten). Ignored rows get 0.
    """
    code = _check_view3("logits", logits3)
    if grad_out3.dtype != logits3.dtype or grad_out3.shape != logits3.shape:
        raise ValueError(
            f"grad_out3 must match logits3 in dtype and shape: got {grad_out3.dtype} "
            f"{tuple(grad_out3.shape)} vs {logits3.dtype} {tuple(logits3.shape)}."
        )
    _code("grad_out3", grad_out3)
    B, T, V = logits3.shape
    N = B * T
    _check_vec("labels", labels, N, torch.int64)
    for name, t in (("lse", lse), ("grad_logp", grad_logp)):
        _check_vec(name, t, N, torch.float32)
    if grad_entropy is not None:
        _check_vec("grad_entropy", grad_entropy, N, torch.float32)
        _check_vec("entropy", entropy, N, torch.float32)
    if N == 0:
        return
    _C.token_logprobs_backward(
        logits3.data_ptr(), code, B, T, V, *logits3.stride(),
        grad_out3.data_ptr(), *grad_out3.stride(), labels.data_ptr(), 0, int(ignore_index),
        lse.data_ptr(), entropy.data_ptr() if grad_entropy is not None else 0,
        grad_logp.data_ptr(), grad_entropy.data_ptr() if grad_entropy is not None else 0,
        _threads(),
    )


# ---- fused linear -----------------------------------------------------------------------

def _check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> None:
    _code("hidden", hidden)
    _code("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, d] and weight [V, d]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}."
        )
    if not (hidden.is_contiguous() and weight.is_contiguous()):
        raise ValueError("hidden and weight must be contiguous (call .contiguous()).")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{weight.shape[0]}], got {tuple(bias.shape)}.")
    _check_vec("labels", labels, hidden.shape[0], torch.int64)


class _Blocks:
    """Float32 logits blocks of ``h @ W.T + b`` with a reused buffer (never N x V)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        self.N, self.V = hidden.shape[0], weight.shape[0]
        # One float32 copy of hidden (O(N d)); weight and bias are upcast one block at a time.
        self.h = hidden if hidden.dtype == torch.float32 else hidden.float()
        self.weight, self.bias = weight, bias
        self.br = max(1, min(BLOCK_ROWS, self.N))
        self.bc = max(1, min(BLOCK_COLS, self.V))
        self.buf = torch.empty(self.br * self.bc, dtype=torch.float32)

    def cols(self):
        for c0 in range(0, self.V, self.bc):
            c1 = min(c0 + self.bc, self.V)
            w = self.weight[c0:c1]
            w = w if w.dtype == torch.float32 else w.float()
            b = None
            if self.bias is not None:
                b = self.bias[c0:c1]
                b = b if b.dtype == torch.float32 else b.float()
            yield c0, c1, w, b

    def rows(self):
        for r0 in range(0, self.N, self.br):
            yield r0, min(r0 + self.br, self.N)

    def logits(self, r0: int, r1: int, c0: int, c1: int, w: Tensor, b: Tensor | None) -> Tensor:
        out = self.buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        if b is None:
            torch.mm(self.h[r0:r1], w.t(), out=out)
        else:
            torch.addmm(b, self.h[r0:r1], w.t(), out=out)
        return out


@torch.no_grad()
def linear_token_logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp[N], entropy[N] or [0], lse[N]) float32; peak extra memory O(N d + block)."""
    _check_linear(hidden, weight, bias, labels)
    blk = _Blocks(hidden, weight, bias)
    N = blk.N
    m, s, a, zy = _running_stats(N)
    nt = _threads()
    for c0, c1, w, b in blk.cols():
        for r0, r1 in blk.rows():
            z = blk.logits(r0, r1, c0, c1, w, b)
            _C.block_forward(
                z.data_ptr(), r1 - r0, c1 - c0, z.stride(0), c0, labels[r0:r1].data_ptr(),
                int(ignore_index), bool(with_entropy), m[r0:].data_ptr(), s[r0:].data_ptr(),
                a[r0:].data_ptr(), zy[r0:].data_ptr(), nt,
            )
    return _finish_stats(labels, ignore_index, with_entropy, m, s, a, zy)


def _running_stats(N: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Initial per-row (max, sum, entropy accumulator, label logit) for block_forward."""
    m = torch.full((N,), -torch.finfo(torch.float32).max)
    zy = torch.full((N,), float("nan"))  # stays NaN only for an out-of-range label
    return m, torch.zeros(N), torch.zeros(N), zy


def _finish_stats(
    labels: Tensor, ignore_index: int, with_entropy: bool, m: Tensor, s: Tensor, a: Tensor,
    zy: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy or [0], lse) from the running statistics; ignored rows give 0."""
    valid = labels != ignore_index
    log_s = torch.log(s)
    zero = torch.zeros(())
    lse = torch.where(valid, m + log_s, zero)
    logp = torch.where(valid, zy - lse, zero)
    ent = torch.where(valid, log_s - a / s, zero) if with_entropy else torch.empty(0)
    return logp, ent, lse


@torch.no_grad()
def linear_token_logprobs_forward_frozen(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Forward for a frozen weight: (logp, entropy or [0], lse, pw[N, d], plw[N, d] or [0]).

    Besides the statistics, accumulates per row, online over vocabulary blocks like the
    logsumexp (flash-attention style), ``pw = sum_v p_v W_v`` and, with entropy,
    ``plw = sum_v p_v log p_v W_v`` (float32; ignored rows 0). With ``e_v = exp(z_v - m)``
    relative to the running max m, the sums ``acc = sum e_v W_v`` and
    ``acc2 = sum e_v (z_v - m) W_v`` follow a max change m -> m' as
    ``acc' = alpha acc``, ``acc2' = alpha (acc2 + (m - m') acc)``, ``alpha = exp(m - m')``;
    at the end, since ``log p_v = z_v - m - log s``: ``pw = acc / s`` and
    ``plw = acc2 / s - log(s) pw``. The C++ kernel turns each logits block into e (and
    e (z - m')) in place; one ``addmm`` per block adds ``e @ W_blk``. Costs 2NdV FLOPs more
    than the plain forward (4NdV more with entropy) and makes the hidden gradient an O(N d)
    expression (see ``cpo_fast/ops/linear_token_logprobs.py``); extra memory O(N d + block).
    """
    _check_linear(hidden, weight, bias, labels)
    blk = _Blocks(hidden, weight, bias)
    N, d = blk.N, hidden.shape[1]
    m, s, a, zy = _running_stats(N)
    alpha, dm = torch.empty(N), torch.empty(N)
    acc = torch.zeros(N, d)
    acc2 = torch.zeros(N, d) if with_entropy else None
    ed_buf = torch.empty_like(blk.buf) if with_entropy else None
    nt = _threads()
    for c0, c1, w, b in blk.cols():
        for r0, r1 in blk.rows():
            z = blk.logits(r0, r1, c0, c1, w, b)
            ed = ed_buf[: z.numel()].view_as(z) if ed_buf is not None else None
            _C.block_forward_frozen(
                z.data_ptr(), r1 - r0, c1 - c0, z.stride(0), c0, labels[r0:r1].data_ptr(),
                int(ignore_index), bool(with_entropy), m[r0:].data_ptr(), s[r0:].data_ptr(),
                a[r0:].data_ptr(), zy[r0:].data_ptr(), alpha[r0:].data_ptr(),
                dm[r0:].data_ptr(), ed.data_ptr() if ed is not None else 0,
                ed.stride(0) if ed is not None else 0, nt,
            )
            al = alpha[r0:r1, None]
            if acc2 is not None:  # uses the old acc: update acc2 first
                acc2[r0:r1].addcmul_(dm[r0:r1, None], acc[r0:r1]).mul_(al).addmm_(ed, w)
            acc[r0:r1].mul_(al).addmm_(z, w)  # z now holds e = exp(z - m_new)
    logp, ent, lse = _finish_stats(labels, ignore_index, with_entropy, m, s, a, zy)
    # ignored rows have s = 0 (and acc = 0): keep them at 0, not 0/0
    valid = (labels != ignore_index)[:, None]
    inv_s = torch.where(valid, 1.0 / s[:, None], torch.zeros(()))
    pw = acc.mul_(inv_s)
    plw = torch.empty(0)
    if acc2 is not None:
        log_s = torch.where(valid, torch.log(s)[:, None], torch.zeros(()))
        plw = acc2.mul_(inv_s).sub_(pw * log_s)
    return logp, ent, lse, pw, plw


@torch.no_grad()
def linear_token_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor,
    entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None, ignore_index: int,
    needs_hidden_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool,
    grad_skip_threshold: float = 0.0,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_hidden, grad_weight, grad_bias), each None unless asked for, in input dtypes.

    Recomputes each logits block, overwrites it with dL/dz in C++ and accumulates the
    products in float32. ``grad_skip_threshold`` is ignored on the CPU: every block is
    computed, so the result is exact (no skipped tiles, no approximation).
    """
    del grad_skip_threshold
    _check_linear(hidden, weight, bias, labels)
    N, V = hidden.shape[0], weight.shape[0]
    for name, t in (("lse", lse), ("grad_logp", grad_logp)):
        _check_vec(name, t, N, torch.float32)
    if grad_entropy is not None:
        _check_vec("grad_entropy", grad_entropy, N, torch.float32)
        _check_vec("entropy", entropy, N, torch.float32)
    blk = _Blocks(hidden, weight, bias)
    f32 = lambda t: t.dtype == torch.float32
    gh = torch.zeros(hidden.shape, dtype=torch.float32) if needs_hidden_grad else None
    gw = torch.empty_like(weight) if needs_weight_grad else None
    gb = torch.empty_like(bias) if (needs_bias_grad and bias is not None) else None
    # float32 staging for one block of grad_weight when it is not float32 itself
    gw_acc = None
    if gw is not None and not f32(gw):
        gw_acc = torch.empty(blk.bc, weight.shape[1], dtype=torch.float32)
    gb_acc = torch.zeros(V, dtype=torch.float32) if gb is not None else None
    if not (needs_hidden_grad or needs_weight_grad or gb is not None):
        return None, None, None
    nt = _threads()
    ent_ptr = entropy.data_ptr() if grad_entropy is not None else 0
    gent_ptr = grad_entropy.data_ptr() if grad_entropy is not None else 0
    for c0, c1, w, b in blk.cols():
        gw_blk = None
        if gw is not None:
            gw_blk = gw[c0:c1] if gw_acc is None else gw_acc[: c1 - c0]
        for i, (r0, r1) in enumerate(blk.rows()):
            z = blk.logits(r0, r1, c0, c1, w, b)
            rows, cols = z.shape
            # in place: z becomes dL/dz of this block (label columns offset by c0)
            _C.token_logprobs_backward(
                z.data_ptr(), 0, 1, rows, cols, rows * z.stride(0), z.stride(0), 1,
                z.data_ptr(), rows * z.stride(0), z.stride(0), 1, labels[r0:r1].data_ptr(), c0,
                int(ignore_index), lse[r0:].data_ptr(), ent_ptr + 4 * r0 if ent_ptr else 0,
                grad_logp[r0:].data_ptr(), gent_ptr + 4 * r0 if gent_ptr else 0, nt,
            )
            if gh is not None:
                gh[r0:r1].addmm_(z, w)
            if gw_blk is not None:
                if i == 0:
                    torch.mm(z.t(), blk.h[r0:r1], out=gw_blk)
                else:
                    gw_blk.addmm_(z.t(), blk.h[r0:r1])
            if gb_acc is not None:
                gb_acc[c0:c1] += z.sum(0)
        if gw_acc is not None:
            gw[c0:c1] = gw_blk
    if gb is not None:
        gb.copy_(gb_acc)
    if gh is not None and gh.dtype != hidden.dtype:
        gh = gh.to(hidden.dtype)
    return gh, gw, gb
