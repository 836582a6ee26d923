"""Objectives over per-sequence quantities: CPO, DR-CPO, OO-RLHF, SFT, regularizers.

All minimized. Inputs are per-sequence tensors ``[B]`` (``policy_logp`` = s_i of the
policy, ``ref_logp`` = log P^R(x_i)); weights live in log space until the last step.
See docs/math.md; ``cpo_fast.reference`` is the row-by-row ground truth, with the same
function names and parameters.

Estimators:
  - CPO (IPW): ``L = -(1/n) sum_i W_i y_i``.
  - DR-CPO: ``L = -(1/n) sum_i W_i (y_i - ghat_i) - (1/m) sum_j W'_j ghat'_j``; the second
    sum runs over a separate "direct method" set (``dm_*`` arguments). Without a DM set
    the same rows are used (x'_j = x_i), which for the raw, self-normalized and truncated
    schemes makes the value equal to CPO's: pass a DM set to get the variance reduction.
  - OO-RLHF: only the second sum.
Weighting schemes: ``raw`` exp(ell) with ell clamped to [-M, M]; ``self_normalized``
n * softmax(ell) (SNIPS; over the global batch when distributed); ``clipped`` the PPO-style
min(W a, clip(W, 1-eps_lo, 1+eps_hi) a); ``truncated`` min(exp(ell), tau).

Diagnostics (ESS, max weight share) are computed from the log weights, relative to their
maximum, so they never overflow: float32 with log weights of 50 gives the float64 answer.
:func:`assemble_loss` is the one place where a training step's loss is put together from
per-token tensors (method, DM set, regularizers, length normalization); ``DRCPOLoss``, the
Hugging Face mixin (``cpo_fast.hf``) and the pipeline call it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cpo_fast._checks import check_finite, check_finite_seq, check_same_shape, index_list
from cpo_fast.constants import CLIP_EPS, MAX_LOG_WEIGHT, METHODS, TRUNCATION, WEIGHTINGS


@dataclass
class LossOutput:
    """The loss and its diagnostics (all diagnostics detached; None where not computed)."""

    loss: Tensor | None = None
    weights: Tensor | None = None  # W_i on the outcome rows
    ess: Tensor | None = None  # (sum W)^2 / sum W^2
    max_weight_share: Tensor | None = None  # max W / sum W
    clip_fraction: Tensor | None = None  # rows whose weight was clipped / truncated / clamped
    log_weights: Tensor | None = None  # ell_i
    num_clamped: int = 0  # rows whose log weight hit +-max_log_weight
    ipw_term: Tensor | None = None  # (1/n) sum W_i a_i (higher is better units)
    dm_term: Tensor | None = None  # (1/m) sum W'_j ghat'_j
    dm_weights: Tensor | None = None
    dm_ess: Tensor | None = None
    dm_clip_fraction: Tensor | None = None
    value: Tensor | None = None  # estimate of V(theta) in the outcome's own units
    dm_max_weight_share: Tensor | None = None


def _distributed(flag: bool | None) -> bool:
    ready = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if flag and not ready:
        raise ValueError("distributed=True but torch.distributed is not initialized with >1 rank.")
    return ready if flag is None else bool(flag)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: every rank's output depends on every rank's input,
    so the gradient of the summed per-rank losses is the sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.clone()
        dist.all_reduce(g)
        return g


@dataclass(frozen=True)
class _Scheme:
    """The weighting settings shared by the outcome and DM terms of one loss."""

    weighting: str
    sign: float  # +1 higher is better, -1 lower is better
    max_log_weight: float
    truncation: float
    clip_eps: tuple[float, float]
    distributed: bool

    @classmethod
    def make(cls, weighting: str, higher_is_better: bool, max_log_weight: float,
             truncation: float, clip_eps: float | tuple[float, float],
             distributed: bool | None) -> _Scheme:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}.")
        if not max_log_weight > 0:
            raise ValueError(f"max_log_weight must be > 0, got {max_log_weight}.")
        if weighting == "truncated" and not truncation > 0:
            raise ValueError(f"truncation (tau) must be > 0, got {truncation}.")
        return cls(weighting, 1.0 if higher_is_better else -1.0, float(max_log_weight),
                   float(truncation), _clip_eps(clip_eps),
                   _distributed(distributed) and weighting == "self_normalized")


@dataclass
class _Term:
    """One importance-weighted mean (1/n) sum_i obj_i and what the diagnostics need."""

    obj: Tensor  # differentiable
    weights: Tensor  # W_i, detached
    log_weights: Tensor  # log W_i, detached (up to a constant for self_normalized)
    cut: Tensor  # rows clipped / truncated / clamped
    num_clamped: int = 0


def _self_normalized(ell: Tensor, a: Tensor, distributed: bool) -> _Term:
    """W = n softmax(ell) over the (global) batch."""
    n = ell.shape[0]
    if distributed:
        m = ell.detach().max()
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        n_global = torch.tensor(float(n), device=ell.device)
        dist.all_reduce(n_global)
        e = torch.exp(ell - m)
        W = n_global * e / _AllReduceSum.apply(e.sum())
        # DDP averages gradients over ranks: scale so the average is dL/dtheta.
        obj = (W * a).sum() * dist.get_world_size() / n_global
        n_total = int(n_global)
    else:
        W = n * torch.softmax(ell, dim=0)
        obj = (W * a).mean()
        n_total = n
    if n_total == 1:
        warnings.warn(
            "cpo_fast: weighting='self_normalized' on a batch of one row: its weight is "
            "exactly 1 whatever the policy, so this term's gradient is exactly zero. Use "
            "batches of several rows, or weighting='raw', 'clipped' or 'truncated'.",
            RuntimeWarning, stacklevel=4,
        )
    return _Term(obj, W.detach(), ell.detach(), torch.zeros_like(ell, dtype=torch.bool))


def _clamped(ell: Tensor, a: Tensor, sc: _Scheme) -> _Term:
    """raw / truncated / clipped: W = exp(ell) with ell clamped to [-M, M] (reported)."""
    M = sc.max_log_weight
    over = ell.detach().abs() > M
    clamped = int(over.sum())
    if clamped:
        warnings.warn(
            f"cpo_fast: {clamped} of {ell.shape[0]} log weights exceeded +-max_log_weight="
            f"{M} and were clamped (reported as LossOutput.num_clamped). "
            "Consider weighting='self_normalized' or length-normalized log-probs.",
            RuntimeWarning,
        )
    log_w = ell.clamp(-M, M)
    W = torch.exp(log_w)
    if sc.weighting == "raw":
        return _Term((W * a).mean(), W.detach(), log_w.detach(), over, clamped)
    if sc.weighting == "truncated":
        Wt = W.clamp(max=sc.truncation)
        log_t = log_w.detach().clamp(max=math.log(sc.truncation))
        return _Term((Wt * a).mean(), Wt.detach(), log_t, W.detach() > sc.truncation, clamped)
    lo, hi = 1.0 - sc.clip_eps[0], 1.0 + sc.clip_eps[1]
    obj = torch.minimum(W * a, W.clamp(lo, hi) * a)
    # Rows where min() picks the clipped branch outside the range: gradient cut to zero.
    cut = ((a > 0) & (W > hi)) | ((a < 0) & (W < lo))
    return _Term(obj.mean(), W.detach(), log_w.detach(), cut.detach(), clamped)


def _weighted_mean(ell: Tensor, a: Tensor, sc: _Scheme) -> _Term:
    if sc.weighting == "self_normalized":
        return _self_normalized(ell, a, sc.distributed)
    return _clamped(ell, a, sc)


def _diag(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """(ESS, max weight share) from log weights: with w = W / max W = exp(log W - max),
    ESS = (sum w)^2 / sum w^2 and max W / sum W = 1 / sum w. Every w is in [0, 1] and
    sum w >= 1, so nothing overflows in any dtype (half inputs are computed in float32)."""
    if log_w.dtype in (torch.float16, torch.bfloat16):
        log_w = log_w.float()
    w = torch.exp(log_w - log_w.max())
    s = w.sum()
    return s * s / (w * w).sum(), 1.0 / s


def _clip_eps(clip_eps: float | tuple[float, float]) -> tuple[float, float]:
    """(eps_lo, eps_hi): the trust region is [1 - eps_lo, 1 + eps_hi], so eps_lo in (0, 1)
    (a lower bound <= 0 clips nothing from below) and eps_hi > 0."""
    if isinstance(clip_eps, (int, float)):
        lo = hi = float(clip_eps)
    else:
        try:
            lo, hi = (float(e) for e in clip_eps)
        except (TypeError, ValueError):
            raise ValueError(f"clip_eps must be a number or a pair (eps_lo, eps_hi), got "
                             f"{clip_eps!r}.") from None
    if not (0.0 < lo < 1.0 and hi > 0.0 and math.isfinite(hi)):
        raise ValueError(f"clip_eps must give 0 < eps_lo < 1 and eps_hi > 0 (the trust region "
                         f"[1 - eps_lo, 1 + eps_hi]), got {clip_eps!r}; the usual value is 0.2.")
    return lo, hi


def _check_seq(name: str, t: Tensor, ref_name: str | None = None, ref: Tensor | None = None):
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [B], got {getattr(t, 'dtype', t)}.")
    if t.dim() != 1:
        raise ValueError(f"{name} must be a per-sequence tensor of shape [B], got {tuple(t.shape)}.")
    if ref is not None:
        check_same_shape(name, t, ref_name, ref)


def _outcome_rows(policy_logp: Tensor, ref_logp: Tensor, outcome: Tensor,
                  outcome_pred: Tensor | None, sign: float) -> tuple[Tensor, Tensor]:
    """Validated (ell_i, a_i) of the outcome rows: a = y - ghat (signed)."""
    _check_seq("policy_logp", policy_logp)
    if policy_logp.shape[0] == 0:
        raise ValueError("policy_logp is empty: the batch has no rows.")
    _check_seq("ref_logp", ref_logp, "policy_logp", policy_logp)
    _check_seq("outcome", outcome, "policy_logp", policy_logp)
    check_finite_seq("policy_logp", policy_logp)
    check_finite("outcome", outcome)
    check_finite("ref_logp", ref_logp)
    a = sign * outcome.to(policy_logp.dtype)
    if outcome_pred is not None:
        _check_seq("outcome_pred", outcome_pred, "policy_logp", policy_logp)
        check_finite("outcome_pred", outcome_pred)
        a = a - sign * outcome_pred.to(policy_logp.dtype)
    ell = policy_logp - ref_logp.to(policy_logp.dtype)
    check_finite_seq("policy_logp - ref_logp (the log weight)", ell)
    return ell, a


def _dm_rows(dm_policy_logp: Tensor, dm_ref_logp: Tensor, dm_outcome_pred: Tensor,
             sign: float) -> tuple[Tensor, Tensor]:
    """Validated (ell'_j, ghat'_j) of the direct-method set (signed)."""
    _check_seq("dm_policy_logp", dm_policy_logp)
    if dm_policy_logp.shape[0] == 0:
        raise ValueError("dm_policy_logp is empty: the direct-method set has no rows.")
    _check_seq("dm_ref_logp", dm_ref_logp, "dm_policy_logp", dm_policy_logp)
    _check_seq("dm_outcome_pred", dm_outcome_pred, "dm_policy_logp", dm_policy_logp)
    check_finite_seq("dm_policy_logp", dm_policy_logp)
    check_finite("dm_ref_logp", dm_ref_logp)
    check_finite("dm_outcome_pred", dm_outcome_pred)
    ell = dm_policy_logp - dm_ref_logp.to(dm_policy_logp.dtype)
    check_finite_seq("dm_policy_logp - dm_ref_logp (the log weight)", ell)
    return ell, sign * dm_outcome_pred.to(dm_policy_logp.dtype)


def _record(out: LossOutput, t: _Term, ell: Tensor | None) -> None:
    """Fill the outcome-row (ell given) or DM-row (ell None) diagnostics of ``out``."""
    ess, share = _diag(t.log_weights)
    out.num_clamped += t.num_clamped
    if ell is not None:
        out.ipw_term, out.weights, out.log_weights = t.obj.detach(), t.weights, ell.detach()
        out.ess, out.max_weight_share = ess, share
        out.clip_fraction = t.cut.float().mean()
    else:
        out.dm_term, out.dm_weights, out.dm_ess = t.obj.detach(), t.weights, ess
        out.dm_max_weight_share = share
        out.dm_clip_fraction = t.cut.float().mean()


def dr_cpo_loss(
    policy_logp: Tensor | None,
    ref_logp: Tensor | None,
    outcome: Tensor | None,
    outcome_pred: Tensor | None = None,
    *,
    dm_policy_logp: Tensor | None = None,
    dm_ref_logp: Tensor | None = None,
    dm_outcome_pred: Tensor | None = None,
    weighting: str = "self_normalized",
    higher_is_better: bool = True,
    max_log_weight: float = MAX_LOG_WEIGHT,
    truncation: float = TRUNCATION,
    clip_eps: float | tuple[float, float] = CLIP_EPS,
    distributed: bool | None = None,
) -> LossOutput:
    """CPO / DR-CPO loss on per-sequence log-probabilities (docs/math.md).

    Args:
        policy_logp: s_i, the policy's (masked) sequence log-probabilities ``[B]``, finite
            (a NaN or inf raises a ValueError naming the rows).
        ref_logp: log P^R(x_i) ``[B]`` (f_0's sequence log-probs, or a logged propensity).
        outcome: y_i ``[B]``, finite.
        outcome_pred: ghat(x_i) ``[B]`` (cross-fitted). None with no DM inputs gives CPO.
        dm_policy_logp, dm_ref_logp, dm_outcome_pred: ``[M]`` the direct-method set x'_j.
            Omitted with ``outcome_pred`` given: the outcome rows serve as the DM set.
        weighting: ``raw``, ``self_normalized``, ``clipped`` or ``truncated``.
            ``self_normalized`` on one row warns: its gradient is exactly zero.
        higher_is_better: False flips the sign of outcomes and predictions.
        max_log_weight: M, the clamp on log weights for raw/clipped/truncated (reported).
        truncation: tau for ``truncated``. clip_eps: eps or (eps_lo, eps_hi) for ``clipped``.
        distributed: self-normalize over the global batch across ranks (None: when
            torch.distributed is initialized with more than one rank). The local loss is
            then scaled by the world size so that DDP's gradient average is exact.
    """
    sc = _Scheme.make(weighting, higher_is_better, max_log_weight, truncation, clip_eps,
                      distributed)
    dm = (dm_policy_logp, dm_ref_logp, dm_outcome_pred)
    if any(t is not None for t in dm) and any(t is None for t in dm):
        raise ValueError("dm_policy_logp, dm_ref_logp and dm_outcome_pred go together: pass all three.")
    out, terms = LossOutput(), []
    if policy_logp is not None:
        ell, a = _outcome_rows(policy_logp, ref_logp, outcome, outcome_pred, sc.sign)
        t = _weighted_mean(ell, a, sc)
        _record(out, t, ell)
        terms.append(t.obj)
        if outcome_pred is not None and dm[0] is None:  # the outcome rows as the DM set
            dm = (policy_logp, ref_logp, outcome_pred)
    if dm[0] is not None:
        t = _weighted_mean(*_dm_rows(*dm, sc.sign), sc)
        _record(out, t, None)
        terms.append(t.obj)
    if not terms:
        raise ValueError("nothing to optimize: pass policy_logp/ref_logp/outcome or the dm_* set.")
    out.loss = -terms[0] if len(terms) == 1 else -terms[0] - terms[1]
    _check_loss_finite(out.loss, "outcomes and predictions")
    out.value = -sc.sign * out.loss.detach()
    return out


def _check_loss_finite(loss: Tensor, scale_of: str) -> None:
    """Inputs were checked finite, so a non-finite loss is an overflow: say so, not NaN."""
    if not bool(torch.isfinite(loss.detach())):
        raise ValueError(
            f"the loss overflowed to {loss.item()} in {loss.dtype} although every input is "
            f"finite: the {scale_of} are too large for this dtype (or for weights up to "
            "exp(max_log_weight)). Standardize them, lower max_log_weight, use "
            "weighting='self_normalized', or compute in float64."
        )


def cpo_loss(policy_logp: Tensor, ref_logp: Tensor, outcome: Tensor, **kw) -> LossOutput:
    """CPO: the importance-weighted outcome alone (``dr_cpo_loss`` without ghat)."""
    return dr_cpo_loss(policy_logp, ref_logp, outcome, **kw)


def oo_rlhf_loss(
    dm_policy_logp: Tensor, dm_ref_logp: Tensor, dm_outcome_pred: Tensor, **kw
) -> LossOutput:
    """Outcome-model-only baseline: ``-(1/m) sum_j W'_j ghat(x'_j)``."""
    out = dr_cpo_loss(None, None, None, dm_policy_logp=dm_policy_logp, dm_ref_logp=dm_ref_logp,
                      dm_outcome_pred=dm_outcome_pred, **kw)
    out.weights, out.ess, out.clip_fraction = out.dm_weights, out.dm_ess, out.dm_clip_fraction
    out.max_weight_share = out.dm_max_weight_share
    return out


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


@dataclass
class TokenBatch:
    """Per-token tensors of one set of sequences, ``[B, T]`` and aligned, plus its per-row
    outcomes: the inputs of :func:`assemble_loss`."""

    logp: Tensor  # the policy's token log-probs (differentiable)
    mask: Tensor  # True on the tokens that count (completion, not prompt or padding)
    ref_logp: Tensor | None = None  # the reference model's (f_0's) token log-probs
    entropy: Tensor | None = None  # the policy's token entropies (for entropy_coef)
    outcome: Tensor | None = None  # y [B]
    outcome_pred: Tensor | None = None  # ghat [B] (cross-fitted)
    log_propensity: Tensor | None = None  # [B] log P^R(x), replaces sum_t ref_logp


def assemble_loss(
    method: str,
    batch: TokenBatch | None,
    dm: TokenBatch | None = None,
    *,
    weighting: str = "self_normalized",
    higher_is_better: bool = True,
    length_normalize: bool = False,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
    regularize_on: str = "batch",
    log_weight_cap: float = 0.0,
    **loss_kwargs,
) -> LossOutput:
    """The training loss of ``method`` from per-token tensors, with its diagnostics.

    Methods: ``sft_all`` / ``sft_top`` (the mean token NLL of ``batch``; the SFT-top row
    selection happens in the data), ``cpo`` (IPW on ``batch``), ``dr_cpo`` (IPW on
    ``y - ghat`` plus the DM term on ``dm``, or on ``batch`` itself without a DM batch) and
    ``oo_rlhf`` (the DM term on ``dm`` alone; ``batch`` may be None). Sequence
    log-probabilities are the masked sums of the token ones (means with
    ``length_normalize``); ``batch.log_propensity``, when given, is log P^R(x) as is.

    Regularizers, added to ``loss``: ``entropy_coef * entropy_bonus`` (needs ``entropy``)
    and ``kl_coef * kl_penalty`` (needs ``ref_logp``), over the tokens of ``batch``, or of
    ``dm`` when ``regularize_on="dm"`` and a DM batch is given (the pipeline's choice: the
    DM set is what the policy is optimized on). ``loss_kwargs`` go to :func:`dr_cpo_loss`
    (``max_log_weight``, ``truncation``, ``clip_eps``, ``distributed``). ``value`` and the
    other diagnostics exclude the regularizers; SFT methods fill ``loss`` only.
    ``log_weight_cap > 0`` caps each row's log weight (:func:`cap_log_weights`).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if regularize_on not in ("batch", "dm"):
        raise ValueError(f"regularize_on={regularize_on!r} must be 'batch' or 'dm'.")
    if (batch is None and method != "oo_rlhf") or (dm is None and method == "oo_rlhf"):
        need = "dm" if method == "oo_rlhf" else "batch"
        raise ValueError(f"method={method!r} needs the {need} TokenBatch.")
    if method in ("sft_all", "sft_top"):
        out = LossOutput(loss=sft_loss(batch.logp, batch.mask))
    else:
        kw = dict(weighting=weighting, higher_is_better=higher_is_better, **loss_kwargs)
        out = _ipw_loss(method, batch, dm, length_normalize, kw, log_weight_cap)
    reg = dm if (dm is not None and (regularize_on == "dm" or batch is None)) else batch
    out.loss = _add_regularizers(out.loss, reg, entropy_coef, kl_coef)
    if not bool(torch.isfinite(out.loss.detach())):
        _raise_nonfinite_tokens(out.loss, {"batch": batch, "dm": dm})
    return out


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
    _check_loss_finite(loss, "token log-probs, entropies or reference log-probs")


