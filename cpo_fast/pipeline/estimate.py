"""Evaluation statistics: bootstrap intervals and off-policy estimates of V."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) percentile bootstrap interval."""
    raise NotImplementedError


def off_policy_estimates(log_w: np.ndarray, y: np.ndarray, ghat: np.ndarray | None = None,
                         ghat_policy_mean: float | np.ndarray | None = None, *,
                         n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """IPW, self-normalized IPW and DR estimates of V with bootstrap intervals."""
    raise NotImplementedError
