"""Cross-fitted outcome model ghat (method.md section 4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpo_fast.pipeline.data import Encoded


def mean_pooled_features(model: Any, encoded: Encoded, batch_size: int = 32,
                         device: Any = None) -> np.ndarray:
    """[n, d] masked mean of last hidden states over real tokens."""
    raise NotImplementedError


def features_from_callable(fn: Callable[[list[str]], Any], texts: list[str],
                           batch_size: int = 256) -> np.ndarray:
    """Features from a user embedding callable texts -> [n, d]."""
    raise NotImplementedError


@dataclass
class OutcomeFit:
    oof_pred: np.ndarray
    r2: float
    rmse: float
    folds: int
    kind: str
    fold_models: list[Any] = field(default_factory=list, repr=False)

    def predict(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def fit_outcome_model(features: np.ndarray, y: np.ndarray, *, kind: str = "ridge",
                      folds: int = 5, seed: int = 0, alpha: float | None = None
                      ) -> OutcomeFit:
    raise NotImplementedError