def cap_log_weights(policy_logp: Tensor, ref_logp: Tensor, cap: float, *,
                    self_normalized: bool = True) -> Tensor:
    """``policy_logp`` with each row's log weight ``policy_logp - ref_logp`` capped (a remedy
    for weight collapse: cpo_fast/pipeline/remedy.py, docs/validity.md); ``cap <= 0`` returns
    it unchanged."""
    if cap <= 0:
        return policy_logp
    ref = ref_logp.to(policy_logp.dtype)
    ell = policy_logp - ref
    center = ell.detach().median() if self_normalized else torch.zeros((), dtype=ell.dtype)
    return ref + center + torch.clamp(ell - center, -cap, cap)


def _seq(b: TokenBatch, t: Tensor, length_normalize: bool) -> Tensor:
    return sequence_logprobs(t, b.mask, length_normalize=length_normalize)


def _ipw_loss(method: str, batch: TokenBatch | None, dm: TokenBatch | None,
              length_normalize: bool, kw: dict, cap: float = 0.0) -> LossOutput:
    """cpo / dr_cpo / oo_rlhf on sequence log-probs summed from the token ones."""
    sn = kw.get("weighting") == "self_normalized"
    dm_kw = {}
    if dm is not None:
        if method == "cpo":
            raise ValueError("method='cpo' takes no DM batch (use 'dr_cpo').")
        if dm.ref_logp is None or dm.outcome_pred is None:
            raise ValueError("the DM TokenBatch needs ref_logp and outcome_pred (ghat).")
        dm_ref = _seq(dm, dm.ref_logp, length_normalize)
        dm_kw = dict(dm_policy_logp=cap_log_weights(_seq(dm, dm.logp, length_normalize), dm_ref,
                                                    cap, self_normalized=sn),
                     dm_ref_logp=dm_ref, dm_outcome_pred=dm.outcome_pred)
    if method == "oo_rlhf":
        return oo_rlhf_loss(**dm_kw, **kw)
    if batch.outcome is None:
        raise ValueError(f"method={method!r} needs batch.outcome.")
    ref = batch.log_propensity
    if ref is None:
        if batch.ref_logp is None:
            raise ValueError("batch needs ref_logp (token log-probs of f_0) or log_propensity.")
        ref = _seq(batch, batch.ref_logp, length_normalize)
    pred = batch.outcome_pred if method == "dr_cpo" else None
    policy = cap_log_weights(_seq(batch, batch.logp, length_normalize), ref, cap, self_normalized=sn)
    return dr_cpo_loss(policy, ref, batch.outcome, pred, **dm_kw, **kw)


