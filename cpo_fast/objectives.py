"""The training methods and their losses on per-token inputs: the method table, the per-row
values an estimator reads, the regularizers, and :class:`Objective`, the one place a
training step's loss is put together (the pipeline's loop, the Hugging Face mixin, the TRL
trainer and ``DRCPOLoss`` all use it; cpo_fast/effective_batch.py differentiates it over an
effective batch larger than one backward pass).

The estimators themselves (CPO, DR-CPO, OO-RLHF and their weighting schemes, on
per-sequence tensors) are cpo_fast/estimators.py's. All losses are minimized.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from cpo_fast._checks import index_list
from cpo_fast.constants import CLIP_EPS, MAX_LOG_WEIGHT, TRUNCATION
from cpo_fast.distributed import distributed_flag
from cpo_fast.estimators import (
    LossOutput,
    cap_log_weights,
    check_loss_finite,
    dr_cpo_loss,
    oo_rlhf_loss,
    temper_log_weights,
)
from cpo_fast.models import TokenBatch


@dataclass(frozen=True)
class Method:
    """What a training method reads and optimizes."""

    name: str
    label: str  # as tables print it
    weighted: bool  # an importance-weighted estimator (else SFT: the mean token NLL)
    outcome_rows: bool  # reads the outcome rows (texts with y and log P^R)
    dm_rows: bool  # reads the direct-method set (f_0's texts with ghat)
    residual: bool = False  # the outcome rows' target is y - ghat (DR-CPO)
    top_quantile: bool = False  # trains on the best outcomes only (SFT-top)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft_all", "SFT-all", weighted=False, outcome_rows=True, dm_rows=False),
    Method("sft_top", "SFT-top", weighted=False, outcome_rows=True, dm_rows=False,
           top_quantile=True),
    Method("oo_rlhf", "OO-RLHF", weighted=True, outcome_rows=False, dm_rows=True),
    Method("cpo", "CPO", weighted=True, outcome_rows=True, dm_rows=False),
    Method("dr_cpo", "DR-CPO", weighted=True, outcome_rows=True, dm_rows=True, residual=True),
)}
"""The method table: every place that asks "which rows, which loss" reads it."""


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {tuple(METHODS)}.")
    return METHODS[name]


def _masked(t: Tensor, m: Tensor) -> Tensor:
    """t where the mask is nonzero, else 0: a NaN or inf on a masked-out position (padding)
    must not reach the sum, nor the gradient (0 * NaN is NaN)."""
    return torch.where(m != 0, t, torch.zeros((), dtype=t.dtype, device=t.device))


def sequence_logprobs(token_logp: Tensor, mask: Tensor, *, length_normalize: bool = False) -> Tensor:
    """s_i = sum_t m_t logp_t over ``[B, T]`` (or the mean over masked tokens)."""
    if token_logp.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token_logp shape {tuple(token_logp.shape)}.")
    m = mask.to(token_logp.dtype)
    s = (_masked(token_logp, m) * m).sum(-1)
    return s / m.sum(-1).clamp_min(1) if length_normalize else s


def sft_loss(token_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over masked tokens (the SFT baselines)."""
    m = mask.to(token_logp.dtype)
    return -(_masked(token_logp, m) * m).sum() / m.sum().clamp_min(1)


