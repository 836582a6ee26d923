"""Objectives over per-sequence quantities: CPO, DR-CPO, OO-RLHF, SFT, regularizers.

All minimized. Inputs are per-sequence tensors ``[B]`` (``policy_logp`` = s_i of the
policy, ``ref_logp`` = log P^R(x_i)); weights live in log space until the last step.
See method.md sections 4 and 5; ``cpo_fast.reference`` is the row-by-row ground truth.

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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cpo_fast._checks import check_finite, check_same_shape

WEIGHTINGS = ("raw", "self_normalized", "clipped", "truncated")


@dataclass
class LossOutput:
    """The loss and its diagnostics (all diagnostics detached)."""

    loss: Tensor
    weights: Tensor | None  # W_i on the outcome rows
    ess: Tensor | None  # (sum W)^2 / sum W^2
    max_weight_share: Tensor | None  # max W / sum W
    clip_fraction: Tensor | None  # rows whose weight was clipped / truncated / clamped
    log_weights: Tensor | None  # ell_i
    num_clamped: int = 0  # rows whose log weight hit +-max_log_weight
    ipw_term: Tensor | None = None  # (1/n) sum W_i a_i (higher is better units)
    dm_term: Tensor | None = None  # (1/m) sum W'_j ghat'_j
    dm_weights: Tensor | None = None
    dm_ess: Tensor | None = None
    dm_clip_fraction: Tensor | None = None
    value: Tensor | None = None  # estimate of V(theta) in the outcome's own units


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


def _weighted_mean(
    ell: Tensor, a: Tensor, weighting: str, *, max_log_weight: float, truncation: float,
    clip_eps: tuple[float, float], distributed: bool,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Return (mean_i obj_i, W detached, clip mask, number clamped) for one set of rows."""
    n = ell.shape[0]
    clamped = 0
    if weighting == "self_normalized":
        if distributed:
            m = ell.detach().max()
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            n_global = torch.tensor(float(n), device=ell.device)
            dist.all_reduce(n_global)
            e = torch.exp(ell - m)
            total = _AllReduceSum.apply(e.sum())
            W = n_global * e / total
            # DDP averages gradients over ranks: scale so the average is dL/dtheta.
            obj = (W * a).sum() * dist.get_world_size() / n_global
        else:
            W = n * torch.softmax(ell, dim=0)
            obj = (W * a).mean()
        return obj, W.detach(), torch.zeros_like(ell, dtype=torch.bool), 0
    over = ell.detach().abs() > max_log_weight
    clamped = int(over.sum())
    if clamped:
        warnings.warn(
            f"cpo_fast: {clamped} of {n} log weights exceeded +-max_log_weight="
            f"{max_log_weight} and were clamped (reported as LossOutput.num_clamped). "
            "Consider weighting='self_normalized' or length-normalized log-probs.",
            RuntimeWarning,
        )
    W = torch.exp(ell.clamp(-max_log_weight, max_log_weight))
    if weighting == "raw":
        return (W * a).mean(), W.detach(), over, clamped
    if weighting == "truncated":
        Wt = W.clamp(max=truncation)
        return (Wt * a).mean(), Wt.detach(), W.detach() > truncation, clamped
    if weighting == "clipped":
        lo, hi = 1.0 - clip_eps[0], 1.0 + clip_eps[1]
        Wc = W.clamp(lo, hi)
        obj = torch.minimum(W * a, Wc * a)
        # Rows where min() picks the clipped branch outside the range: gradient cut to zero.
        cut = ((a > 0) & (W > hi)) | ((a < 0) & (W < lo))
        return obj.mean(), W.detach(), cut.detach(), clamped
    raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}.")


def _diag(W: Tensor) -> tuple[Tensor, Tensor]:
    s = W.sum()
    return s * s / (W * W).sum().clamp_min(1e-30), W.max() / s.clamp_min(1e-30)


