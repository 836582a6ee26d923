"""One optimizer step's gradient, exact over the *effective batch*: every micro-batch of the
step on every rank (docs/scale-out.md; the derivation is cpo_fast/effective_batch.py and
docs/math.md section 6.2).

A weighted objective couples its rows (the self-normalized weights are a softmax over the
batch, the clipped scheme cuts rows by their weight, the log-weight cap centres on the batch
median), so backpropagating each micro-batch's own loss would optimize another estimator.
:func:`effective_gradient` accumulates into ``.grad`` the gradient of the loss of the whole
effective batch, with the memory of one micro-batch:

    one micro-batch in all   the plain loss of that batch (it *is* the effective batch)
    SFT (no coupling)        each micro-batch's token sum / the effective batch's token count
    CPO, DR-CPO, OO-RLHF     two passes:
      1. no grad               every micro-batch's per-row scalars (s_i, log P^R, y, ghat, and
                               the DM rows'), O(rows) numbers
      2. coefficients          row_coefficients gathers them over the ranks and differentiates
                               the effective batch's objective: c_i = dL/ds_i (x world size)
      3. backward              per micro-batch, surrogate sum_i c_i s_i (+ the token-level
                               regularizers / the effective batch's token count), the RNG
                               replayed so dropout draws the masks of pass 1

Gradients follow DDP's convention: each rank's is world-size times its share, and the loop
averages them over ranks (runtime.average_gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.effective_batch import row_coefficients, split_rows, surrogate
from cpo_fast.objectives import LossOutput
from cpo_fast.pipeline.config import RunConfig
from cpo_fast.pipeline.loss import (
    compute_loss,
    regularized,
    regularizers,
    row_values,
    sequence_values,
    token_batches,
)
from cpo_fast.pipeline.runtime import World, rng_replay, rng_snapshot, sum_over_ranks

SFT_METHODS = ("sft_all", "sft_top")
Micro = list[tuple[dict, dict | None]]


@dataclass
class StepResult:
    """The effective batch's loss (objective + regularizers), its diagnostics (None for
    SFT) and the tokens all ranks processed."""

    loss: float
    out: LossOutput | None
    tokens: int


def effective_gradient(model, micro: Micro, cfg: RunConfig, world: World, autocast: dict,
                       step: int) -> StepResult:
    """Accumulate the effective batch's gradient into ``.grad`` (``micro``: this rank's
    micro-batches of the step, from batches.step_micro_batches); see the module docstring."""
    if world.size * len(micro) == 1:
        batch, dm_batch = micro[0]
        with torch.autocast(**autocast):
            loss, out = compute_loss(model, batch, dm_batch, cfg, cfg.method)
        check_finite(loss, step, batch)
        loss.backward()
        return StepResult(float(loss.detach()), out, _tokens(micro))
    if cfg.method in SFT_METHODS:
        return _token_mean_gradient(model, micro, cfg, world, autocast, step)
    return _two_pass_gradient(model, micro, cfg, world, autocast, step)


def _tokens(micro: Micro) -> int:
    return sum(int(b["attention_mask"].sum()) for pair in micro for b in pair if b)


def _counted(b: dict | None) -> int:
    return 0 if b is None else int((b["labels"] != IGNORE_INDEX).sum())


def _token_mean_gradient(model, micro: Micro, cfg: RunConfig, world: World, autocast: dict,
                         step: int) -> StepResult:
    """SFT: the mean token NLL (and regularizers) over all the effective batch's tokens."""
    tokens, n_total = sum_over_ranks(world, [_tokens(micro), sum(_counted(b) for b, _ in micro)])
    total = 0.0
    for batch, dm_batch in micro:
        with torch.autocast(**autocast):
            loss, _ = compute_loss(model, batch, dm_batch, cfg, cfg.method)
        check_finite(loss, step, batch)
        share = _counted(batch) / max(n_total, 1.0)  # this micro-batch's share of the tokens
        (loss * (share * world.size)).backward()
        total += float(loss.detach()) * share
    return StepResult(sum_over_ranks(world, [total])[0], None, int(tokens))


def _two_pass_gradient(model, micro: Micro, cfg: RunConfig, world: World, autocast: dict,
                       step: int) -> StepResult:
    """CPO / DR-CPO / OO-RLHF: no-grad row scalars, coefficients, surrogate backward."""
    rng = rng_snapshot(next(model.parameters()).device)
    rows: dict[str, list] = {}
    with torch.no_grad(), torch.autocast(**autocast):  # 1. the rows' scalars
        for batch, dm_batch in micro:
            main, dm = token_batches(model, batch, dm_batch, cfg, cfg.method, with_entropy=False)
            for k, v in row_values(main, dm, cfg, cfg.method).items():
                rows.setdefault(k, []).append(v)
    cat = {k: None if v[0] is None else torch.cat(v) for k, v in rows.items()}
    rc = row_coefficients(  # 2. the effective batch's dL/ds, gathered over the ranks
        cat.pop("policy_logp", None), cat.pop("ref_logp", None), cat.pop("outcome", None),
        **cat, log_weight_cap=cfg.log_weight_cap, across_ranks=world.distributed,
        weighting=cfg.weighting, higher_is_better=cfg.higher_is_better,
        max_log_weight=cfg.max_log_weight, truncation=cfg.truncation, clip_eps=cfg.clip_eps)
    coef = split_rows(rc.policy, [len(b["index"]) for b, _ in micro])
    dm_coef = split_rows(rc.dm, [0 if d is None else len(d["input_ids"]) for _, d in micro])
    reg_dm = cfg.method != "cpo"  # the regularizers run over the DM rows when there are any
    tokens, n_reg = sum_over_ranks(world, [_tokens(micro),
                                           sum(_counted(d if reg_dm else b) for b, d in micro)])
    rng_replay(rng, next(model.parameters()).device)
    reg_total = 0.0
    for (batch, dm_batch), c, c_dm in zip(micro, coef, dm_coef, strict=True):  # 3. backward
        with torch.autocast(**autocast):
            main, dm = token_batches(model, batch, dm_batch, cfg, cfg.method)
            loss = surrogate(c, sequence_values(main, cfg), c_dm, sequence_values(dm, cfg))
            reg = regularizers(regularized(main, dm), cfg)
        if reg is not None:
            share = _counted(dm_batch if reg_dm else batch) / max(n_reg, 1.0)
            loss = loss + reg * (share * world.size)
            reg_total += float(reg.detach()) * share
        check_finite(loss, step, batch)
        loss.backward()
    reg_total = sum_over_ranks(world, [reg_total])[0] if cfg.entropy_coef or cfg.kl_coef else 0.0
    return StepResult(float(rc.output.loss) + reg_total, rc.output, int(tokens))


def check_finite(loss: torch.Tensor, step: int, batch: dict) -> None:
    if not torch.isfinite(loss.detach()).all():
        rows = batch["index"].tolist()
        raise ValueError(f"step {step}: the loss is {float(loss.detach())} (not finite) on the "
                         f"micro-batch of row positions {rows}; lower --lr or --max-log-weight, "
                         "or check those rows.")
