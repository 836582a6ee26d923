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

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cpo_fast import models
from cpo_fast.distributed import (
    SINGLE,
    World,
    current_world,
    gather_rows,
    rng_replay,
    rng_snapshot,
    sum_over_ranks,
)
from cpo_fast.estimators import LossOutput
from cpo_fast.models import TokenBatch
from cpo_fast.objectives import Objective

Micro = tuple[dict | None, dict | None]  # batch dictionaries: (outcome rows, DM rows)
Pair = tuple[TokenBatch | None, TokenBatch | None]  # the same as TokenBatches


def _pair(micro: Micro, objective: Objective, tokens: Callable[[dict, int], TokenBatch]) -> Pair:
    """(outcome rows, DM rows) of a micro-batch, each ``tokens(batch, 0 or 1)`` or None where
    the method reads no such rows (or the DM inputs are absent: DR-CPO then uses the outcome
    rows as its DM set). The DM rows first: the order of the forward passes is part of
    bitwise resume."""
    inputs, dm_inputs = micro
    spec = objective.spec
    dm = tokens(dm_inputs, 1) if spec.dm_rows and dm_inputs is not None else None
    return (tokens(inputs, 0) if spec.outcome_rows else None), dm


def token_pair(model: Any, micro: Micro, objective: Objective, *, with_entropy: bool | None = None,
               backend: str | None = None, coef: tuple | None = None) -> Pair:
    """A micro-batch's TokenBatches (see :func:`_pair`). Entropies only when
    ``objective.entropy_coef > 0`` unless ``with_entropy`` says otherwise. ``coef``: per
    side, the loss's (dL/dlogp, dL/dH) when known before the forward (:func:`known_loss`)."""
    want_h = objective.entropy_coef > 0 if with_entropy is None else with_entropy
    return _pair(micro, objective, lambda b, i: models.token_batch(
        model, b, with_entropy=want_h, backend=backend, grad_coef=coef[i] if coef else None))


def known_loss(model: Any, micro: Micro, objective: Objective, loss_of: Callable[[Pair], Any], *,
               backend: str | None = None) -> Any:
    """``loss_of(token_pair(...))`` for a loss that is linear in the token log-probs and
    entropies (the surrogate of pass 2, SFT's token mean), with the head's gradient formed
    in its forward (no logits recompute when the head is trained; see
    :func:`cpo_fast.linear_token_logprobs`'s ``grad_coef``). The coefficients
    dL/dlogp_t and dL/dH_t do not depend on the values, so they are ``loss_of``'s gradient
    at zeros, by the same arithmetic as the real backward. A KL term is not linear in the
    log-probs: with ``kl_coef`` the plain forward runs. ``loss_of`` returns the loss or a
    tuple whose first item is the loss."""
    if objective.kl_coef:
        return loss_of(token_pair(model, micro, objective, backend=backend))
    want_h, leaves = objective.entropy_coef > 0, {}

    def zeros(b: dict, i: int) -> TokenBatch:
        lab = b["labels"]
        z = lambda: torch.zeros(lab.shape[0], lab.shape[1] - 1, device=lab.device,  # noqa: E731
                                requires_grad=True)
        leaves[i] = (z(), z() if want_h else None)
        return models.batch_of(b, *leaves[i])

    with torch.enable_grad():
        out = loss_of(_pair(micro, objective, zeros))
        flat = [t for pair in leaves.values() for t in pair if t is not None]
        grads = iter(torch.autograd.grad(out[0] if isinstance(out, tuple) else out, flat,
                                         allow_unused=True))
    coef: list = [None, None]
    for i, pair in leaves.items():
        coef[i] = tuple(None if t is None else _or_zeros(next(grads), t) for t in pair)
    return loss_of(token_pair(model, micro, objective, backend=backend, coef=tuple(coef)))


def _or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


@dataclass
class RowCoefficients:
    """dL/ds for this rank's rows (scaled for DDP averaging) and the global diagnostics."""

    policy: Tensor | None  # c_i for this rank's outcome rows, in their order
    dm: Tensor | None  # c'_j for this rank's DM rows
    output: LossOutput  # the effective batch's loss and diagnostics (detached)
    world_size: int = 1


def row_coefficients(rows: dict[str, Tensor | None], objective: Objective,
                     world: World | None = None) -> RowCoefficients:
    """Coefficients c = dL/ds of ``objective``'s estimator over the effective batch.

    ``rows``: this rank's per-row values of *all* its micro-batches (detached, from a no-grad
    pass, concatenated in micro-batch order), keyed as :meth:`Objective.row_values` returns
    them; without ``policy_logp`` (OO-RLHF) only the DM rows get coefficients. They are
    gathered over ``world`` (default: the process group's ranks; :data:`SINGLE`: this
    process's rows are the whole effective batch, no collective is called), the estimator
    (log-weight cap included) is evaluated once on detached leaves and differentiated.
    """
    world = current_world() if world is None else world
    whole, parts = {}, {}
    for k, v in rows.items():
        whole[k], parts[k] = (None, None) if v is None else gather_rows(v.detach(), world)
    keys = [k for k in ("policy_logp", "dm_policy_logp") if whole.get(k) is not None]
    leaves = {k: whole[k].clone().requires_grad_(True) for k in keys}
    with torch.enable_grad():
        out = objective.rows_loss({**whole, **leaves}, distributed=False)
        grads = torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True)
    coef: dict[str, Tensor] = {}
    for (k, leaf), g in zip(leaves.items(), grads, strict=True):
        g = torch.zeros_like(leaf) if g is None else g
        coef[k] = g[parts[k]] * world.size  # DDP/FSDP average gradients over ranks
    out.loss = out.loss.detach()
    return RowCoefficients(coef.get("policy_logp"), coef.get("dm_policy_logp"), out, world.size)


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


