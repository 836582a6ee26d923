"""Evaluating a model (cpo_fast/pipeline/report/evaluate.py) and the plots of a run
(cpo_fast/pipeline/report/plots.py) on the session's prepared run."""

from __future__ import annotations

import json

import pytest

from cpo_fast.pipeline.stages.synthetic import oracle


def test_evaluate_and_plots(prep, tmp_path):
    from cpo_fast.pipeline.report.evaluate import evaluate_model, write_eval
    from cpo_fast.pipeline.report.plots import outcome_bars, training_curves, weight_histogram

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
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"step": 1, "loss": 1.0, "ess": 4.0, "batch_rows": 8,
                             "log_weights": [0.0, 0.1, -0.2]}) + "\n")
    for path in (training_curves({"cpo": m}, tmp_path / "a.png"),
                 weight_histogram({"cpo": m}, tmp_path / "b.png"),
                 outcome_bars({"f_0": res, "x": res}, "oracle", tmp_path / "c.png")):
        assert path.stat().st_size > 1000
