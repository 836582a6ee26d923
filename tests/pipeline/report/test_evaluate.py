"""Evaluating a model (cpo_fast/pipeline/report/evaluate.py) on the session's prepared run."""

from __future__ import annotations

import json

import pytest

from cpo_fast.pipeline.report.plots import outcome_bars
from cpo_fast.pipeline.stages.synthetic import oracle


def test_evaluate(prep, tmp_path):
    from cpo_fast.pipeline.report.evaluate import evaluate_model, write_eval

    res = evaluate_model(prep, prep.load_f0(), name="f_0", scorers={"oracle": oracle})
    for key in ("oracle", "ghat"):
        assert res[key]["lo"] <= res[key]["mean"] <= res[key]["hi"]
    op = res["off_policy"]
    # f_0 against itself: every weight is 1, so IPW = SNIPS = the held-out mean outcome.
    assert op["ess"] == pytest.approx(len(prep.eval_enc), rel=1e-6)
    assert op["ipw"]["estimate"] == pytest.approx(prep.eval_table.outcomes.mean(), rel=1e-5)
    assert "dr" in op and len(res["samples"]) == prep.cfg.num_samples
    write_eval(res, tmp_path / "f0.json")
    assert json.loads((tmp_path / "f0.json").read_text())["name"] == "f_0"
    # evaluate_model's results are what the bar plot reads (plots: test_plots.py)
    assert outcome_bars({"f_0": res, "x": res}, "oracle", tmp_path / "c.png").stat().st_size > 1000
