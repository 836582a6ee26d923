"""Semi-synthetic direct-outcome corpus with a known oracle g* (method.md section 8).

(Interface; the generative story is documented here once implemented.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpo_fast.pipeline.data import OutcomeTable


def oracle(texts: list[str]) -> np.ndarray:
    """g*(x) for arbitrary texts (float64 [n])."""
    raise NotImplementedError


def make_corpus(n: int = 2000, *, confounding: float = 0.5, noise: float = 0.5,
                seed: int = 0) -> OutcomeTable:
    """n rows with texts, outcomes y = g*(x) + noise, groups = the confounding attribute."""
    raise NotImplementedError


def write_corpus(table: OutcomeTable, path: str | Path) -> Path:
    """Write columns id, text, outcome, group to CSV (readable by load_table)."""
    raise NotImplementedError