def top_quantile_mask(outcome: Tensor, quantile: float = 0.75, *, higher_is_better: bool = True) -> Tensor:
    """Rows in the best ``1 - quantile`` of outcomes (the SFT-top baseline's selection)."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}.")
    y = outcome if higher_is_better else -outcome
    return y >= torch.quantile(y.double(), quantile).to(y.dtype)


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float) -> Tensor:
    """``-c_H * mean_t H_t`` over masked tokens."""
    m = mask.to(entropy.dtype)
    return -coef * (_masked(entropy, m) * m).sum() / m.sum().clamp_min(1)


def kl_penalty(token_logp: Tensor, ref_token_logp: Tensor, mask: Tensor, coef: float = 1.0) -> Tensor:
    """``coef * mean_t (exp(r_t) - r_t - 1)``, r_t = ref_logp_t - logp_t (k3 estimator)."""
    m = mask.to(token_logp.dtype)
    r = _masked(ref_token_logp.to(token_logp.dtype) - token_logp, m)
    return coef * ((torch.expm1(r) - r) * m).sum() / m.sum().clamp_min(1)


@dataclass(frozen=True)
class Objective:
    """A method's loss with its settings: what one training step minimizes.

    ``weighting``, ``higher_is_better``, ``max_log_weight``, ``truncation`` and ``clip_eps``
    go to :func:`~cpo_fast.estimators.dr_cpo_loss`. Sequence log-probabilities are the
    masked sums of the token ones (means with ``length_normalize``); a batch's
    ``log_propensity``, when given, is log P^R(x) as is. ``log_weight_cap > 0`` caps each
    row's log weight around the batch median (:func:`~cpo_fast.estimators.cap_log_weights`);
    ``ess_target > 0`` then tempers each weighted set's log weights (outcome rows, DM rows)
    by the largest tau in [0, 1] that keeps its ESS at ``ess_target`` of its rows
    (:func:`~cpo_fast.estimators.temper_log_weights`; tau is reported in the diagnostics).
    Regularizers, added to the loss: ``entropy_coef * entropy_bonus`` (needs entropies) and
    ``kl_coef * kl_penalty`` (needs ``ref_logp``), token means over the outcome rows, or
    over the DM rows when ``regularize_on="dm"`` and there are any (the pipeline's choice:
    the DM set is what the policy is optimized on). The diagnostics exclude them.
    """

    method: str = "dr_cpo"
    weighting: str = "self_normalized"
    higher_is_better: bool = True
    length_normalize: bool = False
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    regularize_on: str = "batch"
    log_weight_cap: float = 0.0
    max_log_weight: float = MAX_LOG_WEIGHT
    truncation: float = TRUNCATION
    clip_eps: float | tuple[float, float] = CLIP_EPS
    ess_target: float = 0.0

    def __post_init__(self) -> None:
        method_of(self.method)
        if not 0.0 <= self.ess_target <= 1.0:
            raise ValueError(f"ess_target={self.ess_target} must be an ESS share in [0, 1] "
                             "(0: no tempering; 0.5 keeps half the rows' worth of weight).")
        if self.regularize_on not in ("batch", "dm"):
            raise ValueError(f"regularize_on={self.regularize_on!r} must be 'batch' or 'dm'.")

    @classmethod
    def from_kwargs(cls, method: str = "dr_cpo", **settings) -> Objective:
        """``Objective(method, **settings)`` naming an unknown setting in its error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown loss setting(s) {unknown}; known: {sorted(known - {'method'})}.")
        return cls(method, **settings)

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def sequence(self, tb: TokenBatch, t: Tensor) -> Tensor:
        """s_i of token tensor ``t`` (the policy's or the reference's) over ``tb``'s mask."""
        return sequence_logprobs(t, tb.mask, length_normalize=self.length_normalize)

    def row_values(self, batch: TokenBatch | None,
                   dm: TokenBatch | None = None) -> dict[str, Tensor | None]:
        """The per-row scalars the estimator reads, named as dr_cpo_loss's arguments: all an
        effective batch's no-grad pass keeps of a micro-batch (O(rows) numbers)."""
        spec, rows = self.spec, {}
        if spec.outcome_rows:
            if batch is None or batch.outcome is None:
                raise ValueError(f"method={self.method!r} needs the outcome rows' TokenBatch "
                                 "with outcome (y).")
            ref = batch.log_propensity
            if ref is None:
                if batch.ref_logp is None:
                    raise ValueError("batch needs ref_logp (token log-probs of f_0) or "
                                     "log_propensity.")
                ref = self.sequence(batch, batch.ref_logp)
            rows.update(policy_logp=self.sequence(batch, batch.logp), ref_logp=ref,
                        outcome=batch.outcome,
                        outcome_pred=batch.outcome_pred if spec.residual else None)
        if dm is not None:
            if not spec.dm_rows:
                raise ValueError(f"method={self.method!r} takes no DM batch (use 'dr_cpo').")
            if dm.ref_logp is None or dm.outcome_pred is None:
                raise ValueError("the DM TokenBatch needs ref_logp and outcome_pred (ghat).")
            rows.update(dm_policy_logp=self.sequence(dm, dm.logp),
                        dm_ref_logp=self.sequence(dm, dm.ref_logp), dm_outcome_pred=dm.outcome_pred)
        elif not spec.outcome_rows:
            raise ValueError(f"method={self.method!r} needs the dm TokenBatch.")
        return rows

    def rows_loss(self, rows: dict[str, Tensor | None], *,
                  distributed: bool | None = None) -> LossOutput:
        """The estimator on per-row values (:meth:`row_values`' keys), log weights capped,
        then tempered."""
        kw = dict(weighting=self.weighting, higher_is_better=self.higher_is_better,
                  max_log_weight=self.max_log_weight, truncation=self.truncation,
                  clip_eps=self.clip_eps, distributed=distributed)
        dm, dm_tau = {}, None
        if rows.get("dm_policy_logp") is not None:
            s_dm, dm_tau = self._log_weights(rows["dm_policy_logp"], rows["dm_ref_logp"],
                                             distributed)
            dm = dict(dm_policy_logp=s_dm, dm_ref_logp=rows["dm_ref_logp"],
                      dm_outcome_pred=rows["dm_outcome_pred"])
        if rows.get("policy_logp") is None:
            out = oo_rlhf_loss(**dm, **kw)
            out.ess_tau = out.dm_ess_tau = dm_tau  # OO-RLHF's diagnostics are its DM rows'
            return out
        s, tau = self._log_weights(rows["policy_logp"], rows["ref_logp"], distributed)
        out = dr_cpo_loss(s, rows["ref_logp"], rows["outcome"], rows.get("outcome_pred"),
                          **dm, **kw)
        out.ess_tau, out.dm_ess_tau = tau, dm_tau
        return out

    def _log_weights(self, policy_logp: Tensor, ref_logp: Tensor,
                     distributed: bool | None) -> tuple[Tensor, float | None]:
        """The policy's sequence log-probs as the estimator takes them: capped, tempered."""
        s = cap_log_weights(policy_logp, ref_logp, self.log_weight_cap,
                            self_normalized=self.weighting == "self_normalized")
        if not self.ess_target:
            return s, None
        return temper_log_weights(s, ref_logp, self.ess_target,
                                  distributed=distributed_flag(distributed))

    def regularized(self, batch: TokenBatch | None, dm: TokenBatch | None) -> TokenBatch:
        """The rows the entropy and KL terms run over."""
        use_dm = dm is not None and (self.regularize_on == "dm" or batch is None)
        return dm if use_dm else batch

    def regularizer_terms(self, tb: TokenBatch) -> list[Tensor]:
        """entropy_coef * entropy bonus and kl_coef * KL (k3), token means over ``tb``: the
        terms whose coefficients are set."""
        terms = []
        if self.entropy_coef and tb.entropy is not None:
            terms.append(entropy_bonus(tb.entropy, tb.mask, self.entropy_coef))
        if self.kl_coef:
            if tb.ref_logp is None:
                raise ValueError("kl_coef > 0 needs the reference token log-probs (ref_logp).")
            terms.append(kl_penalty(tb.logp, tb.ref_logp, tb.mask, self.kl_coef))
        return terms

    def loss(self, batch: TokenBatch | None, dm: TokenBatch | None = None, *,
             distributed: bool | None = None) -> LossOutput:
        """The loss of one batch (and its DM rows) with its diagnostics; SFT methods fill
        ``loss`` only. ``distributed``: self-normalize over all ranks' rows (None: when a
        process group is up)."""
        if self.spec.weighted:
            out = self.rows_loss(self.row_values(batch, dm), distributed=distributed)
        else:
            if batch is None:
                raise ValueError(f"method={self.method!r} needs the batch TokenBatch.")
            out = LossOutput(loss=sft_loss(batch.logp, batch.mask))
        for term in self.regularizer_terms(self.regularized(batch, dm)):
            out.loss = out.loss + term
        if not bool(torch.isfinite(out.loss.detach())):
            _raise_nonfinite_tokens(out.loss, {"batch": batch, "dm": dm})
        return out


