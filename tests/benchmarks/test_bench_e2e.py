"""benchmarks/bench_e2e.py --quick: it runs and writes what it promises (numbers unchecked;
docs/benchmarks.md, "bench_e2e")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BENCH = ROOT / "benchmarks" / "bench_e2e.py"

pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.mark.skipif(not BENCH.exists(), reason="benchmarks/ not in this checkout")
def test_bench_e2e_quick_writes_every_path(tmp_path: Path) -> None:
    from cpo_fast.bench.e2e import PATHS

    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (jpath,) = tmp_path.glob("*-e2e-quick.json")
    assert jpath.with_suffix(".md").is_file()
    rec = json.loads(jpath.read_text())
    assert rec["schema"] == "cpo_fast-bench/1" and rec["benchmark"] == "e2e"
    assert {"loadavg_before", "loadavg_after", "torch", "device"} <= set(rec["environment"])
    rows = rec["rows"]
    for ft in ("lora", "full"):
        got = {r["path"]: r for r in rows if r["finetune"] == ft}
        assert set(got) == set(PATHS), (ft, sorted(got))
        for path, r in got.items():
            if path in ("liger", "cce") and rec["environment"]["device_type"] == "cpu":
                assert r["status"] == "n/a (Triton GPU only)"
            elif path.startswith("trl") and r["status"].startswith("error: ModuleNotFound"):
                continue  # trl not installed here
            elif path == "compile":
                assert r["status"] == "ok" or r["status"].startswith("skipped"), r["status"]
            else:
                assert r["status"] == "ok", (path, r["status"])
                assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
                assert r["tokens_per_s"] > 0 and "max_batch_note" in r
        losses = {round(r["loss"], 3) for r in got.values() if "loss" in r}
        assert len(losses) == 1, losses  # every path computes the same loss
    md = jpath.with_suffix(".md").read_text()
    assert "## Targets" in md and "n/a (Triton GPU only)" in md
