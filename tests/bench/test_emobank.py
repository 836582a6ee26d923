"""EmoBank as a confounded corpus, and its judge (cpo_fast/bench/emobank.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT


def test_emobank_confounding_and_judge():
    import os

    from cpo_fast.bench.emobank import confounded_emobank

    path = Path(os.environ.get("EMOBANK_CSV") or ROOT.parent / "shared" / "data" / "emobank.csv")
    if not path.is_file():
        pytest.skip("EmoBank not present (../shared/data/emobank.csv or $EMOBANK_CSV)")
    corr = []
    for c in (0.0, 0.8):
        t = confounded_emobank(path, confounding=c, rows=3000, seed=0)
        g = np.asarray(t.groups)
        warm = np.isin(g, ["letters", "travel-guides"])
        corr.append(np.corrcoef(warm, t.outcomes)[0, 1])
    assert corr[1] > corr[0] + 0.1  # selection makes genre a stronger proxy for valence
    try:
        from cpo_fast.bench.emobank import vader

        s = vader(["what a wonderful, happy day", "this is awful and sad"])
    except ImportError:
        pytest.skip("vaderSentiment not installed (the bench extra)")
    assert s[0] > 0.5 and s[1] < -0.5
