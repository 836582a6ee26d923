r"""C++ CPU backend of ``linear_token_logprobs`` (contract: cpo_fast/_backend.py).

Computes float32 logits blocks ``h[rows] @ W[cols].T (+ b)`` with torch's BLAS (never the
whole N x V matrix: at most ``block_rows x block_cols``, 16 MiB by default), merges each
block into the per-row running statistics in C++ (``_C.block_forward``), and in backward
recomputes each block, turns it into ``dL/dz`` in place in C++ (``_C.token_logprobs_backward``
on the block) and accumulates ``grad_h += dZ @ W_blk``, ``grad_W[blk] = dZ^T @ h``,
``grad_b[blk] = sum_rows dZ`` (``consume_dz``, shared with the Triton backend in
cpo_fast/_linear_common.py). The frozen-weight forward (``_C.block_forward_frozen``) also
accumulates ``pw`` and ``plw`` (see :func:`linear_token_logprobs_forward_frozen`).

Head transforms (``transform``, cpo_fast._transform.HeadTransform) are fused into the same
C++ kernels as on the logits path (cpo_fast/cpu/token_logprobs.py): the block kernels get
``pre``, ``post`` and ``softcap`` (``_common.tf_kwargs``) and transform each element of the
raw float32 block as they read it (the frozen forward turns the block into z' in place
first); the backward kernel recomputes z', forms dL/dz' and stores dL/dz = dL/dz' dz'/dz
over the block, ignored rows 0. No extra pass over the block in torch, no second block
buffer. No transform: the untransformed code, unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor

from cpo_fast import _C
from cpo_fast._backend import Knobs
from cpo_fast._linear_common import consume_dz
from cpo_fast._transform import HeadTransform, active
from cpo_fast.cpu import _common as c


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs: the float32 logits block is at most block_rows x block_cols."""

    block_rows: int = 2048
    block_cols: int = 2048
    num_threads: int | None = None  # None: torch.get_num_threads()

    def __post_init__(self) -> None:
        if self.block_rows < 1 or self.block_cols < 1:
            raise ValueError(f"block_rows and block_cols must be >= 1, got {self}.")


_KNOBS = Knobs(Config, env={"block_rows": "CPO_FAST_CPU_BLOCK_ROWS",
                            "block_cols": "CPO_FAST_CPU_BLOCK_COLS"})
# ``with override_config(block_rows=7, block_cols=16): ...`` forces small blocks.
override_config = _KNOBS.override_config


def default_config() -> Config:
    """The Config in effect: CPO_FAST_CPU_BLOCK_ROWS / CPO_FAST_CPU_BLOCK_COLS (read now,
    not at import), then any :func:`override_config` fields."""
    return _KNOBS.resolve()


def _check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> None:
    c.dtype_of("hidden", hidden)
    c.dtype_of("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, d] and weight [V, d]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}."
        )
    if not (hidden.is_contiguous() and weight.is_contiguous()):
        raise ValueError("hidden and weight must be contiguous (call .contiguous()).")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{weight.shape[0]}], got {tuple(bias.shape)}.")
    c.check_vec("labels", labels, hidden.shape[0], torch.int64)


class _Blocks:
    """Float32 logits blocks of ``h @ W.T + b`` with a reused buffer (never N x V)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, cfg: Config) -> None:
        self.N, self.V = hidden.shape[0], weight.shape[0]
        # One float32 copy of hidden (O(N d)); weight and bias are upcast one block at a time.
        self.h = hidden if hidden.dtype == torch.float32 else hidden.float()
        self.weight, self.bias = weight, bias
        self.br = max(1, min(cfg.block_rows, self.N))
        self.bc = max(1, min(cfg.block_cols, self.V))
        self.buf = torch.empty(self.br * self.bc, dtype=torch.float32)

    def cols(self) -> Iterator[tuple[int, int, Tensor, Tensor | None]]:
        for c0 in range(0, self.V, self.bc):
            c1 = min(c0 + self.bc, self.V)
            w = self.weight[c0:c1]
            w = w if w.dtype == torch.float32 else w.float()
            b = None
            if self.bias is not None:
                b = self.bias[c0:c1]
                b = b if b.dtype == torch.float32 else b.float()
            yield c0, c1, w, b

    def rows(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.N, self.br):
            yield r0, min(r0 + self.br, self.N)

    def logits(self, r0: int, r1: int, c0: int, c1: int, w: Tensor, b: Tensor | None) -> Tensor:
        out = self.buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        if b is None:
            torch.mm(self.h[r0:r1], w.t(), out=out)
        else:
            torch.addmm(b, self.h[r0:r1], w.t(), out=out)
        return out


@dataclasses.dataclass
class _Running:
    """Per-row running statistics of the online logsumexp (float32 [N] each)."""

    m: Tensor  # max so far
    s: Tensor  # sum exp(z - m)
    a: Tensor  # sum exp(z - m)(z - m) (entropy only)
    zy: Tensor  # label logit: stays NaN only for an out-of-range label

    @classmethod
    def start(cls, n: int) -> _Running:
        return cls(torch.full((n,), -torch.finfo(torch.float32).max), torch.zeros(n),
                   torch.zeros(n), torch.full((n,), float("nan")))

    def kwargs(self) -> dict[str, int]:
        return dict(m=self.m.data_ptr(), s=self.s.data_ptr(), a=self.a.data_ptr(),
                    zy=self.zy.data_ptr())

    def finish(self, labels: Tensor, ignore_index: int, with_entropy: bool
               ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(logp, entropy or None, lse); ignored rows give 0."""
        valid = labels != ignore_index
        log_s = torch.log(self.s)
        zero = torch.zeros(())
        lse = torch.where(valid, self.m + log_s, zero)
        logp = torch.where(valid, self.zy - lse, zero)
        ent = torch.where(valid, log_s - self.a / self.s, zero) if with_entropy else None
        return logp, ent, lse


