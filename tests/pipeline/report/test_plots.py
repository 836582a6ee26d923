"""The plots of a run (cpo_fast/pipeline/report/plots.py): PNGs from metrics.jsonl files and
results, and matplotlib loaded at the first plot only (not by the CLI's import)."""

from __future__ import annotations

import json
import subprocess
import sys

from cpo_fast.pipeline.report.plots import outcome_bars, read_metrics, training_curves, weight_histogram


def test_plots_of_metrics_and_results(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"step": 1, "loss": 1.0, "ess": 4.0, "batch_rows": 8,
                             "log_weights": [0.0, 0.1, -0.2]}) + "\n")
    assert read_metrics(m)[0]["ess"] == 4.0 and read_metrics(tmp_path / "missing.jsonl") == []
    res = {"oracle": {"mean": 3.0, "lo": 2.8, "hi": 3.2}}
    for path in (training_curves({"cpo": m}, tmp_path / "a.png"),
                 weight_histogram({"cpo": m}, tmp_path / "b.png"),
                 outcome_bars({"f_0": res, "x": res}, "oracle", tmp_path / "sub" / "c.png")):
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_does_not_import_matplotlib():
    code = "import sys, cpo_fast.cli; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
