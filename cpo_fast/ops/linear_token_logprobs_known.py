r"""Fused linear + per-token log-probs with the gradient formed in the forward pass, for a
loss whose gradient with respect to every log-prob (and entropy) is known before the pass.

Reached through :func:`cpo_fast.linear_token_logprobs` with ``grad_coef=`` (and
``grad_coef_entropy=``) when the weight or bias is trained. The two-pass effective-batch
step (cpo_fast/effective_batch.py) knows these coefficients in its second pass, and a loss
that is linear in the log-probs (SFT's token mean, the surrogate ``sum_i c_i s_i``) knows
them before any pass.

Math. With ``G_t = dL/dlogp_t`` and ``E_t = dL/dH_t`` fixed in advance, rows are taken
``R`` at a time (``R x V`` float32 is at most ``BLOCK_BYTES``):

    Z = h_R W^T + b                               (one row block of logits, head-transformed
                                                   by the token_logprobs kernels as they read)
    logp, lse, H                                  token_logprobs forward on Z
    dZ = G ([v = y] - p) - E p (log p + H)        token_logprobs backward, written over Z
    dh_R = dZ W,   dW += dZ^T h_R,   db += sum_rows dZ

so nothing is recomputed: 6NdV FLOPs, the count of eager (the recompute design of
:mod:`cpo_fast.ops.linear_token_logprobs` does 8NdV), with one ``R x V`` block, ``dW``
(``V x d``, float32) and ``dh`` as memory, never ``N x V``. The row kernels are the
backend's own ``token_logprobs`` (C++ on CPU, Triton on CUDA): this module is written once
for both. The block is float32 whatever the inputs' dtype: half inputs are multiplied in
their dtype with a float32 result on CUDA (``dZ`` is rounded to that dtype for the two
gradient products, as in any half-precision backward) and upcast on the CPU.

Backward. It receives the actual ``dL/dlogp`` (and ``dL/dH``). When they equal the announced
``G`` and ``E`` times one number ``s`` (up to a relative 1e-6: a rounding of the same
expression; ``s`` is 1 unless the loss was scaled after the announcement, e.g. by gradient
accumulation or a loss scaler) the gradients formed in the forward, times ``s``, are
returned; otherwise the caller's loss was not the one it
announced, and the gradient is recomputed exactly by the fused op's backward, with a
warning naming the mismatch. An autograd Function, not a ``torch.library`` op: the
backward's choice is data-dependent, so ``torch.compile`` breaks the graph here.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import Tensor

from cpo_fast._backend import backend_module
from cpo_fast._transform import HeadTransform

BLOCK_BYTES = 64 << 20  # bytes of one float32 R x V block; CPO_FAST_KNOWN_BLOCK_BYTES overrides


def block_rows(V: int, N: int) -> int:
    """Rows per block: the largest R with an R x V float32 block within the budget (>= 1)."""
    budget = int(os.environ.get("CPO_FAST_KNOWN_BLOCK_BYTES", BLOCK_BYTES))
    return max(1, min(N, budget // (4 * V)))


def _mm32(a: Tensor, b: Tensor, out: Tensor, *, add: bool = False) -> Tensor:
    """``out (+)= a @ b`` with ``out`` float32, in place: float32 inputs straight into it;
    half inputs on CUDA with a float32 result (cuBLAS accumulates in float32 anyway);
    elsewhere upcast first."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.addmm(out, a, b, out=out) if add else torch.mm(a, b, out=out)
    r = torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else a.float() @ b.float()
    return out.add_(r) if add else out.copy_(r)


