r"""Triton backend of the fused-linear path: per-token log-probs from ``hidden`` and ``weight``.

Math (docs/math.md). Rows t (N of them, width d), vocabulary v (V entries):

    z_tv    = h_t . W_v + b_v                          (never stored as an N x V tensor)
    lse_t   = log sum_v exp z_tv,   logp_t = z_t,y_t - lse_t
    H_t     = lse_t - sum_v p_tv z_tv = log s - a / s
              with s = sum_v exp(z_tv - m), a = sum_v exp(z_tv - m) (z_tv - m), m = max_v z_tv
    dz_tv   = G_t ([v == y_t] - p_tv) - E_t p_tv (log p_tv + H_t)     (G = dL/dlogp, E = dL/dH)
    dh_t    = sum_v dz_tv W_v,   dW_v = sum_t dz_tv h_t,   db_v = sum_t dz_tv

Forward (``_linear_token_logprobs_fwd_kernel``): grid (cdiv(N, BLOCK_N), S). Program (i, s)
owns a row block and
a contiguous range of vocabulary tiles (split s of S, chosen so the grid fills the GPU
even when N is small). For each [BLOCK_N, BLOCK_V] tile it accumulates ``tl.dot`` over d
in BLOCK_D chunks (fp32 accumulator), then folds the tile into an online (m, s, a) per row
(a = sum e (z - m) keeps the entropy free of the cancellation in lse - E[z]) and picks the
label logit with a masked sum. Each split writes 4 floats per row; a tiny torch combine
(logsumexp over S partials) gives lse, logp and H. Memory: 4 S N floats + 3 N outputs.
FLOPs: 2 N d V.

Backward: a hybrid, vocabulary-chunked scheme. For each chunk of Vc vocabulary entries,
``_linear_token_logprobs_bwd_kernel`` (grid (cdiv(N, BLOCK_N), cdiv(Vc, BLOCK_V))) recomputes the logits tile
(2 N d Vc FLOPs), forms dz in fp32 from the saved lse and H and writes it, in the
operands' dtype, to an [N, Vc] scratch buffer. Two dense GEMMs then consume the chunk
(``consume_dz``, shared with the CPU backend in cpo_fast/_linear_common.py):
``grad_weight[chunk] = dz^T @ h`` (written once, no accumulation, no atomics) and
``grad_hidden += dz @ W[chunk]`` (accumulated in fp32). Why not an all-Triton backward:
an on-chip accumulator for grad_hidden of a row block is [BLOCK_N, d] (1 MiB in fp32 at
d = 4096, BLOCK_N = 64), which does not fit in registers, so a pure tile kernel must
either recompute the logits once per d-slice or read-modify-write / atomically add
[BLOCK_N, d] and [BLOCK_V, d] fp32 slabs per tile (hundreds of GB of traffic at the
design shapes, and non-deterministic). The chunked scheme does exactly the floor's
8 N d V FLOPs (2 forward + 2 recompute + 2 + 2 for the two gradient GEMMs, which run at
cuBLAS speed), is deterministic, and its extra memory is independent of V: N Vc (dz chunk, operand
dtype) + N d fp32 (grad_hidden accumulator, half dtypes only; fp32 accumulates in the
output) + N d in the operand dtype (a GEMM product, only where addmm cannot write fp32
from half operands: CPU, torch < 2.8). Vc defaults to about V / 128 (>= 1024).
At N = 16384, V = 128256, d = 4096, bf16 (logits: 4.2 GB): dz chunk 34 MB (0.8%) +
fp32 accumulator 268 MB (6.4%): about 7% extra, above the design's 1% target.
``Config.row_group = R`` rows per pass bounds it: the fp32 accumulator becomes
R d floats and the dz chunk R Vc, at the price of accumulating grad_weight (and
grad_bias) across the N / R passes in the weight's dtype (one rounding per pass, as
Liger-Kernel does for bf16 weights) and of smaller GEMMs; e.g. R = 1024 gives
17 MB + 2 MB (0.45%). Which default is faster is a GPU measurement (benchmarks/).

``grad_skip_threshold`` (tau > 0): a [BLOCK_N, BLOCK_V] tile whose largest p over the
block's valid rows is below tau and which holds no label of those rows gets dz = 0.
Each dropped element has |dz_tv| <= |G_t| p + |E_t| p |log p + H_t| <= b_t with

    b_t = tau (|G_t| + |E_t| (max(-log tau, 1) + H_t))         (p log(1/p) <= tau log(1/tau)
                                                                 for p < tau <= 1/e; else <= 1/e)
so |d grad_h[t, k]| <= b_t sum_v |W[v, k]|, |d grad_W[v, k]| <= sum_t b_t |h[t, k]|,
|d grad_b[v]| <= sum_t b_t. In this hybrid scheme the dense GEMMs still run over the
zeroed tiles (the saving would need a block-sparse GEMM); the option keeps the op's
semantics identical across backends.

Head transforms (``transform``, cpo_fast._transform.HeadTransform): both kernels replace each
logits tile by z' right after its GEMM (before the vocabulary padding is masked to -inf),
under the constexprs ``HAS_TRANSFORM`` / ``HAS_SOFTCAP`` with the scalars at run time
(derived at the launch by kernels/_head.py); the backward kernel multiplies its dz tile by
dz'/dz, so the GEMMs after it are unchanged. The grad-skip bound above then holds for dz',
and |dz'/dz| <= |logit_scale| / temperature. Without a transform both flags are off: the
default builds.

Interpreter: ``tl.dot`` on bf16 operands is wrong under TRITON_INTERPRET=1 (docs/gpu.md), so
the constexpr UPCAST_DOT casts the tiles to fp32 there. fp32 operands use
input_precision="ieee" (no TF32) to match torch's default matmul precision.
Pointer offsets are int64 (N V and V d exceed 2^31 at the design shapes).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from cpo_fast._backend import Knobs, triton_interpreting
from cpo_fast._linear_common import addmm_out_dtype_ok, consume_dz
from cpo_fast._transform import HeadTransform
from cpo_fast.kernels._head import _head_apply, _head_apply_grad, head_args

# Initial running max: finite, so (m_old - m_new) * s never forms -inf * 0. A constexpr:
# the GPU compiler rejects plain module-level floats inside @triton.jit functions.
_NEG_BIG = tl.constexpr(-1e30)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and launch parameters (tests override them to force many loop trips)."""

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int | None = None  # forward vocabulary splits; None: enough to fill the GPU
    vocab_chunk: int | None = None  # backward dz chunk width; None: ~V / 128, >= 1024
    row_group: int | None = None  # backward rows per pass; None: all N (see docstring)