def _clip_eps(clip_eps: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(clip_eps, (int, float)):
        return float(clip_eps), float(clip_eps)
    lo, hi = clip_eps
    return float(lo), float(hi)


def _check_seq(name: str, t: Tensor, ref_name: str | None = None, ref: Tensor | None = None):
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [B], got {getattr(t, 'dtype', t)}.")
    if t.dim() != 1:
        raise ValueError(f"{name} must be a per-sequence tensor of shape [B], got {tuple(t.shape)}.")
    if ref is not None:
        check_same_shape(name, t, ref_name, ref)


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
    max_log_weight: float = 50.0,
    truncation: float = 10.0,
    clip_eps: float | tuple[float, float] = 0.2,
    distributed: bool | None = None,
) -> LossOutput:
    """CPO / DR-CPO loss on per-sequence log-probabilities (method.md section 4).

    Args:
        policy_logp: s_i, the policy's (masked) sequence log-probabilities ``[B]``.
        ref_logp: log P^R(x_i) ``[B]`` (f_0's sequence log-probs, or a logged propensity).
        outcome: y_i ``[B]``, finite.
        outcome_pred: ghat(x_i) ``[B]`` (cross-fitted). None with no DM inputs gives CPO.
        dm_policy_logp, dm_ref_logp, dm_outcome_pred: ``[M]`` the direct-method set x'_j.
            Omitted with ``outcome_pred`` given: the outcome rows serve as the DM set.
        weighting: ``raw``, ``self_normalized``, ``clipped`` or ``truncated``.
        higher_is_better: False flips the sign of outcomes and predictions.
        max_log_weight: M, the clamp on log weights for raw/clipped/truncated (reported).
        truncation: tau for ``truncated``. clip_eps: eps or (eps_lo, eps_hi) for ``clipped``.
        distributed: self-normalize over the global batch across ranks (None: when
            torch.distributed is initialized with more than one rank). The local loss is
            then scaled by the world size so that DDP's gradient average is exact.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}.")
    eps = _clip_eps(clip_eps)
    sign = 1.0 if higher_is_better else -1.0
    kw = dict(max_log_weight=max_log_weight, truncation=truncation, clip_eps=eps,
              distributed=_distributed(distributed) and weighting == "self_normalized")
    has_dm = dm_policy_logp is not None or dm_ref_logp is not None or dm_outcome_pred is not None
    if has_dm and (dm_policy_logp is None or dm_ref_logp is None or dm_outcome_pred is None):
        raise ValueError("dm_policy_logp, dm_ref_logp and dm_outcome_pred go together: pass all three.")
    out = LossOutput(None, None, None, None, None, None)  # type: ignore[arg-type]
    total = None
    if policy_logp is not None:
        _check_seq("policy_logp", policy_logp)
        if policy_logp.shape[0] == 0:
            raise ValueError("policy_logp is empty: the batch has no rows.")
        _check_seq("ref_logp", ref_logp, "policy_logp", policy_logp)
        _check_seq("outcome", outcome, "policy_logp", policy_logp)
        check_finite("outcome", outcome)
        check_finite("ref_logp", ref_logp)
        a = sign * outcome.to(policy_logp.dtype)
        if outcome_pred is not None:
            _check_seq("outcome_pred", outcome_pred, "policy_logp", policy_logp)
            check_finite("outcome_pred", outcome_pred)
            ghat = sign * outcome_pred.to(policy_logp.dtype)
            a = a - ghat
            if not has_dm:
                dm_policy_logp, dm_ref_logp, dm_outcome_pred = policy_logp, ref_logp, outcome_pred
                has_dm = True
        ell = policy_logp - ref_logp.to(policy_logp.dtype)
        obj, W, cut, nclamp = _weighted_mean(ell, a, weighting, **kw)
        out.ipw_term, out.weights, out.log_weights, out.num_clamped = obj.detach(), W, ell.detach(), nclamp
        out.ess, out.max_weight_share = _diag(W)
        out.clip_fraction = cut.float().mean()
        total = -obj
    if has_dm:
        _check_seq("dm_policy_logp", dm_policy_logp)
        _check_seq("dm_ref_logp", dm_ref_logp, "dm_policy_logp", dm_policy_logp)
        _check_seq("dm_outcome_pred", dm_outcome_pred, "dm_policy_logp", dm_policy_logp)
        check_finite("dm_outcome_pred", dm_outcome_pred)
        ell_dm = dm_policy_logp - dm_ref_logp.to(dm_policy_logp.dtype)
        obj_dm, W_dm, cut_dm, nclamp = _weighted_mean(
            ell_dm, sign * dm_outcome_pred.to(dm_policy_logp.dtype), weighting, **kw)
        out.dm_term, out.dm_weights = obj_dm.detach(), W_dm
        out.dm_ess = _diag(W_dm)[0]
        out.dm_clip_fraction = cut_dm.float().mean()
        out.num_clamped += nclamp
        total = -obj_dm if total is None else total - obj_dm
    if total is None:
        raise ValueError("nothing to optimize: pass policy_logp/ref_logp/outcome or the dm_* set.")
    out.loss = total
    out.value = -sign * total.detach()
    return out


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
    if out.weights is not None:
        out.max_weight_share = _diag(out.weights)[1]
    return out


def sequence_logprobs(token_logp: Tensor, mask: Tensor, *, length_normalize: bool = False) -> Tensor:
    """s_i = sum_t m_t logp_t over ``[B, T]`` (or the mean over masked tokens)."""
    if token_logp.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token_logp shape {tuple(token_logp.shape)}.")
    m = mask.to(token_logp.dtype)
    s = (token_logp * m).sum(-1)
    return s / m.sum(-1).clamp_min(1) if length_normalize else s


def sft_loss(token_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over masked tokens (the SFT baselines)."""
    m = mask.to(token_logp.dtype)
    return -(token_logp * m).sum() / m.sum().clamp_min(1)


