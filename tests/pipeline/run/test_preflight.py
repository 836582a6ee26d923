"""Checks before the first expensive stage (cpo_fast/pipeline/run/preflight.py). Most are
reached through the command line: tests/test_cli.py."""

from __future__ import annotations

import numpy as np


def test_constant_outcome_warns(tmp_path, recwarn):
    from cpo_fast.pipeline.run.config import RunConfig
    from cpo_fast.pipeline.run.preflight import check_outcomes

    check_outcomes(RunConfig(), np.full(10, 3.0))
    assert any("constant outcome" in str(w.message) for w in recwarn.list)
    check_outcomes(RunConfig(), np.arange(10.0))
    assert sum("constant outcome" in str(w.message) for w in recwarn.list) == 1
