"""Holding the effective sample size up: two adaptive remedies for importance-weight collapse.

A sequence weight w_i = exp(ell_i), ell_i = log P_theta(x_i) - log P_R(x_i), multiplies one
ratio per token, so a few optimizer steps can leave one row with most of a batch's weight.
The fixed remedies (clipping, the log-weight cap, a fixed KL coefficient) are tuned by hand
and either fire everywhere or nowhere. These two adapt to the batch instead:

1. **ESS-targeted tempering** (:func:`ess_temperature`, :func:`temper_log_weights`): use
   w_i^tau instead of w_i, with tau in [0, 1] the largest value whose self-normalized
   weights keep ESS / n >= ``target``; tau = 1 (no change) whenever the batch is healthy.
   ESS(tau) is non-increasing in tau (below), so bisection finds it. This is adaptive
   tempering as in sequential Monte Carlo (Jasra, Stephens, Doucet and Tsagaris 2011: the
   next temperature is chosen so that the ESS hits a target share). Tempered weights are
   the self-normalized weights of the geometric bridge P_tau ∝ P_theta^tau P_R^(1 - tau)
   against P_R: when tau < 1 the objective estimates V at a distribution between f_0's and
   the policy's (a trust region), not V(theta) itself; that bias is the price of a bounded
   variance, as with the cap. tau is a constant of the gradient (chosen from detached
   values, as the cap's median is), so the gradient of a row's log weight is scaled by tau.

   Monotonicity: with p_i ∝ exp(tau ell_i), sum_i p_i^2 = Z(2 tau) / Z(tau)^2 where
   Z(t) = sum_i exp(t ell_i), so d/dtau log sum p^2 = 2 (E_{2 tau}[ell] - E_tau[ell]) >= 0
   because E_t[ell] is non-decreasing in t (its derivative is Var_t[ell]). ESS = 1 / sum p^2.

2. **An adaptive KL coefficient** (:class:`AdaptiveKL`), as PPO's adaptive KL penalty
   (Ziegler et al. 2019) holds a KL target: after each step the KL-to-f_0 coefficient is
   multiplied by ``1 + rate * clip(1 - ess_share / target, -0.2, 0.2)``: raised while the
   ESS is below target (pulling the policy back toward f_0, which makes the weights
   uniform again), lowered when it is above. Unlike tempering it acts on the next steps,
   not on the current batch, so it can lag a sudden collapse; the two combine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cpo_fast.distributed import current_world, gather_rows


def ess_share(log_w: Tensor) -> float:
    """ESS / n of the self-normalized weights exp(log_w) (1: uniform, 1/n: one row)."""
    lw = log_w.detach().to(torch.float64).reshape(-1)
    if lw.numel() == 0:
        raise ValueError("ess_share: log_w is empty; pass one log weight per row.")
    if not torch.isfinite(lw).all():
        raise ValueError("ess_share: log_w has NaN or infinite values.")
    w = torch.exp(lw - lw.max())
    return float(w.sum() ** 2 / (w * w).sum()) / lw.numel()


def ess_temperature(log_w: Tensor, target: float, *, tol: float = 1e-4) -> float:
    """The largest tau in [0, 1] (to ``tol``) with ``ess_share(tau * log_w) >= target``."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target is an ESS share in (0, 1], got {target}.")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}.")
    lw = log_w.detach().to(torch.float64).reshape(-1)
    if ess_share(lw) >= target:
        return 1.0
    lo, hi = 0.0, 1.0  # ess(lo) = 1 >= target > ess(hi)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if ess_share(mid * lw) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def temper_log_weights(policy_logp: Tensor, ref_logp: Tensor, target: float, *,
                       tol: float = 1e-4, distributed: bool = False) -> tuple[Tensor, float]:
    """(``policy_logp`` with each row's log weight scaled by tau, tau): drop-in where the
    log-weight cap goes (``ref + tau * (policy - ref)``); tau from :func:`ess_temperature`
    on the detached log weights, 1.0 when the batch already meets ``target``.
    ``distributed``: the batch is every rank's rows (tau from their gathered log weights,
    the same on every rank)."""
    ref = ref_logp.to(policy_logp.dtype)
    ell = policy_logp - ref
    whole = gather_rows(ell.detach(), current_world())[0] if distributed else ell
    tau = ess_temperature(whole, target, tol=tol)
    if tau == 1.0:
        return policy_logp, tau
    return ref + tau * ell, tau


@dataclass
class AdaptiveKL:
    """A KL-to-f_0 coefficient that holds the weights' ESS share near ``target``.

    ``update(ess_share)`` after each optimizer step returns the coefficient for the next.
    """

    coef: float = 0.05
    target: float = 0.3
    rate: float = 0.5
    min_coef: float = 1e-4
    max_coef: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"AdaptiveKL: target is an ESS share in (0, 1], got {self.target}.")
        if not 0.0 < self.min_coef <= self.coef <= self.max_coef:
            raise ValueError(f"AdaptiveKL: need 0 < min_coef <= coef <= max_coef, got "
                             f"{self.min_coef}, {self.coef}, {self.max_coef}.")
        if self.rate <= 0:
            raise ValueError(f"AdaptiveKL: rate must be > 0, got {self.rate}.")

    def update(self, ess_share: float) -> float:
        if not math.isfinite(ess_share) or not 0.0 <= ess_share <= 1.0:
            raise ValueError(f"AdaptiveKL.update: ess_share must be in [0, 1], got {ess_share}.")
        err = min(0.2, max(-0.2, 1.0 - ess_share / self.target))
        self.coef = min(self.max_coef, max(self.min_coef, self.coef * (1.0 + self.rate * err)))
        return self.coef
