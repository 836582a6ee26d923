"""Scorers of generated texts named on the command line (``--scorer module:function``):
loaded and checked before any work (run/preflight.py), run by the evaluation."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

Scorer = Callable[[list[str]], np.ndarray]


def load_scorer(spec: str) -> tuple[str, Scorer]:
    """``'package.module:function'`` -> (function name, the function)."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"--scorer {spec!r}: expected 'module:function', e.g. "
                         "'cpo_fast.pipeline.stages.synthetic:oracle'.")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--scorer {spec!r}: cannot load it ({e}).") from None
    if not callable(f):
        raise ValueError(f"--scorer {spec!r} is not callable.")
    return fn, f


def run_scorer(name: str, fn: Scorer, texts: list[str]) -> np.ndarray:
    """``fn(texts)`` as one finite float per text, or an error naming the scorer."""
    try:
        out = fn(list(texts))
        if isinstance(out, (str, bytes)):
            raise TypeError(f"returned a {type(out).__name__}")
        v = np.asarray(out, dtype=np.float64).reshape(-1)
    except Exception as e:  # a user's scorer can fail in any way: say whose fault it is
        raise ValueError(f"--scorer {name!r}: {type(e).__name__}: {e}; a scorer takes a list "
                         "of texts and returns one number per text.") from None
    if len(v) != len(texts):
        raise ValueError(f"--scorer {name!r}: returned {len(v)} numbers for {len(texts)} texts; "
                         "it must return one number per text.")
    if not np.isfinite(v).all():
        raise ValueError(f"--scorer {name!r}: returned NaN or infinite scores.")
    return v