@dataclass
class Plan:
    """Pass 1's result for this rank's micro-batches: each one's coefficients and its share
    of the regularizers' token mean, and the effective batch's loss and diagnostics."""

    output: LossOutput
    coef: list[Tensor | None]
    dm_coef: list[Tensor | None]
    reg_scale: list[float]


def _rows(tb: TokenBatch | None) -> int:
    return 0 if tb is None else int(tb.logp.shape[0])


def _tokens(tb: TokenBatch | None) -> int:
    return 0 if tb is None else int(tb.mask.sum())


def plan(pairs: Sequence[Pair], objective: Objective, world: World | None = None) -> Plan:
    """Pass 1 (steps 1 and 2 above) from this rank's micro-batches' TokenBatches, computed
    without gradients: their row values, gathered over ``world``, differentiated once."""
    world = current_world() if world is None else world
    cols: dict[str, list] = {}
    for main, dm in pairs:
        for k, v in objective.row_values(main, dm).items():
            cols.setdefault(k, []).append(v)
    cat = {k: None if v[0] is None else torch.cat(v) for k, v in cols.items()}
    rc = row_coefficients(cat, objective, world)
    counts = [_tokens(objective.regularized(main, dm)) for main, dm in pairs]
    total = max(sum_over_ranks(world, [float(sum(counts))])[0], 1.0)
    return Plan(rc.output, split_rows(rc.policy, [_rows(m) for m, _ in pairs]),
                split_rows(rc.dm, [_rows(d) for _, d in pairs]),
                [n * world.size / total for n in counts])


def surrogate_loss(pair: Pair, objective: Objective, plan_: Plan, k: int) -> tuple[Tensor, float]:
    """Pass 2 of micro-batch ``k``: the surrogate plus its share of the regularizers, and
    that share's value (detached, for reporting)."""
    main, dm = pair
    seq = [None if tb is None else objective.sequence(tb, tb.logp) for tb in pair]
    loss = surrogate(plan_.coef[k], seq[0], plan_.dm_coef[k], seq[1])
    terms = objective.regularizer_terms(objective.regularized(main, dm))
    if not terms:
        return loss, 0.0
    reg = sum(terms[1:], terms[0]) * plan_.reg_scale[k]
    return loss + reg, float(reg.detach())


def effective_gradient(model: Any, micro: Sequence[Micro], objective: Objective,
                       world: World = SINGLE, *, backend: str | None = None,
                       context: Callable[[], Any] = nullcontext,
                       check: Callable[[Tensor, Micro], None] | None = None,
                       ) -> tuple[float, LossOutput | None]:
    """Accumulate into ``.grad`` the gradient of ``objective`` over the effective batch:
    this rank's micro-batches ``micro`` (batch dictionaries) on every rank of ``world``.
    Returns the effective batch's loss (objective + regularizers) and its diagnostics (None
    for SFT). ``context()`` wraps each forward (e.g. autocast); ``check(loss, micro_k)``
    sees each micro-batch's loss before its backward.

        one micro-batch in all   the plain loss of that batch (it *is* the effective batch)
        SFT (no coupling)        each micro-batch's token mean, weighted by its token share
        CPO, DR-CPO, OO-RLHF     the two passes above
    """
    check = check or (lambda loss, m: None)
    pairs = lambda m, **kw: token_pair(model, m, objective, backend=backend, **kw)  # noqa: E731
    if not objective.spec.weighted:
        return _token_mean_gradient(model, micro, objective, world, backend, context, check), None
    if world.size * len(micro) == 1:
        with context():
            out = objective.loss(*pairs(micro[0]), distributed=False)
        check(out.loss, micro[0])
        out.loss.backward()
        return float(out.loss.detach()), out
    device = next(model.parameters()).device
    rng = rng_snapshot(device)
    with torch.no_grad(), context():  # 1. the rows' scalars (no entropies needed)
        p = plan([pairs(m, with_entropy=False) for m in micro], objective, world)
    rng_replay(rng, device)  # pass 2 draws pass 1's dropout masks
    reg_total = 0.0
    for k, m in enumerate(micro):  # 3. backward, one micro-batch at a time
        with context():
            loss, reg = known_loss(model, m, objective,
                                   lambda pair, k=k: surrogate_loss(pair, objective, p, k),
                                   backend=backend)
        check(loss, m)
        loss.backward()
        reg_total += reg / world.size
    if objective.entropy_coef or objective.kl_coef:
        reg_total = sum_over_ranks(world, [reg_total])[0]
    return float(p.output.loss) + reg_total, p.output


def _token_mean_gradient(model, micro, objective, world, backend, context, check) -> float:
    """SFT: the mean token NLL (and regularizers) over all the effective batch's tokens (a
    loss linear in the log-probs: :func:`known_loss`)."""
    counts = [models.counted(m[0]) for m in micro]
    total = max(sum_over_ranks(world, [float(sum(counts))])[0], 1.0)
    value = 0.0
    for m, n in zip(micro, counts, strict=True):
        share = n / total * world.size
        with context():
            loss = known_loss(model, m, objective,
                              lambda pair, s=share: objective.loss(*pair, distributed=False).loss * s,
                              backend=backend)
        check(loss, m)
        loss.backward()
        value += float(loss.detach()) / world.size
    return sum_over_ranks(world, [value])[0]


__all__ = ["Plan", "RowCoefficients", "effective_gradient", "known_loss", "plan",
           "row_coefficients", "split_rows", "surrogate", "surrogate_loss", "token_pair"]