@torch.no_grad()
def linear_token_logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
    with_entropy: bool, *, config: Config | None = None, transform: HeadTransform | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(logp[N], entropy[N] or None, lse[N]) float32 of the transformed logits (None: no
    transform); peak extra memory O(N d + block)."""
    cfg = config or default_config()
    _check_linear(hidden, weight, bias, labels)
    blk = _Blocks(hidden, weight, bias, cfg)
    run = _Running.start(blk.N)
    head = c.tf_kwargs(transform)
    for c0, c1, w, b in blk.cols():
        for r0, r1 in blk.rows():
            z = blk.logits(r0, r1, c0, c1, w, b)
            _C.block_forward(
                block=z.data_ptr(), rows=r1 - r0, cols=c1 - c0, ld=z.stride(0), col0=c0,
                labels=labels.data_ptr(), ignore_index=int(ignore_index),
                with_entropy=bool(with_entropy), **run.kwargs(), row_offset=r0,
                nthreads=c.threads(cfg.num_threads), **head,
            )
    return run.finish(labels, ignore_index, with_entropy)


@torch.no_grad()
def linear_token_logprobs_forward_frozen(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
    with_entropy: bool, *, config: Config | None = None, transform: HeadTransform | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None]:
    r"""Forward for a frozen weight: (logp, entropy or None, lse, pw[N, d], plw[N, d] or None).

    Head transforms: a pure scale (``temperature``, ``logit_scale``; no softcap) is exact
    here, ``p`` being the softmax of the scaled logits and dz'/dz the constant
    ``logit_scale / temperature``, which the op's backward applies to dL/dh. A softcap
    makes dz'/dz vary per logit, which ``pw`` / ``plw`` do not carry: it raises ValueError
    (the op takes the recompute path instead whenever a softcap is set).

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
    if (tf := active(transform)) is not None and tf.softcap is not None:
        raise ValueError("the frozen-weight forward is exact only without a softcap; use "
                         "linear_token_logprobs_forward and the recompute backward.")
    cfg = config or default_config()
    _check_linear(hidden, weight, bias, labels)
    blk = _Blocks(hidden, weight, bias, cfg)
    N, d = blk.N, hidden.shape[1]
    run = _Running.start(N)
    alpha, dm = torch.empty(N), torch.empty(N)
    acc = torch.zeros(N, d)
    acc2 = torch.zeros(N, d) if with_entropy else None
    ed_buf = torch.empty_like(blk.buf) if with_entropy else None
    head = c.tf_kwargs(transform)
    for c0, c1, w, b in blk.cols():
        for r0, r1 in blk.rows():
            z = blk.logits(r0, r1, c0, c1, w, b)
            ed = ed_buf[: z.numel()].view_as(z) if ed_buf is not None else None
            _C.block_forward_frozen(
                block=z.data_ptr(), rows=r1 - r0, cols=c1 - c0, ld=z.stride(0), col0=c0,
                labels=labels.data_ptr(), ignore_index=int(ignore_index),
                with_entropy=bool(with_entropy), **run.kwargs(), alpha=alpha.data_ptr(),
                dm=dm.data_ptr(), ed=c.addr(ed), ld_ed=ed.stride(0) if ed is not None else 0,
                row_offset=r0, nthreads=c.threads(cfg.num_threads), **head,
            )
            al = alpha[r0:r1, None]
            if acc2 is not None:  # uses the old acc: update acc2 first
                acc2[r0:r1].addcmul_(dm[r0:r1, None], acc[r0:r1]).mul_(al).addmm_(ed, w)
            acc[r0:r1].mul_(al).addmm_(z, w)  # z now holds e = exp(z - m_new)
    logp, ent, lse = run.finish(labels, ignore_index, with_entropy)
    # ignored rows have s = 0 (and acc = 0): keep them at 0, not 0/0
    valid = (labels != ignore_index)[:, None]
    inv_s = torch.where(valid, 1.0 / run.s[:, None], torch.zeros(()))
    pw = acc.mul_(inv_s)
    plw = None
    if acc2 is not None:
        log_s = torch.where(valid, torch.log(run.s)[:, None], torch.zeros(()))
        plw = acc2.mul_(inv_s).sub_(pw * log_s)
    return logp, ent, lse, pw, plw