_KNOBS = Knobs(Config, env={"row_group": "CPO_FAST_LINEAR_ROW_GROUP"})
# ``with override_config(block_n=16, ...): ...`` (tests: tiny tiles).
override_config = _KNOBS.override_config


def default_config(d: int, dtype: torch.dtype) -> Config:
    """GPU defaults keyed on d and dtype (fp32 tiles are twice the bytes: halve BLOCK_D).

    ``CPO_FAST_LINEAR_ROW_GROUP=R`` sets the backward's rows per pass (memory-lean mode).
    """
    return _KNOBS.resolve(_base_config(d, dtype))


def _base_config(d: int, dtype: torch.dtype) -> Config:
    if triton_interpreting():
        # Few, large programs: the interpreter's cost is per program and per op.
        return Config(block_n=32, block_v=64, block_d=64, num_warps=4, num_stages=1)
    # Chosen against static budgets (benchmarks/gpu_static.py, docs/gpu.md): no register
    # spills and a pipelined (cp.async) main loop on sm_80 and sm_90a for both kernels.
    # 128 x 128 tiles spill on sm_80 in the forward: its online-softmax epilogue keeps
    # several fp32 copies of the tile live next to the accumulator.
    if dtype == torch.float32:  # no tensor cores (ieee precision): 8 warps share the FMAs
        return Config(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=3)
    if d <= 2048:
        return Config(block_n=128, block_v=64, block_d=64, num_warps=8, num_stages=3)
    return Config(block_n=128, block_v=64, block_d=64, num_warps=8, num_stages=4)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_v, mask_v, D,
                 HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of h @ W^T (+ b); masked rows/columns hold bias or 0."""
    offs_d = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * D  # [BLOCK_N, 1]
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * D  # [1, BLOCK_V]: W^T tile by strides
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        kd = k + offs_d
        mask_d = kd < D
        h = tl.load(h_rows + kd[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_cols + kd[:, None], mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        if UPCAST_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PREC)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += b[None, :]
    return acc


@triton.jit
def _row_block(N, BLOCK_N: tl.constexpr):
    """The rows of this program's block (program_id 0) and their in-range mask."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, offs_n < N


