r"""Exact objectives over an effective batch that is larger than one backward pass.

A weighted objective couples its rows: the self-normalized weights are a softmax over the
whole batch, the clipped scheme's cut depends on each row's weight, and every scheme
averages over all rows. Under gradient accumulation (a micro-batches per optimizer step) and
data parallelism (N ranks), computing the loss per micro-batch and averaging gives a
*different estimator* (for self-normalization, a per-micro-batch softmax). The objective we
want is the one over the effective batch of all N * a micro-batches.

Every objective here depends on the parameters only through the rows' sequence
log-probabilities s_i (outcome rows) and s'_j (direct-method rows), so by the chain rule

    dL/dtheta = sum_i c_i ds_i/dtheta + sum_j c'_j ds'_j/dtheta,    c_i = dL/ds_i,  c'_j = dL/ds'_j

with c and c' evaluated at the current parameters over the *effective* batch. That gives a
two-pass step whose memory is that of one micro-batch:

1. no-grad pass: every micro-batch on every rank computes s_i (and s'_j) and keeps the
   per-row scalars (s, log P^R, y, ghat): O(rows) numbers;
2. :func:`row_coefficients` gathers those scalars from all ranks, evaluates the full-batch
   objective once on detached leaves and differentiates it (autograd, so it is exact for
   every weighting scheme, including the clipped scheme's cut rows), and returns this rank's
   c and c' together with the global :class:`~cpo_fast.objectives.LossOutput` (ESS and the
   other diagnostics are then those of the effective batch);
3. each micro-batch recomputes s_i with gradients and backpropagates
   :func:`surrogate` = sum_i c_i s_i + sum_j c'_j s'_j. Gradient accumulation sums these;
   the coefficients are pre-multiplied by the world size because DDP and FSDP *average*
   gradients over ranks.

For the self-normalized scheme this is the familiar form
c_i = -W_i (a_i - abar_W) / n with W = n softmax(ell) and abar_W = sum_k W_k a_k / n over
the effective batch (docs/math.md derives it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cpo_fast.objectives import LossOutput, cap_log_weights, dr_cpo_loss


@dataclass
class RowCoefficients:
    """dL/ds for this rank's rows (scaled for DDP averaging) and the global diagnostics."""

    policy: Tensor | None  # c_i for this rank's outcome rows, in their order
    dm: Tensor | None  # c'_j for this rank's DM rows
    output: LossOutput  # the effective batch's loss and diagnostics (detached)
    world_size: int = 1


def _world(across_ranks: bool = True) -> tuple[int, int]:
    if across_ranks and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: Tensor, across_ranks: bool = True) -> tuple[Tensor, slice]:
    """Concatenate a 1-D tensor over ranks in rank order (sizes may differ).

    Returns the global tensor and the slice that holds this rank's rows.
    """
    rank, world = _world(across_ranks)
    if world == 1:
        return x, slice(0, x.shape[0])
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    width = max(counts)
    padded = torch.zeros(width, device=x.device, dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    start = sum(counts[:rank])
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]), slice(start, start + counts[rank])


def _gather_opt(x: Tensor | None, across_ranks: bool) -> tuple[Tensor | None, slice | None]:
    if x is None:
        return None, None
    g, part = gather_rows(x.detach(), across_ranks)
    return g, part