def forward_with_grads(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, coef: Tensor,
    coef_entropy: Tensor | None, ignore_index: int, with_entropy: bool, backend: str,
    transform: HeadTransform | None, needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(logp, entropy or None, lse, dh, dW, db) of ``L = sum G logp + E H`` in one pass over
    row blocks; ``hidden [N, d]``, ``weight [V, d]`` contiguous, same dtype; ``coef`` and
    ``coef_entropy`` float32 [N]; ``needs`` = which of (dh, dW, db) to form."""
    tok = backend_module(backend, "token_logprobs")
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    # The block is float32 always. Half inputs: on CUDA the products run in their dtype
    # with float32 output (dZ is rounded to it for the two gradient products, as in any
    # half-precision backward); on the CPU the weight is upcast once.
    w = weight.float() if dev.type != "cuda" else weight
    ent_wanted = with_entropy or coef_entropy is not None
    f32 = lambda *shape: torch.empty(shape, dtype=torch.float32, device=dev)  # noqa: E731
    logp, lse = f32(N), f32(N)
    entropy = f32(N) if ent_wanted else None
    need_h, need_w, need_b = needs
    gh = f32(N, d) if need_h else None
    gw = f32(V, d) if need_w else None  # the first block writes it, the others add
    gb = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    R = block_rows(V, N)
    # the block from the backend's buffer pool where it has one (the C++ backend's: mapped
    # once, no page faults per step)
    new_buf = getattr(tok, "new_grad_buffer", None)
    buf = (new_buf(torch.empty(R * V, device="meta")) if new_buf is not None
           else f32(R * V))
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        hb = hidden[r0:r1].to(w.dtype)
        z = _mm32(hb, w.t(), buf[: (r1 - r0) * V].view(r1 - r0, V))
        if bias is not None:
            z += bias.float()
        z3, lab = z.view(1, r1 - r0, V), labels[r0:r1]
        lp, ent, ls = tok.token_logprobs_forward(z3, lab, ignore_index, ent_wanted,
                                                 transform=transform)
        logp[r0:r1], lse[r0:r1] = lp, ls
        if ent_wanted:
            entropy[r0:r1] = ent
        ge = None if coef_entropy is None else coef_entropy[r0:r1].contiguous()
        tok.token_logprobs_backward(z3, lab, ls, ent if ge is not None else None,
                                    coef[r0:r1].contiguous(), ge, ignore_index, z3,
                                    transform=transform)
        if need_b:
            gb += z.sum(0)
        dz = z.to(w.dtype)
        if need_h:
            _mm32(dz, w, gh[r0:r1])
        if need_w:
            _mm32(dz.t(), hb, gw, add=r0 > 0)
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return (logp, entropy if with_entropy else None, lse, cast(gh, hidden), cast(gw, weight),
            None if bias is None else cast(gb, bias))


def _scale_of(grads: tuple[Tensor | None, ...], announced: tuple[Tensor | None, ...]) -> float | None:
    """The number s with (dL/dlogp, dL/dH) = s (G, E) up to a relative 1e-6 (None stands for
    zeros), or None when there is none. A loss scaled after the announcement (gradient
    accumulation's 1 / steps, a loss scaler) keeps its gradients: they are linear in (G, E)."""
    got = torch.cat([g.float().reshape(-1) if g is not None else torch.zeros_like(a)
                     for g, a in zip(grads, announced, strict=True) if a is not None or g is not None])
    ann = torch.cat([a if a is not None else torch.zeros_like(g, dtype=torch.float32).reshape(-1)
                     for g, a in zip(grads, announced, strict=True) if a is not None or g is not None])
    norm = float(ann.double().square().sum())
    s = float(got.double() @ ann.double()) / norm if norm > 0 else 1.0
    return s if torch.allclose(got, ann * s, rtol=1e-6, atol=0.0) else None


class KnownGrad(torch.autograd.Function):
    """``logp`` (and the entropy) whose backward returns the gradients formed in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                coef: Tensor, coef_entropy: Tensor | None, ignore_index: int,
                with_entropy: bool, backend: str,
                transform: HeadTransform | None) -> tuple[Tensor, Tensor | None]:
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2])
        with torch.autocast(hidden.device.type, enabled=False):  # the products' dtypes are ours
            logp, ent, lse, gh, gw, gb = forward_with_grads(
                hidden, weight, bias, labels, coef, coef_entropy, ignore_index, with_entropy,
                backend, transform, needs)
        ctx.grads = (gh, gw, gb)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent, coef, coef_entropy)
        ctx.args = (ignore_index, backend, transform, needs)
        return logp, ent

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor | None, grad_ent: Tensor | None) -> tuple:
        hidden, weight, bias, labels, lse, ent, coef, coef_ent = ctx.saved_tensors
        ignore_index, backend, transform, needs = ctx.args
        gh, gw, gb = ctx.grads
        ctx.grads = None
        s = _scale_of((grad_logp, grad_ent), (coef, coef_ent))
        if s is not None and s != 1.0:
            gh, gw, gb = (None if g is None else g * s for g in (gh, gw, gb))
        elif s is None:
            warnings.warn(
                "linear_token_logprobs: the gradient that reached logp (or the entropy) is not "
                "grad_coef (grad_coef_entropy); recomputing it exactly. Pass the coefficients "
                "of the loss you backpropagate, or none.", stacklevel=2)
            g = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
            ge = None if grad_ent is None or ent is None else grad_ent.float().contiguous()
            gh, gw, gb = backend_module(backend, "linear_token_logprobs").linear_token_logprobs_backward(
                hidden, weight, bias, labels, lse, ent if ge is not None else None, g, ge,
                ignore_index, *needs, 0.0, transform=transform)
        if gh is not None:  # dz = 0 on ignored rows, but 0 * (a NaN in W) is NaN
            gh = torch.where((labels != ignore_index)[:, None], gh, torch.zeros((), dtype=gh.dtype))
        return gh, gw, gb, *(None,) * 7


__all__ = ["BLOCK_BYTES", "KnownGrad", "block_rows", "forward_with_grads"]
