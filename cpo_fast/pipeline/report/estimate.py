r"""Evaluation statistics: bootstrap intervals and off-policy estimates of V.

All intervals are percentile bootstrap intervals (rows resampled with replacement,
``n_boot`` times, seeded). Off-policy estimates of V(theta) = E_{P^f}[g(X)]
(docs/math.md sections 2 and 4) on n held-out rows x_i ~ P^R with outcomes y_i and
log-weights ``log_w_i = log P^f_theta(x_i) - log P^R(x_i)``, w_i = exp(log_w_i):

    naive   = (1/n) sum_i y_i                              V of the data's own distribution
    ipw     = (1/n) sum_i w_i y_i                          unbiased (CPO's estimator), high variance
    snips   = sum_i w_i y_i / sum_i w_i                    self-normalized IPW: biased, consistent
    dm      = (1/m) sum_j ghat(x'_j),  x'_j ~ P^f          direct method (outcome model only)
    dr      = (1/n) sum_i w_i (y_i - ghat(x_i)) + dm       doubly robust (DR-CPO's estimator)
    dr_snips= sum_i w_i (y_i - ghat(x_i)) / sum_i w_i + dm self-normalized residual term

``ghat(x_i)`` must be cross-fitted (``OutcomeFit.oof_pred``, or the fold average when
the held-out rows were not in the outcome model's training set); the dm term is given
either as per-sample values ``ghat(x'_j)`` on the policy's generations (then resampled
independently in the bootstrap) or as one number (then held fixed).
Weights are formed in log space: snips, dr_snips and ESS never overflow; ipw and dr need
exp(log_w) itself and are ``inf`` with a warning when a weight overflows float64.
"""

from __future__ import annotations

import warnings

import numpy as np

_CHUNK = 256
# The weighted estimates (ipw, snips, dr, dr_snips) rest on the held-out rows' importance
# weights; when those concentrate on a few rows the estimates are noise however tight their
# bootstrap looks. Below this ESS (as a share of n, and at least MIN_ESS rows) they are marked.
RELIABLE_ESS_SHARE, MIN_ESS = 0.1, 10.0
WEIGHTED = ("ipw", "snips", "dr", "dr_snips")


