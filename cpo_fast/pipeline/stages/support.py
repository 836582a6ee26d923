"""Where the outcome model ghat can be trusted: a bound on its predictions and a support
test on its inputs (docs/validity.md).

Bound. ghat estimates E[Y | x]; a conditional mean lies inside the range of Y, so any
prediction outside [min y, max y] of the training outcomes is an extrapolation (a ridge fit
on pooled features of garbled text can output 38 on a 0-to-5 scale). Predictions are
clipped to that range, with no margin: the observed extremes already include the outcome
noise, so they are wider than the range of E[Y | x] itself.

Support test. ghat sees features, so "unlike the training texts" is measured in ghat's own
input space: the Mahalanobis distance of a text's standardized feature vector under the
training rows' covariance, shrunk toward a multiple of the identity (the features are wide
and collinear: pooled hidden states and token counts). A text is flagged when its distance
exceeds the ``quantile`` (default 0.99) of the *out-of-fold* distances of the training rows
(each fold's rows measured against the covariance of the other folds), so about 1% of new
in-distribution texts are flagged by construction, and a higher share means the texts have
left the region ghat was fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHRINK = 0.1  # weight of the identity target in the shrunk covariance
QUANTILE = 0.99


@dataclass
class FeatureSupport:
    """Squared Mahalanobis distance to the training features, and the flag threshold."""

    mu: np.ndarray
    sd: np.ndarray
    basis: np.ndarray  # [d, r] eigenvectors of the shrunk covariance
    inv_eig: np.ndarray  # [r] 1 / eigenvalues
    floor: float  # 1 / eigenvalue of the directions outside the basis (the shrink target)
    threshold: float
    quantile: float

    def distance(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mu) / self.sd
        proj = z @ self.basis
        rest = np.maximum(np.sum(z * z, axis=1) - np.sum(proj * proj, axis=1), 0.0)
        return proj**2 @ self.inv_eig + self.floor * rest

    def outside(self, features: np.ndarray) -> np.ndarray:
        """Boolean [n]: True where a text is outside ghat's support."""
        return self.distance(features) > self.threshold


def _metric(z: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Eigenbasis of (1 - shrink) * cov + shrink * (tr cov / d) * I on standardized z."""
    n, d = z.shape
    zc = z - z.mean(0)
    # the covariance's non-null eigenpairs from the smaller Gram matrix
    if d <= n:
        s2, v = np.linalg.eigh(zc.T @ zc / max(1, n - 1))
    else:
        u, s, vt = np.linalg.svd(zc / np.sqrt(max(1, n - 1)), full_matrices=False)
        s2, v = s**2, vt.T
    keep = s2 > 1e-10 * max(float(s2.max()), 1e-12)
    s2, v = s2[keep], v[:, keep]
    target = shrink * float(np.sum(s2)) / d
    target = max(target, 1e-8)
    return v, 1.0 / ((1.0 - shrink) * s2 + target), 1.0 / target


def fit_support(features: np.ndarray, *, fold_of_row: np.ndarray | None = None,
                quantile: float = QUANTILE, shrink: float = SHRINK, seed: int = 0) -> FeatureSupport:
    """Fit the support test on ghat's training features [n, d] (see the module docstring).
    ``fold_of_row``: ghat's cross-fitting folds (else 5 seeded folds)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 4:
        raise ValueError(f"features must be [n >= 4, d], got shape {x.shape}.")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}.")
    if not 0.0 < shrink <= 1.0:
        raise ValueError(f"shrink must be in (0, 1], got {shrink}.")
    n = x.shape[0]
    if fold_of_row is None:
        fold_of_row = np.empty(n, dtype=np.int64)
        fold_of_row[np.random.default_rng(seed).permutation(n)] = np.arange(n) % min(5, n // 2)
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    oof = np.empty(n)
    for k in np.unique(fold_of_row):
        te, tr = fold_of_row == k, fold_of_row != k
        m_k, s_k = x[tr].mean(0), x[tr].std(0)
        s_k = np.where(s_k > 1e-12, s_k, 1.0)
        v, inv, floor = _metric((x[tr] - m_k) / s_k, shrink)
        part = FeatureSupport(m_k, s_k, v, inv, floor, np.inf, quantile)
        oof[te] = part.distance(x[te])
    v, inv, floor = _metric((x - mu) / sd, shrink)
    return FeatureSupport(mu, sd, v, inv, floor, float(np.quantile(oof, quantile)), quantile)


def clip_to_range(pred: np.ndarray, y_range: tuple[float, float] | None) -> np.ndarray:
    """``pred`` clipped to ``y_range`` (None: unchanged)."""
    p = np.asarray(pred, np.float64)
    return p if y_range is None else np.clip(p, y_range[0], y_range[1])


def support_report(fit, features: np.ndarray) -> dict[str, float | int]:
    """For texts' ghat features: how many fall outside ghat's support, how many raw
    predictions left the training outcome range (and were clipped), and the raw extremes."""
    raw = fit.predict(features, clip=False)
    out: dict[str, float | int] = {"n": int(len(raw)), "raw_min": float(raw.min()),
                                   "raw_max": float(raw.max())}
    if fit.y_range is not None:
        lo, hi = fit.y_range
        out["clipped_share"] = float(np.mean((raw < lo) | (raw > hi)))
    if fit.support is not None:
        out["ood_share"] = float(np.mean(fit.support.outside(features)))
    return out