def _add_regularizers(loss: Tensor, b: TokenBatch, entropy_coef: float,
                      kl_coef: float) -> Tensor:
    """loss + entropy_coef * entropy bonus + kl_coef * KL(k3) over the tokens of ``b``."""
    if entropy_coef and b.entropy is not None:
        loss = loss + entropy_bonus(b.entropy, b.mask, entropy_coef)
    if kl_coef:
        if b.ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference token log-probs (ref_logp).")
        loss = loss + kl_penalty(b.logp, b.ref_logp, b.mask, kl_coef)
    return loss


class DRCPOLoss(nn.Module):
    """Module form of :func:`dr_cpo_loss` with optional entropy and KL regularizers.

    ``forward(policy_token_logp, mask, ref_token_logp, outcome, outcome_pred=None,
    entropy=None, dm=None, log_propensity=None)`` takes per-token ``[B, T]`` tensors (``dm``:
    a dict with ``policy_token_logp``, ``mask``, ``ref_token_logp``, ``outcome_pred``) and
    returns :func:`assemble_loss`'s LossOutput (method ``dr_cpo``, regularizers on the
    outcome batch).
    """

    def __init__(self, weighting: str = "self_normalized", *, higher_is_better: bool = True,
                 length_normalize: bool = False, entropy_coef: float = 0.0, kl_coef: float = 0.0,
                 **loss_kwargs) -> None:
        super().__init__()
        self.weighting, self.higher_is_better = weighting, higher_is_better
        self.length_normalize, self.entropy_coef, self.kl_coef = length_normalize, entropy_coef, kl_coef
        self.loss_kwargs = loss_kwargs

    def forward(self, policy_token_logp: Tensor, mask: Tensor, ref_token_logp: Tensor,
                outcome: Tensor, outcome_pred: Tensor | None = None, entropy: Tensor | None = None,
                dm: dict | None = None, log_propensity: Tensor | None = None) -> LossOutput:
        batch = TokenBatch(policy_token_logp, mask, ref_token_logp, entropy, outcome,
                           outcome_pred, log_propensity)
        dm_batch = None
        if dm is not None:
            dm_batch = TokenBatch(dm["policy_token_logp"], dm["mask"], dm["ref_token_logp"],
                                  outcome_pred=dm["outcome_pred"])
        return assemble_loss("dr_cpo", batch, dm_batch, weighting=self.weighting,
                             higher_is_better=self.higher_is_better,
                             length_normalize=self.length_normalize,
                             entropy_coef=self.entropy_coef, kl_coef=self.kl_coef,
                             **self.loss_kwargs)


__all__ = [
    "WEIGHTINGS", "DRCPOLoss", "LossOutput", "TokenBatch", "assemble_loss", "cpo_loss",
    "dr_cpo_loss", "entropy_bonus", "kl_penalty", "oo_rlhf_loss", "sequence_logprobs",
    "sft_loss", "top_quantile_mask",
]