def assemble_loss(method: str, batch: TokenBatch | None, dm: TokenBatch | None = None, *,
                  distributed: bool | None = None, **settings) -> LossOutput:
    """``Objective(method, **settings).loss(batch, dm)``: the training loss of ``method``
    from per-token tensors, with its diagnostics (see :class:`Objective`)."""
    return Objective.from_kwargs(method, **settings).loss(batch, dm, distributed=distributed)


def _raise_nonfinite_tokens(loss: Tensor, batches: dict[str, TokenBatch | None]) -> None:
    """Name the (row, token) positions whose NaN / inf made the loss non-finite."""
    found = []
    for bname, b in batches.items():
        if b is None:
            continue
        for field in ("logp", "ref_logp", "entropy"):
            t = getattr(b, field)
            if t is None:
                continue
            bad = ~torch.isfinite(t.detach()) & (b.mask != 0)
            if bool(bad.any()):
                found.append(f"{bname}.{field} at (row, token) {index_list(bad)}")
    if found:
        raise ValueError(f"the loss is {loss.item()}: non-finite values on counted tokens in "
                         + "; ".join(found) + ". Fix the model output / data there, or mask "
                         "those tokens out.")
    check_loss_finite(loss, "token log-probs, entropies or reference log-probs")


class DRCPOLoss(nn.Module):
    """Module form of :class:`Objective` (method ``dr_cpo``, regularizers on the outcome rows).

    ``forward(policy_token_logp, mask, ref_token_logp, outcome, outcome_pred=None,
    entropy=None, dm=None, log_propensity=None)`` takes per-token ``[B, T]`` tensors (``dm``:
    a dict with ``policy_token_logp``, ``mask``, ``ref_token_logp``, ``outcome_pred``) and
    returns the LossOutput.
    """

    def __init__(self, weighting: str = "self_normalized", **settings) -> None:
        super().__init__()
        self.objective = Objective.from_kwargs("dr_cpo", weighting=weighting, **settings)

    def forward(self, policy_token_logp: Tensor, mask: Tensor, ref_token_logp: Tensor,
                outcome: Tensor, outcome_pred: Tensor | None = None, entropy: Tensor | None = None,
                dm: dict | None = None, log_propensity: Tensor | None = None) -> LossOutput:
        batch = TokenBatch(policy_token_logp, mask, ref_token_logp, entropy, outcome,
                           outcome_pred, log_propensity)
        dm_batch = None
        if dm is not None:
            dm_batch = TokenBatch(dm["policy_token_logp"], dm["mask"], dm["ref_token_logp"],
                                  outcome_pred=dm["outcome_pred"])
        return self.objective.loss(batch, dm_batch)


__all__ = [
    "METHODS", "DRCPOLoss", "Method", "Objective", "assemble_loss", "entropy_bonus",
    "kl_penalty", "method_of", "sequence_logprobs", "sft_loss", "top_quantile_mask",
]