def row_coefficients(
    policy_logp: Tensor | None,
    ref_logp: Tensor | None,
    outcome: Tensor | None,
    outcome_pred: Tensor | None = None,
    *,
    dm_policy_logp: Tensor | None = None,
    dm_ref_logp: Tensor | None = None,
    dm_outcome_pred: Tensor | None = None,
    log_weight_cap: float = 0.0,
    across_ranks: bool = True,
    **loss_kwargs: Any,
) -> RowCoefficients:
    """Coefficients c = dL/ds of :func:`~cpo_fast.objectives.dr_cpo_loss` over the effective batch.

    Pass this rank's rows of *all* its micro-batches (detached values from a no-grad pass,
    concatenated in micro-batch order); the same arguments and keywords as ``dr_cpo_loss``
    (``distributed`` is not accepted: the effective batch is gathered here). With
    ``policy_logp=None`` (OO-RLHF) only the DM rows get coefficients.
    ``log_weight_cap > 0`` caps every row's log weight around the effective batch's median
    (:func:`~cpo_fast.objectives.cap_log_weights`, as :func:`~cpo_fast.objectives.assemble_loss`
    does on one batch). ``across_ranks=False``: this process's rows are the whole effective
    batch even when torch.distributed is initialized (no collective is called).
    """
    if "distributed" in loss_kwargs:
        raise ValueError("row_coefficients gathers the effective batch itself: drop distributed=.")
    _, world = _world(across_ranks)
    s, part = _gather_opt(policy_logp, across_ranks)
    ref, _ = _gather_opt(ref_logp, across_ranks)
    y, _ = _gather_opt(outcome, across_ranks)
    g, _ = _gather_opt(outcome_pred, across_ranks)
    s_dm, part_dm = _gather_opt(dm_policy_logp, across_ranks)
    ref_dm, _ = _gather_opt(dm_ref_logp, across_ranks)
    g_dm, _ = _gather_opt(dm_outcome_pred, across_ranks)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (s, s_dm)]
    sn = loss_kwargs.get("weighting", "self_normalized") == "self_normalized"
    with torch.enable_grad():
        capped = [None if t is None else cap_log_weights(t, r, log_weight_cap, self_normalized=sn)
                  for t, r in ((leaves[0], ref), (leaves[1], ref_dm))]
        out = dr_cpo_loss(capped[0], ref, y, g, dm_policy_logp=capped[1], dm_ref_logp=ref_dm,
                          dm_outcome_pred=g_dm, distributed=False, **loss_kwargs)
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out.loss, wanted, allow_unused=True)
    grads = iter(grads)
    coef = []
    for leaf, sl in zip(leaves, (part, part_dm), strict=True):
        if leaf is None:
            coef.append(None)
            continue
        gr = next(grads)
        gr = torch.zeros_like(leaf) if gr is None else gr
        coef.append(gr[sl] * world)  # DDP/FSDP average gradients over ranks
    out.loss = out.loss.detach()
    return RowCoefficients(coef[0], coef[1], out, world)


def surrogate(coef: Tensor | None, policy_logp: Tensor | None,
              dm_coef: Tensor | None = None, dm_policy_logp: Tensor | None = None) -> Tensor:
    """sum_i c_i s_i + sum_j c'_j s'_j for one micro-batch's rows (coefficients detached).

    Its value is not the loss (report ``RowCoefficients.output.loss``); its gradient, summed
    over micro-batches and averaged over ranks, is the effective batch's exact gradient.
    """
    terms = []
    for c, s, name in ((coef, policy_logp, "policy_logp"), (dm_coef, dm_policy_logp, "dm_policy_logp")):
        if c is None and s is None:
            continue
        if c is None or s is None or c.shape != s.shape:
            raise ValueError(
                f"surrogate: {name} and its coefficients must both be given with the same shape, "
                f"got {None if s is None else tuple(s.shape)} and "
                f"{None if c is None else tuple(c.shape)}; slice the coefficients to the "
                "micro-batch's rows.")
        terms.append((c.detach().to(s.dtype) * s).sum())
    if not terms:
        raise ValueError("surrogate: nothing to differentiate (no policy_logp and no dm_policy_logp).")
    return torch.stack(terms).sum()


def split_rows(coef: Tensor | None, sizes: list[int]) -> list[Tensor | None]:
    """Cut this rank's coefficients back into its micro-batches (``sizes`` rows each)."""
    if coef is None:
        return [None] * len(sizes)
    if sum(sizes) != coef.shape[0]:
        raise ValueError(f"split_rows: micro-batch sizes {sizes} do not add up to {coef.shape[0]} rows.")
    return list(torch.split(coef, sizes))


__all__ = ["RowCoefficients", "gather_rows", "row_coefficients", "split_rows", "surrogate"]