def _indices(rng: np.random.Generator, n: int, n_boot: int):
    done = 0
    while done < n_boot:
        b = min(_CHUNK, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _check(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}.")


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and its percentile bootstrap (1 - alpha) interval."""
    _check(n_boot, alpha)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("bootstrap_ci: values is empty.")
    if not np.isfinite(v).all():
        raise ValueError("bootstrap_ci: values contain NaN or inf.")
    rng = np.random.default_rng(seed)
    stats = np.concatenate([v[idx].mean(1) for idx in _indices(rng, v.size, n_boot)])
    return (float(v.mean()), *_interval(stats, alpha))


def _entry(est: float, stats: np.ndarray, alpha: float) -> dict[str, float]:
    lo, hi = _interval(stats, alpha)
    return {"estimate": float(est), "lo": lo, "hi": hi}


def _validated(log_w, y, ghat, ghat_policy_mean):
    """The inputs of :func:`off_policy_estimates` as float64 vectors, checked."""
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    yy = np.asarray(y, dtype=np.float64).reshape(-1)
    n = lw.size
    if n == 0 or yy.size != n:
        raise ValueError(f"log_w and y must be non-empty and equally long, got {n} and "
                         f"{yy.size}.")
    if np.isnan(lw).any() or not np.isfinite(yy).all():
        raise ValueError("log_w has NaN or y has NaN/inf.")
    gh = None
    if ghat is not None:
        gh = np.asarray(ghat, dtype=np.float64).reshape(-1)
        if gh.size != n:
            raise ValueError(f"ghat has {gh.size} values but y has {n}.")
    dm_vals = None
    if ghat_policy_mean is not None:
        dm_vals = np.asarray(ghat_policy_mean, dtype=np.float64).reshape(-1)
        if dm_vals.size == 0:
            raise ValueError("ghat_policy_mean is an empty array.")
    return lw, yy, gh, dm_vals


def off_policy_estimates(
    log_w: np.ndarray,
    y: np.ndarray,
    ghat: np.ndarray | None = None,
    ghat_policy_mean: float | np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Off-policy estimates of V with bootstrap intervals (see the module docstring).

    Returns ``{"n", "ess", "max_weight_share", "reliable", "naive", "ipw", "snips"}`` and, when the
    outcome model is given, ``"dm"`` (needs ``ghat_policy_mean``), ``"dr"`` and
    ``"dr_snips"`` (need both ``ghat`` and ``ghat_policy_mean``); each estimate is a dict
    ``{"estimate", "lo", "hi"}``, the weighted ones with ``"reliable"`` (see :func:`reliable`).
    """
    _check(n_boot, alpha)
    lw, yy, gh, dm_vals = _validated(log_w, y, ghat, ghat_policy_mean)
    n = lw.size
    with np.errstate(over="ignore"):
        w = np.exp(lw)
    if not np.isfinite(w).all():
        warnings.warn("off_policy_estimates: some exp(log_w) overflow float64; ipw/dr are "
                      "inf (use snips / dr_snips).", stacklevel=2)
    ws = np.exp(lw - lw.max())  # shifted weights for the ratio estimators

    def ratio(num: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        if idx is None:
            return np.sum(ws * num) / np.sum(ws)
        return np.sum(ws[idx] * num[idx], axis=1) / np.sum(ws[idx], axis=1)

    out: dict = {"n": n, "ess": float(ws.sum() ** 2 / np.sum(ws**2)),
                 "max_weight_share": float(ws.max() / ws.sum())}
    rng = np.random.default_rng(seed)
    boots: dict[str, list[np.ndarray]] = {k: [] for k in
                                          ("naive", "ipw", "snips", "dm", "dr", "dr_snips")}
    resid = yy - gh if gh is not None else None
    with np.errstate(over="ignore", invalid="ignore"):
        for idx in _indices(rng, n, n_boot):
            b = idx.shape[0]
            boots["naive"].append(yy[idx].mean(1))
            boots["ipw"].append((w[idx] * yy[idx]).mean(1))
            boots["snips"].append(ratio(yy, idx))
            if dm_vals is not None:
                dm_b = (dm_vals[rng.integers(0, dm_vals.size, (b, dm_vals.size))].mean(1)
                        if dm_vals.size > 1 else np.full(b, dm_vals[0]))
                boots["dm"].append(dm_b)
                if resid is not None:
                    boots["dr"].append((w[idx] * resid[idx]).mean(1) + dm_b)
                    boots["dr_snips"].append(ratio(resid, idx) + dm_b)
        point = {"naive": yy.mean(), "ipw": np.mean(w * yy), "snips": ratio(yy)}
        if dm_vals is not None:
            point["dm"] = dm_vals.mean()
            if resid is not None:
                point["dr"] = np.mean(w * resid) + dm_vals.mean()
                point["dr_snips"] = ratio(resid) + dm_vals.mean()
    for k, est in point.items():
        out[k] = _entry(est, np.concatenate(boots[k]), alpha)
    out["reliable"] = reliable(out["ess"], n)
    for k in WEIGHTED:
        if k in out:
            out[k]["reliable"] = out["reliable"]
    return out


def reliable(ess: float, n: int) -> bool:
    """Whether weighted estimates over ``n`` rows with this ESS are worth reading."""
    return ess >= max(MIN_ESS if n >= MIN_ESS else 1.0, RELIABLE_ESS_SHARE * n)


def describe(op: dict) -> dict:
    """One line's worth of an :func:`off_policy_estimates` result: point estimates, and
    ``"unreliable (ESS e of n)"`` in place of the weighted ones when the weights collapsed."""
    out: dict = {}
    bad = op.get("reliable") is False
    for k, v in op.items():
        if isinstance(v, dict) and "estimate" in v:
            out[k] = (f"unreliable (ESS {op['ess']:.1f} of {op['n']})" if bad and k in WEIGHTED
                      else round(float(v["estimate"]), 4))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int):
            out[k] = v
        elif isinstance(v, float):
            out[k] = round(v, 4)
    return out
