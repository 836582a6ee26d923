"""The sweeps' statistics and table (cpo_fast/bench/sweep.py)."""

from __future__ import annotations

import numpy as np
import pytest


def test_sweep_marks_collapsed_runs_and_intervals():
    from cpo_fast.bench.sweep import markdown, summarize, t_interval

    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2.0 - 4.303 / np.sqrt(3)) and hi > m
    base = dict(level=0.5, remedy="-", ghat=None, ghat_outside=None, distinct=1.0, collapsed=False)
    recs = [dict(base, method="f_0", seed=s, judge=3.0) for s in (0, 1)]
    recs += [dict(base, method="dr_cpo", remedy="none", seed=s, judge=3.5, collapsed=s == 1)
             for s in (0, 1)]
    rows = summarize(recs)
    dr = next(r for r in rows if r["method"] == "dr_cpo")
    assert dr["gain"][0] == pytest.approx(0.5) and dr["collapsed"] == 1
    assert "(1/2 collapsed)" in markdown(rows, title="t", judge="j", meta={})