@triton.jit
def _linear_token_logprobs_fwd_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, m_ptr, s_ptr, a_ptr, zy_ptr,
                N, V, D, tiles_per_split, ignore_index, tf_pre, tf_post,
                HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, PREC: tl.constexpr,
                HAS_TRANSFORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_s = tl.program_id(1)
    offs_n, mask_n = _row_block(N, BLOCK_N)
    lab = tl.load(lab_ptr + offs_n, mask=mask_n, other=ignore_index)
    lab = tl.where(lab != ignore_index, lab, -1)  # ignored rows match no column

    m = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t0, t1):
        offs_v = t * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_v, mask_v, D,
                         HAS_BIAS, UPCAST_DOT, PREC, BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_TRANSFORM:
            z = _head_apply(z, tf_pre, tf_post, HAS_SOFTCAP)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zc = z - m_new[:, None]
        e = tl.exp(zc)
        # e == 0 covers masked columns and -inf logits (0 * -inf would be NaN).
        a = alpha * (a + s * (m - m_new)) + tl.sum(e * tl.where(e > 0, zc, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        zy += tl.sum(tl.where(offs_v[None, :] == lab[:, None], z, 0.0), axis=1)
    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(m_ptr + out, m, mask=mask_n)
    tl.store(s_ptr + out, s, mask=mask_n)
    tl.store(a_ptr + out, a, mask=mask_n)
    tl.store(zy_ptr + out, zy, mask=mask_n)


@triton.jit
def _linear_token_logprobs_bwd_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, lse_ptr, ent_ptr, g_ptr, e_ptr, dz_ptr,
               N, D, v_begin, v_end, stride_dz, ignore_index, threshold, tf_pre, tf_post, tf_grad,
               HAS_BIAS: tl.constexpr, HAS_E: tl.constexpr, SKIP: tl.constexpr,
               UPCAST_DOT: tl.constexpr, PREC: tl.constexpr,
               HAS_TRANSFORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(1)
    offs_n, mask_n = _row_block(N, BLOCK_N)
    offs_v = v_begin + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_end
    lab = tl.load(lab_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = (lab != ignore_index) & mask_n
    lab = tl.where(valid, lab, -1)
    G = tl.where(valid, tl.load(g_ptr + offs_n, mask=mask_n, other=0.0), 0.0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)

    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_v, mask_v, D,
                     HAS_BIAS, UPCAST_DOT, PREC, BLOCK_N, BLOCK_V, BLOCK_D)
    if HAS_TRANSFORM:
        z, factor = _head_apply_grad(z, tf_pre, tf_post, tf_grad, HAS_SOFTCAP)
    logp = z - lse[:, None]
    live = valid[:, None] & mask_v[None, :]
    p = tl.where(live, tl.exp(logp), 0.0)
    onehot = (offs_v[None, :] == lab[:, None]) & live
    dz = G[:, None] * (onehot.to(tl.float32) - p)
    if HAS_E:
        E = tl.where(valid, tl.load(e_ptr + offs_n, mask=mask_n, other=0.0), 0.0)
        H = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        dz -= E[:, None] * p * (tl.where(p > 0, logp, 0.0) + H[:, None])  # 0 log 0 = 0
    if SKIP:
        p_max = tl.max(tl.max(p, axis=1), axis=0)
        n_lab = tl.sum(tl.sum(onehot.to(tl.int32), axis=1), axis=0)
        keep = (p_max >= threshold) | (n_lab > 0)
        dz = tl.where(keep, dz, 0.0)
    if HAS_TRANSFORM:
        dz = dz * factor
    dst = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz + (offs_v - v_begin)[None, :]
    tl.store(dst, dz.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


def _launch_flags(dtype: torch.dtype) -> tuple[bool, str]:
    upcast = triton_interpreting() and dtype == torch.bfloat16
    prec = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return upcast, prec


def _bias_arg(bias: Tensor | None, like: Tensor) -> Tensor:
    return bias if bias is not None else like.new_empty(1)


def linear_token_logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
    with_entropy: bool, *, config: Config | None = None, transform: HeadTransform | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp[N], entropy[N] or None, lse[N]) in float32 of the transformed logits (None: no
    transform); ignored rows get logp = H = lse = 0."""
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = config or default_config(D, hidden.dtype)
    n_blocks = triton.cdiv(N, cfg.block_n)
    n_tiles = triton.cdiv(V, cfg.block_v)
    splits = cfg.splits or max(1, min(n_tiles, triton.cdiv(4 * _sm_count(hidden.device), n_blocks)))
    splits = min(splits, n_tiles)
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)  # every split owns >= 1 tile
    parts = torch.empty(4, splits, N, device=hidden.device, dtype=torch.float32)
    upcast, prec = _launch_flags(hidden.dtype)
    _linear_token_logprobs_fwd_kernel[(n_blocks, splits)](
        hidden, weight, _bias_arg(bias, hidden), labels, parts[0], parts[1], parts[2], parts[3],
        N, V, D, per, ignore_index, **head_args(transform, with_grad=False),
        HAS_BIAS=bias is not None, UPCAST_DOT=upcast, PREC=prec,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    m, s, a, zy = parts.unbind(0)
    M = m.max(0).values
    scale = torch.exp(m - M)
    S = (s * scale).sum(0)
    A = (scale * (a + s * (m - M))).sum(0)
    log_s = torch.log(S)
    valid = labels != ignore_index
    lse = torch.where(valid, M + log_s, 0.0)
    logp = torch.where(valid, zy.sum(0) - lse, 0.0)
    ent = torch.where(valid, log_s - A / S, 0.0) if with_entropy else None
    return logp, ent, lse


def linear_token_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor,
    entropy: Tensor | None, grad_logp: Tensor, grad_entropy: Tensor | None, ignore_index: int,
    needs_hidden_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool,
    grad_skip_threshold: float, *, config: Config | None = None,
    transform: HeadTransform | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients w.r.t. hidden, weight, bias (None where not needed), in the inputs' dtypes,
    through the transform's chain-rule factor (None: no transform)."""
    N, D = hidden.shape
    V = weight.shape[0]
    needs_bias_grad = needs_bias_grad and bias is not None
    if not (needs_hidden_grad or needs_weight_grad or needs_bias_grad):
        return None, None, None
    cfg = config or default_config(D, hidden.dtype)
    has_e = grad_entropy is not None
    if has_e and (entropy is None or entropy.numel() != N):
        raise ValueError("grad_entropy given but the forward did not compute the entropy.")
    dev, dt = hidden.device, hidden.dtype
    f32 = dt == torch.float32
    chunk, rows = _bwd_sizes(cfg, N, V)
    dz_buf = torch.empty(rows, chunk, device=dev, dtype=dt)
    gh = torch.empty(N, D, device=dev, dtype=dt) if needs_hidden_grad else None
    # grad_hidden of a row group accumulates over vocabulary chunks in fp32: in the output
    # itself for fp32, else in a [rows, d] buffer (+ a GEMM product where addmm cannot
    # write fp32 from half operands: CPU, torch < 2.8).
    acc = prod = None
    if needs_hidden_grad and not f32:
        acc = torch.empty(rows, D, device=dev, dtype=torch.float32)
        if not addmm_out_dtype_ok(dev):
            prod = torch.empty(rows, D, device=dev, dtype=dt)
    gw = torch.empty_like(weight) if needs_weight_grad else None
    gb = torch.empty(V, device=dev, dtype=torch.float32) if needs_bias_grad else None
    upcast, prec = _launch_flags(dt)
    thr = float(grad_skip_threshold)
    head = head_args(transform, with_grad=True)
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        n = r1 - r0
        h_r = hidden[r0:r1]
        first_group = r0 == 0
        if gh is not None:
            acc_r = gh[r0:r1] if f32 else acc[:n]
            acc_r.zero_()
        for v0 in range(0, V, chunk):
            v1 = min(v0 + chunk, V)
            dz = dz_buf[:n, : v1 - v0]
            grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(v1 - v0, cfg.block_v))
            _linear_token_logprobs_bwd_kernel[grid](
                h_r, weight, _bias_arg(bias, hidden), labels[r0:r1], lse[r0:r1],
                (entropy if has_e else lse)[r0:r1], grad_logp[r0:r1],
                (grad_entropy if has_e else grad_logp)[r0:r1],
                dz_buf, n, D, v0, v1, chunk, ignore_index, thr, **head,
                HAS_BIAS=bias is not None, HAS_E=has_e, SKIP=thr > 0, UPCAST_DOT=upcast,
                PREC=prec, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            # grad_W and grad_b of a chunk: written by the first row group, accumulated in
            # their dtypes by later ones (see the module docstring)
            consume_dz(dz, h_r, weight[v0:v1], None if gw is None else gw[v0:v1],
                       acc_r if gh is not None else None, None if prod is None else prod[:n],
                       None if gb is None else gb[v0:v1], first_group)
        if gh is not None and not f32:
            gh[r0:r1].copy_(acc_r)
    del dz_buf, acc, prod
    return gh, gw, gb.to(bias.dtype) if gb is not None else None


def _bwd_sizes(cfg: Config, N: int, V: int) -> tuple[int, int]:
    """(vocabulary chunk, rows per pass) of the backward: chunk about V / 128 (>= 1024) unless
    configured, in whole BLOCK_V tiles; rows = the row group in whole BLOCK_N tiles, or N."""
    chunk = cfg.vocab_chunk or max(1024, triton.cdiv(triton.cdiv(V, 128), 128) * 128)
    chunk = min(triton.cdiv(chunk, cfg.block_v) * cfg.block_v,
                triton.cdiv(V, cfg.block_v) * cfg.block_v)
    rows = min(N, triton.cdiv(cfg.row_group, cfg.block_n) * cfg.block_n) if cfg.row_group else N
    return chunk, rows


def skip_error_bound(grad_logp: Tensor, grad_entropy: Tensor | None, entropy: Tensor | None,
                     threshold: float) -> Tensor:
    """b_t: the largest |dz_tv| a skipped element can have (see the module docstring)."""
    g = grad_logp.double().abs()
    if grad_entropy is None:
        return threshold * g
    plogp = max(-math.log(threshold), 1.0) if threshold > 0 else 0.0
    return threshold * (g + grad_entropy.double().abs() * (plogp + entropy.double().abs()))
