"""The importance-weighted estimators on per-sequence quantities: CPO, DR-CPO, OO-RLHF.

All minimized. Inputs are per-sequence tensors ``[B]`` (``policy_logp`` = s_i of the
policy, ``ref_logp`` = log P^R(x_i)); weights live in log space until the last step.
See docs/math.md; ``cpo_fast.reference`` is the row-by-row ground truth, with the same
function names and parameters.

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
Log-weight controls, applied before any scheme: the cap (:func:`cap_log_weights`) and
ESS-targeted tempering (:func:`temper_log_weights`; the tempered weights are those of the
geometric bridge P_theta^tau P^R^(1 - tau), as in adaptive tempering for sequential Monte
Carlo, Jasra et al. 2011). Token-level inputs, the methods and the regularizers are
cpo_fast/objectives.py's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from cpo_fast._checks import check_finite, check_finite_seq, check_same_shape
from cpo_fast.constants import CLIP_EPS, MAX_LOG_WEIGHT, TRUNCATION, WEIGHTINGS
from cpo_fast.distributed import all_reduce_sum, current_world, distributed_flag, gather_rows


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
    ess_tau: float | None = None  # the tempering exponent of the outcome rows' log weights
    dm_ess_tau: float | None = None  # and of the DM rows' (Objective.ess_target)


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
                   distributed_flag(distributed) and weighting == "self_normalized")


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
        W = n_global * e / all_reduce_sum(e.sum())
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


def _log_weights(prefix: str, policy_logp: Tensor, ref_logp: Tensor, what: str,
                 **values: Tensor) -> Tensor:
    """Validated log weights ell = s - log P^R of one row set (names carry ``prefix``), with
    its per-row ``values`` checked the same way."""
    p, r = prefix + "policy_logp", prefix + "ref_logp"
    _check_seq(p, policy_logp)
    if policy_logp.shape[0] == 0:
        raise ValueError(f"{p} is empty: {what} has no rows.")
    for name, t in {r: ref_logp, **values}.items():
        _check_seq(name, t, p, policy_logp)
    check_finite_seq(p, policy_logp)
    for name, t in {r: ref_logp, **values}.items():
        check_finite(name, t)
    ell = policy_logp - ref_logp.to(policy_logp.dtype)
    check_finite_seq(f"{p} - {r} (the log weight)", ell)
    return ell


def _outcome_rows(policy_logp: Tensor, ref_logp: Tensor, outcome: Tensor,
                  outcome_pred: Tensor | None, sign: float) -> tuple[Tensor, Tensor]:
    """Validated (ell_i, a_i) of the outcome rows: a = y - ghat (signed)."""
    pred = {} if outcome_pred is None else {"outcome_pred": outcome_pred}
    ell = _log_weights("", policy_logp, ref_logp, "the batch", outcome=outcome, **pred)
    a = sign * outcome.to(policy_logp.dtype)
    if outcome_pred is not None:
        a = a - sign * outcome_pred.to(policy_logp.dtype)
    return ell, a


def _dm_rows(dm_policy_logp: Tensor, dm_ref_logp: Tensor, dm_outcome_pred: Tensor,
             sign: float) -> tuple[Tensor, Tensor]:
    """Validated (ell'_j, ghat'_j) of the direct-method set (signed)."""
    ell = _log_weights("dm_", dm_policy_logp, dm_ref_logp, "the direct-method set",
                       dm_outcome_pred=dm_outcome_pred)
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
    check_loss_finite(out.loss, "outcomes and predictions")
    out.value = -sc.sign * out.loss.detach()
    return out


def check_loss_finite(loss: Tensor, scale_of: str) -> None:
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


def cap_log_weights(policy_logp: Tensor, ref_logp: Tensor, cap: float, *,
                    self_normalized: bool = True) -> Tensor:
    """``policy_logp`` with each row's log weight ``policy_logp - ref_logp`` capped (a remedy
    for weight collapse: docs/validity.md, cpo_fast/bench/sweep.py's "cap"); ``cap <= 0`` returns
    it unchanged."""
    if cap <= 0:
        return policy_logp
    ref = ref_logp.to(policy_logp.dtype)
    ell = policy_logp - ref
    center = ell.detach().median() if self_normalized else torch.zeros((), dtype=ell.dtype)
    return ref + center + torch.clamp(ell - center, -cap, cap)


def _host_log_weights(log_w: Tensor, fn: str) -> Tensor:
    """``log_w`` detached, flat, float64 on the CPU (one copy: the bisection below then
    runs without a device sync per step), checked non-empty and finite."""
    lw = log_w.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if lw.numel() == 0 or not bool(torch.isfinite(lw).all()):
        raise ValueError(f"{fn}: log_w must be non-empty and finite (no NaN or inf), got "
                         f"{lw.numel()} values; pass one finite log weight per row.")
    return lw


def ess_share(log_w: Tensor) -> float:
    """ESS / n of the self-normalized weights exp(``log_w``): 1 uniform, 1/n one row."""
    lw = _host_log_weights(log_w, "ess_share")
    return float(_diag(lw)[0]) / lw.numel()


def ess_temperature(log_w: Tensor, target: float, *, tol: float = 1e-4) -> float:
    """The largest tau in [0, 1] (to ``tol``, by bisection) with ``ess_share(tau * log_w) >=
    target``: ESS(tau) is non-increasing in tau (docs/math.md section 5), 1 at tau = 0."""
    if not 0.0 < target <= 1.0 or tol <= 0:
        raise ValueError(f"ess_temperature: target is an ESS share in (0, 1] and tol > 0, got "
                         f"target={target}, tol={tol}.")
    lw = _host_log_weights(log_w, "ess_temperature")
    share = lambda tau: float(_diag(tau * lw)[0]) / lw.numel()  # noqa: E731
    if share(1.0) >= target:
        return 1.0
    lo, hi = 0.0, 1.0  # share(lo) >= target > share(hi)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if share(mid) >= target else (lo, mid)
    return lo


def temper_log_weights(policy_logp: Tensor, ref_logp: Tensor, target: float, *,
                       tol: float = 1e-4, distributed: bool = False) -> tuple[Tensor, float]:
    """(``ref + tau (policy_logp - ref)``, tau): each row's log weight scaled by the tau of
    :func:`ess_temperature` on the detached log weights (every rank's rows when
    ``distributed``: the same tau everywhere); ``policy_logp`` itself when tau = 1. tau is a
    constant of the gradient, which is therefore scaled by tau (docs/math.md section 5)."""
    ref = ref_logp.to(policy_logp.dtype)
    ell = policy_logp - ref
    whole = gather_rows(ell.detach(), current_world())[0] if distributed else ell
    tau = ess_temperature(whole, target, tol=tol)
    return (policy_logp, tau) if tau == 1.0 else (ref + tau * ell, tau)


__all__ = ["LossOutput", "cap_log_weights", "cpo_loss", "dr_cpo_loss", "ess_share",
           "ess_temperature", "oo_rlhf_loss", "temper_log_weights"]
