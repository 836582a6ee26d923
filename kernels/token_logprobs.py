r"""Triton kernels for the fused logits path (see cpo_fast/ops/token_logprobs.py).

Forward, one program per row, one read of the row in BLOCK_V chunks with an online
logsumexp. For a running max m, s = sum_v exp(z_v - m) and a = sum_v exp(z_v - m)(z_v - m);
on a new max m' both rescale by alpha = exp(m - m') and a also gains s (m - m'):

    lse = m + log s,     logp = z[y] - lse,     H = log s - a / s

(H is computed relative to the max, so logits of magnitude 1e4 lose nothing to
cancellation.) Backward, one more read and one write per row:

    dz_v = G ([v == y] - p_v) - E p_v (log p_v + H),     p_v = exp(z_v - lse)

Bytes moved (fwd+bwd) = 2 reads + 1 write of N x V elements: the bandwidth floor.
Head transforms (``HAS_TRANSFORM``, ``HAS_SOFTCAP`` constexprs; scalars pre, post, grad at
run time, derived from the ``HeadTransform`` at the launch by kernels/_head.py): each loaded
logit is replaced by z' before the above, the padding of the last chunk stays -inf, and the
backward multiplies dz' by dz'/dz. With both flags off the kernels are the untransformed
ones.

Rows are addressed as (b, t) with strides (stride_b, stride_t), so a [B, T, V] view such
as HF's ``logits[:, :-1, :]`` is read in place. Offsets are int64 (N*V exceeds 2^31).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from cpo_fast._backend import Knobs
from cpo_fast._transform import HeadTransform
from cpo_fast.kernels._head import _head_apply, _head_apply_grad, head_args


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr,
    T, V, stride_b, stride_t, stride_v, ignore_index, tf_pre, tf_post,
    HAS_ENT: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    base = logits_ptr + b * stride_b + (row - b * T) * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # Ignored rows run no iterations: their logits are never read.
    v_end = tl.where(valid, V, 0)

    m = -float("inf")
    s = 0.0
    a = 0.0
    for start in range(0, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols * stride_v, mask=cols < V, other=-float("inf")).to(tl.float32)
        if HAS_TRANSFORM:  # padding stays -inf (a real -inf logit is capped to -softcap/T)
            z = tl.where(cols < V, _head_apply(z, tf_pre, tf_post, HAS_SOFTCAP), -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A chunk (so far) of only -inf: keep the shift finite so no inf - inf appears.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        if HAS_ENT:
            shift = s * tl.where(s > 0, m - m_safe, 0.0)
            a = alpha * (a + shift) + tl.sum(e * tl.where(e > 0, z - m_safe, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    in_vocab = valid & (label >= 0) & (label < V)
    z_y = tl.load(base + label.to(tl.int64) * stride_v, mask=in_vocab, other=0.0).to(tl.float32)
    if HAS_TRANSFORM:
        z_y = _head_apply(z_y, tf_pre, tf_post, HAS_SOFTCAP)
    s = tl.where(valid, s, 1.0)  # ignored rows: s = 0; keep log() finite
    log_s = tl.log(s)
    lse = tl.where(valid, m + log_s, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, z_y - lse, 0.0))
    if HAS_ENT:
        tl.store(ent_ptr + row, tl.where(valid, log_s - a / s, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr,
    T, V, stride_b, stride_t, stride_v, gstride_b, gstride_t, gstride_v, ignore_index,
    tf_pre, tf_post, tf_grad,
    HAS_ENT: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    base = logits_ptr + b * stride_b + t * stride_t
    gbase = grad_ptr + b * gstride_b + t * gstride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    G = tl.where(valid, tl.load(glogp_ptr + row), 0.0)
    lse = tl.load(lse_ptr + row)
    if HAS_ENT:
        E = tl.where(valid, tl.load(gent_ptr + row), 0.0)
        H = tl.load(ent_ptr + row)
    v_load = tl.where(valid, V, 0)  # ignored rows load nothing and write zeros
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(base + cols * stride_v, mask=cols < v_load, other=-float("inf")).to(tl.float32)
        if HAS_TRANSFORM:
            z, factor = _head_apply_grad(z, tf_pre, tf_post, tf_grad, HAS_SOFTCAP)
        p = tl.exp(z - lse)
        g = G * (tl.where(cols == label, 1.0, 0.0) - p)
        if HAS_ENT:
            g -= E * p * tl.where(p > 0, z - lse + H, 0.0)
        if HAS_TRANSFORM:
            g = g * factor
        g = tl.where(valid, g, 0.0)
        tl.store(gbase + cols * gstride_v, g.to(grad_ptr.dtype.element_ty), mask=in_row)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch parameters: vocabulary chunk a program holds at once, and its warps."""

    block_v: int = 4096
    num_warps: int = 8


# The largest vocabulary chunk a program holds at once.
_MAX_BLOCK_V = 4096
_KNOBS = Knobs(Config)
# ``with override_config(block_v=16): ...`` (tests: small chunks; warps follow block_v).
override_config = _KNOBS.override_config


def default_config(V: int) -> Config:
    """One program per row walks the row in chunks of up to 4096 (warps scale with the chunk,
    an overridden one too, unless num_warps is overridden as well)."""
    block_v = _KNOBS.overrides.get("block_v", min(triton.next_power_of_2(V), _MAX_BLOCK_V))
    return _KNOBS.resolve(Config(block_v=block_v, num_warps=_warps(block_v)))


def _warps(block_v: int) -> int:
    return 4 if block_v <= 1024 else (8 if block_v <= 4096 else 16)


def token_logprobs_forward(
    logits3: torch.Tensor, labels: torch.Tensor, ignore_index: int, with_entropy: bool,
    *, config: Config | None = None, transform: HeadTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Backend contract: [B, T, V] logits (any strides) -> fp32 (logp, entropy or None, lse)
    of the transformed logits z' (``transform``; None: the logits themselves)."""
    B, T, V = logits3.shape
    N = B * T
    logp = torch.empty(N, dtype=torch.float32, device=logits3.device)
    lse = torch.empty_like(logp)
    ent = torch.empty(N, dtype=torch.float32, device=logits3.device) if with_entropy else None
    if N == 0:
        return logp, ent, lse
    cfg = config or default_config(V)
    _token_logprobs_fwd_kernel[(N,)](
        logits3, labels, logp, ent if with_entropy else logp, lse,
        T, V, *logits3.stride(), ignore_index, **head_args(transform, with_grad=False),
        HAS_ENT=with_entropy, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )
    return logp, ent, lse


def token_logprobs_backward(
    logits3: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
    grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, ignore_index: int,
    grad_out3: torch.Tensor, *, config: Config | None = None,
    transform: HeadTransform | None = None,
) -> None:
    """Backend contract: write dL/dlogits into grad_out3 (may be logits3 itself), through
    the transform's chain-rule factor when there is one."""
    B, T, V = logits3.shape
    N = B * T
    if N == 0:
        return
    has_ent = grad_entropy is not None
    if has_ent and entropy is None:
        raise ValueError("grad_entropy given but entropy is None: run the forward with_entropy.")
    cfg = config or default_config(V)
    _token_logprobs_bwd_kernel[(N,)](
        logits3, grad_out3, labels, lse, entropy if has_ent else lse, grad_logp,
        grad_entropy if has_ent else grad_logp,
        T, V, *logits3.stride(), *grad_out3.stride(), ignore_index,
        **head_args(transform, with_grad=True),
        HAS_ENT=has_ent, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )
