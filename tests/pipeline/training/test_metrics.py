"""What the loop records (cpo_fast/pipeline/training/metrics.py): one line per logged step,
the effective batch's diagnostics, a resumed run's file cut back to its checkpoint, a torn
last line dropped."""

from __future__ import annotations

import json

import pytest
import torch

from cpo_fast.estimators import LossOutput
from cpo_fast.pipeline.training.metrics import MetricsLog, read_metrics, step_metrics


def test_step_metrics_of_the_effective_batch():
    out = LossOutput(loss=torch.tensor(1.0), ess=torch.tensor(3.0), dm_ess=None,
                     weights=torch.tensor([2.0, 1.0, 0.0]), ess_tau=0.5)
    row = step_metrics(4, [0.25], [out], grad_norm=torch.tensor(2.0), lr=1e-3, seconds=2.0,
                       tokens=100, batch_rows=3)
    assert row["step"] == 4 and row["loss"] == 0.25 and row["ess"] == 3.0
    assert row["dm_ess"] is None and row["ess_tau"] == 0.5
    assert row["grad_norm"] == 2.0 and row["tokens_per_s"] == 50.0 and row["batch_rows"] == 3
    assert row["log_weights"][:2] == [pytest.approx(0.6931, abs=1e-4), 0.0]
    assert row["log_weights"][2] < -60  # log of a zero weight, clamped: finite
    sft = step_metrics(1, [2.0], [None], grad_norm=1.0, lr=1e-3, seconds=1.0, tokens=1,
                       batch_rows=1)
    assert sft["ess"] is None and "log_weights" not in sft


def test_log_every_force_and_resume_cut_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, 0, 2) as log:
        for step in range(1, 6):
            log.write({"step": step}, force=step == 5)
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 5]
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # a torn last line (kill -9 mid-write)
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 5]
    with MetricsLog(path, 4, 2) as log:  # resumed from the checkpoint of step 4
        log.write({"step": 6})
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 6]
    assert all(json.loads(ln) for ln in path.read_text().splitlines())
    with MetricsLog(path, 0, 1, enabled=False) as log:  # ranks other than 0 write nothing
        log.write({"step": 1})
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 6]
    assert read_metrics(path, up_to=4) == [{"step": 2}, {"step": 4}]