class _GradBuffers:
    """The requested gradients of one backward, with float32 staging where needed."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, blk: _Blocks,
                 needs: tuple[bool, bool, bool]) -> None:
        nh, nw, nb = needs
        self.gh = torch.zeros(hidden.shape, dtype=torch.float32) if nh else None
        self.gw = torch.empty_like(weight) if nw else None
        self.gb = torch.empty_like(bias) if (nb and bias is not None) else None
        # float32 staging for one block of grad_weight when it is not float32 itself
        self.gw_acc = None
        if self.gw is not None and self.gw.dtype != torch.float32:
            self.gw_acc = torch.empty(blk.bc, weight.shape[1], dtype=torch.float32)
        self.gb_acc = torch.zeros(weight.shape[0]) if self.gb is not None else None

    def any(self) -> bool:
        return self.gh is not None or self.gw is not None or self.gb is not None

    def weight_block(self, c0: int, c1: int) -> Tensor | None:
        if self.gw is None:
            return None
        return self.gw[c0:c1] if self.gw_acc is None else self.gw_acc[: c1 - c0]

    def add(self, dz: Tensor, h: Tensor, w: Tensor, gw_blk: Tensor | None, first: bool,
            r0: int, r1: int, c0: int, c1: int) -> None:
        """Accumulate one float32 dL/dz block ``dz`` (rows r0:r1, columns c0:c1), all in
        float32; ``first``: the first row block of these columns."""
        consume_dz(dz, h[r0:r1], w, gw_blk, None if self.gh is None else self.gh[r0:r1], None,
                   None if self.gb_acc is None else self.gb_acc[c0:c1], first)

    def finish(self, hidden: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if self.gb is not None:
            self.gb.copy_(self.gb_acc)
        gh = self.gh
        if gh is not None and gh.dtype != hidden.dtype:
            gh = gh.to(hidden.dtype)
        return gh, self.gw, self.gb


@torch.no_grad()
def linear_token_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor,
    entropy: Tensor | None, grad_logp: Tensor, grad_entropy: Tensor | None, ignore_index: int,
    needs_hidden_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool,
    grad_skip_threshold: float = 0.0, *, config: Config | None = None,
    transform: HeadTransform | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_hidden, grad_weight, grad_bias), each None unless asked for, in input dtypes.

    Recomputes each logits block, overwrites it with dL/dz in C++ and accumulates the
    products in float32. ``grad_skip_threshold`` is ignored on the CPU: every block is
    computed, so the result is exact (no skipped tiles, no approximation). With
    ``transform`` the C++ kernel transforms each block as it reads it and stores dL/dz' times
    dz'/dz (ignored rows 0).
    """
    del grad_skip_threshold
    cfg = config or default_config()
    _check_linear(hidden, weight, bias, labels)
    c.check_saved(hidden.shape[0], lse, entropy, grad_logp, grad_entropy)
    blk = _Blocks(hidden, weight, bias, cfg)
    g = _GradBuffers(hidden, weight, bias, blk,
                     (needs_hidden_grad, needs_weight_grad, needs_bias_grad))
    if not g.any():
        return None, None, None
    per_row = dict(labels=labels.data_ptr(), lse=lse.data_ptr(), grad_logp=grad_logp.data_ptr(),
                   entropy=c.addr(entropy) if grad_entropy is not None else 0,
                   grad_entropy=c.addr(grad_entropy))
    head = c.tf_kwargs(transform)
    for c0, c1, w, b in blk.cols():
        gw_blk = g.weight_block(c0, c1)
        for i, (r0, r1) in enumerate(blk.rows()):
            z = blk.logits(r0, r1, c0, c1, w, b)
            rows, cols = z.shape
            # in place: z becomes dL/dz of this block (label columns offset by c0)
            _C.token_logprobs_backward(
                logits=z.data_ptr(), dtype=_C.DType.float32, B=1, T=rows, V=cols,
                stride_b=rows * z.stride(0), stride_t=z.stride(0), stride_v=1,
                grad_out=z.data_ptr(), out_stride_b=rows * z.stride(0),
                out_stride_t=z.stride(0), out_stride_v=1, label_offset=c0,
                ignore_index=int(ignore_index), **per_row, row_offset=r0,
                nthreads=c.threads(cfg.num_threads), **head,
            )
            g.add(z, blk.h, w, gw_blk, i == 0, r0, r1, c0, c1)
        if g.gw_acc is not None:
            g.gw[c0:c1] = gw_blk
    return g.finish(hidden)


__all__ = ["Config", "default_config", "linear_token_logprobs_backward",
           "linear_token_logprobs_forward", "linear_token_logprobs_forward_frozen",
           "override_config"]
