"""The weight-collapse guard (cpo_fast/pipeline/training/guard.py; issue 11): it warns once,
naming the step and the remedy, stops when asked, and in a tiny run the DM diagnostics reach
metrics.jsonl and the results (with ghat's support), and the guard stops the loop."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.stages.synthetic import make_corpus, oracle, write_corpus
from cpo_fast.pipeline.training.guard import WeightCollapseWarning, WeightGuard, weight_stats

TINY = dict(text_column="text", outcome_column="outcome", group_column="group", id_column="id",
            max_tokens=40, vocab_size=200, hidden_size=32, num_layers=1, num_heads=2,
            f0_steps=6, f0_batch_size=16, steps=4, batch_size=8, dm_batch_size=8, dm_size=24,
            num_samples=12, max_new_tokens=12, bootstrap=50, outcome_folds=3, warmup_steps=1,
            save_every=0, progress=False, batch_size_eval=32, eval_fraction=0.2, lora_r=4,
            threads=None)


def test_guard_warns_once_with_step_and_remedy():
    g = WeightGuard(threshold=0.2, batch_size=10, dm_batch_size=20, window=2)
    ok = {"ess": 9.0, "dm_ess": 18.0}
    assert not g.update(1, ok)
    with pytest.warns(WeightCollapseWarning, match=r"step 3: the DM-set .*--kl-coef"):
        g.update(2, {"ess": 9.0, "dm_ess": 4.0})  # window mean 0.55: no collapse yet
        g.update(3, {"ess": 9.0, "dm_ess": 1.0})  # window mean (4 + 1) / 2 / 20 = 0.125
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert not g.update(4, {"ess": 0.5, "dm_ess": 1.0})  # stop=False: never stops
    s = g.summary()
    assert s["weights_collapsed"] and s["collapse_step"] == 3 and s["collapse_term"] == "dm_ess"
    assert s["min_dm_ess_share"] == pytest.approx(0.05)


def test_guard_stop_flag_off_switch_and_oo_rlhf():
    g = WeightGuard(threshold=0.5, stop=True, batch_size=4, dm_batch_size=8, window=1)
    with pytest.warns(WeightCollapseWarning, match="outcome-row"):
        assert g.update(1, {"ess": 1.0, "dm_ess": 8.0})
    off = WeightGuard(threshold=0.0, stop=True, batch_size=4, window=1)
    assert not off.update(1, {"ess": 0.01}) and not off.summary()["weights_collapsed"]
    oo = WeightGuard(threshold=0.5, batch_size=64, dm_batch_size=8, window=1)
    assert oo.shares({"ess": 6.0, "dm_ess": 6.0}, dm_only=True) == {"ess": 0.75}
    with pytest.raises(ValueError, match="--ess-guard"):
        WeightGuard(threshold=1.5)


def test_weight_stats_dm_max_share():
    import torch

    class Lo:
        dm_weights = torch.tensor([1.0, 1.0, 2.0])

    assert weight_stats([Lo()])["dm_max_weight_share"] == pytest.approx(0.5)
    assert weight_stats([])["dm_max_weight_share"] is None


# ----------------------------------------------------------------------------- in the pipeline

# This module's own prepared run (a dr_cpo config of 4 steps): it replaces the session-wide
# ``prep`` of tests/pipeline/conftest.py here.
@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    from cpo_fast.pipeline.training.prepare import prepare

    data = tmp_path_factory.mktemp("data") / "corpus.csv"
    write_corpus(make_corpus(120, seed=1), data)
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(data=str(data), output_dir=str(out), method="dr_cpo", **TINY).validate()
    return prepare(cfg, need_dm=True)


def test_dm_diagnostics_and_support_in_outputs(prep, tmp_path):
    from cpo_fast.pipeline.report.evaluate import evaluate_model, support_note
    from cpo_fast.pipeline.report.plots import training_curves
    from cpo_fast.pipeline.training.loop import train_policy

    info = json.loads((prep.out / "outcome_model.json").read_text())
    lo, hi = info["bound"]
    assert lo == pytest.approx(prep.train_table.outcomes.min())
    assert {"ood_share", "clipped_share", "raw_max"} <= set(info["dm_set"])
    assert np.all((prep.dm_ghat >= lo) & (prep.dm_ghat <= hi))

    cfg = dataclasses.replace(prep.cfg, ess_guard=0.0)
    policy, summary = train_policy(prep, cfg, out_dir=tmp_path / "dr")
    rows = [json.loads(s) for s in (tmp_path / "dr" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.steps
    for r in rows:
        assert 1.0 <= r["dm_ess"] <= cfg.dm_batch_size + 1e-4
        assert 1.0 / cfg.dm_batch_size - 1e-6 <= r["dm_max_weight_share"] <= 1.0
        assert r["dm_batch_rows"] == cfg.dm_batch_size
    assert "weights_collapsed" in summary and "min_dm_ess_share" in summary
    res = evaluate_model(prep, policy, name="dr_cpo", scorers={"oracle": oracle})
    sup = res["ghat_support"]
    assert 0.0 <= sup["ood_share"] <= 1.0 and sup["n"] == cfg.num_samples
    assert all("ghat_outside" in s for s in res["samples"])
    assert res["ghat"]["hi"] <= hi + 1e-9
    assert "outside ghat's support" in support_note(res)
    png = training_curves({"dr": tmp_path / "dr" / "metrics.jsonl"}, tmp_path / "t.png",
                          guard=0.1)
    assert png.stat().st_size > 1000


def test_guard_in_the_loop_warns_and_stops(prep, tmp_path):
    from cpo_fast.pipeline.training.loop import train_policy

    # a threshold above any reachable ESS share fires at the first full window
    cfg = dataclasses.replace(prep.cfg, ess_guard=0.999, stop_on_collapse=True, steps=8,
                              lr=5e-2)
    with pytest.warns(WeightCollapseWarning, match="step"):
        _, summary = train_policy(prep, cfg, out_dir=tmp_path / "stop")
    assert summary["weights_collapsed"] and not summary["finished"]
    assert summary["steps_done"] == summary["collapse_step"] < cfg.steps
