r"""Fused linear + per-token log-probs with the gradient formed in the same pass, for when
each row's coefficients are known before the gradient pass (the two-pass effective-batch
step knows them): no recomputation of the logits.

For ``L = sum_n G_n logp_n + E_n H_n`` (``G = coef_logp``, ``E = coef_entropy``), rows are
taken ``block_rows`` at a time: ``Z = h[rows] @ W.T`` (float32, ``block_rows x V``), the C++
forward gives logp, lse (and the entropy) of the block, the C++ backward turns ``Z`` into
``dL/dz`` in place (docs/math.md: ``G([v=y] - p) - E p (log p + H)``), then
``grad_h[rows] = dZ @ W`` and ``grad_W += dZ^T @ h[rows]``. FLOPs: 6NdV (the recompute design
of :mod:`cpo_fast.cpu.linear_token_logprobs` does 8NdV); memory: ``grad_W`` (V x d, float32),
``grad_h`` (N x d) and one ``block_rows x V`` float32 block (64 MiB by default), never N x V.

Op level only: the pipeline and the Hugging Face mixin do not call it yet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpo_fast import _C
from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.cpu import _common as c

BLOCK_BYTES = 64 << 20  # default float32 logits block: block_rows = BLOCK_BYTES / (4 V)


def linear_token_logprobs_with_grads(
    hidden: Tensor, weight: Tensor, labels: Tensor, coef_logp: Tensor,
    coef_entropy: Tensor | None = None, *, ignore_index: int = IGNORE_INDEX,
    block_rows: int | None = None, num_threads: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(logp [N], entropy [N] or None, grad_hidden [N, d], grad_weight [V, d])`` of
    ``L = sum_n coef_logp[n] logp[n] (+ coef_entropy[n] H[n])`` with ``logp`` the
    log-probability of ``labels`` under ``softmax(hidden @ weight.T)``, in one pass.

    hidden [N, d], weight [V, d]: CPU, same float dtype (float32, bfloat16 or float16;
    computed in float32, gradients returned in the input dtype). labels [N] int64 in [0, V)
    or ``ignore_index`` (ignored rows: logp = 0, no gradient). coef_* [N] float32.
    The entropy is returned (and differentiated) when ``coef_entropy`` is given.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, d] and weight [V, d] with the same d, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}.")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and "
                         f"{weight.dtype}.")
    c.dtype_of("hidden", hidden)
    N, d = hidden.shape
    V = weight.shape[0]
    c.check_vec("labels", labels, N, torch.int64)
    c.check_vec("coef_logp", coef_logp, N, torch.float32)
    ent = coef_entropy is not None
    if ent:
        c.check_vec("coef_entropy", coef_entropy, N, torch.float32)
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}.")
    R = max(1, min(N, block_rows or BLOCK_BYTES // (4 * V)))
    nt = c.threads(num_threads)

    h32 = hidden.detach().float().contiguous()
    w32 = weight.detach().float().contiguous()
    logp, lse = torch.empty(N), torch.empty(N)
    entropy = torch.empty(N) if ent else None
    grad_h = torch.empty(N, d)
    grad_w = torch.zeros(V, d)
    buf = torch.empty(R * V)
    f32 = _C.DType.float32
    for r0 in range(0, N, R):
        rows = min(R, N - r0)
        z = buf[: rows * V].view(rows, V)
        hb = h32[r0:r0 + rows]
        torch.mm(hb, w32.t(), out=z)
        common = dict(dtype=f32, B=1, T=rows, V=V, stride_b=rows * V, stride_t=V, stride_v=1,
                      nthreads=nt)
        # per-row arrays at row r0: element offsets into the [N] vectors
        lab = labels[r0:r0 + rows]
        _C.token_logprobs_forward(
            logits=z.data_ptr(), labels=lab.data_ptr(), ignore_index=int(ignore_index),
            logp=logp[r0:].data_ptr(), entropy=entropy[r0:].data_ptr() if ent else 0,
            lse=lse[r0:].data_ptr(), **common)
        _C.token_logprobs_backward(
            logits=z.data_ptr(), grad_out=z.data_ptr(), out_stride_b=rows * V,
            out_stride_t=V, out_stride_v=1, labels=lab.data_ptr(), label_offset=0,
            ignore_index=int(ignore_index), lse=lse[r0:].data_ptr(),
            entropy=entropy[r0:].data_ptr() if ent else 0,
            grad_logp=coef_logp[r0:].data_ptr(),
            grad_entropy=coef_entropy[r0:].data_ptr() if ent else 0, **common)
        torch.mm(z, w32, out=grad_h[r0:r0 + rows])
        grad_w.addmm_(z.t(), hb)
    return (logp, entropy, grad_h.to(hidden.dtype), grad_w.to(weight.dtype))


__all__ = ["linear_token_logprobs_with_grads"]