def top_quantile_mask(outcome: Tensor, quantile: float = 0.75, *, higher_is_better: bool = True) -> Tensor:
    """Rows in the best ``1 - quantile`` of outcomes (the SFT-top baseline's selection)."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}.")
    y = outcome if higher_is_better else -outcome
    return y >= torch.quantile(y.double(), quantile).to(y.dtype)


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float) -> Tensor:
    """``-c_H * mean_t H_t`` over masked tokens."""
    m = mask.to(entropy.dtype)
    return -coef * (entropy * m).sum() / m.sum().clamp_min(1)


def kl_penalty(token_logp: Tensor, ref_token_logp: Tensor, mask: Tensor, coef: float = 1.0) -> Tensor:
    """``coef * mean_t (exp(r_t) - r_t - 1)``, r_t = ref_logp_t - logp_t (k3 estimator)."""
    r = ref_token_logp.to(token_logp.dtype) - token_logp
    m = mask.to(token_logp.dtype)
    return coef * ((torch.expm1(r) - r) * m).sum() / m.sum().clamp_min(1)


class DRCPOLoss(nn.Module):
    """Module form of :func:`dr_cpo_loss` with optional entropy and KL regularizers.

    ``forward(policy_token_logp, mask, ref_token_logp, outcome, outcome_pred=None,
    entropy=None, dm=None)`` takes per-token ``[B, T]`` tensors, sums them into sequence
    log-probs, and returns the :class:`LossOutput` with the regularizers added to ``loss``.
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
        seq = lambda t, m: sequence_logprobs(t, m, length_normalize=self.length_normalize)
        ref = log_propensity if log_propensity is not None else seq(ref_token_logp, mask)
        dm_kw = {}
        if dm is not None:
            dm_kw = dict(dm_policy_logp=seq(dm["policy_token_logp"], dm["mask"]),
                         dm_ref_logp=seq(dm["ref_token_logp"], dm["mask"]),
                         dm_outcome_pred=dm["outcome_pred"])
        out = dr_cpo_loss(seq(policy_token_logp, mask), ref, outcome, outcome_pred,
                          weighting=self.weighting, higher_is_better=self.higher_is_better,
                          **dm_kw, **self.loss_kwargs)
        if self.entropy_coef and entropy is not None:
            out.loss = out.loss + entropy_bonus(entropy, mask, self.entropy_coef)
        if self.kl_coef:
            out.loss = out.loss + kl_penalty(policy_token_logp, ref_token_logp, mask, self.kl_coef)
        return out


__all__ = [
    "WEIGHTINGS", "LossOutput", "dr_cpo_loss", "cpo_loss", "oo_rlhf_loss", "sequence_logprobs",
    "sft_loss", "top_quantile_mask", "entropy_bonus", "kl_penalty", "DRCPOLoss",
]

