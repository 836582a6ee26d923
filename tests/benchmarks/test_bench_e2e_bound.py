"""Smoke test: benchmarks/bench_e2e_bound.py runs its four parts and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BENCH = ROOT / "benchmarks" / "bench_e2e_bound.py"


def test_bench_e2e_bound_quick(tmp_path: Path) -> None:
    if not BENCH.exists():
        pytest.skip("benchmarks/ not in this checkout")
    pytest.importorskip("peft")
    subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    (jpath,) = tmp_path.glob("*-e2e-bound-quick.json")
    record = json.loads(jpath.read_text())
    assert record["benchmark"] == "e2e-bound"
    assert [(r["finetune"]) for r in record["rows"]] == ["lora", "full"]
    for row, s in zip(record["rows"], record["summary"]["rows"], strict=True):
        ms = {p: row[p]["median_ms"] for p in ("eager", "cpo_fast", "backbone", "gemms")}
        assert all(v > 0 for v in ms.values()), ms
        assert s["bound_vs_eager"] == pytest.approx(ms["eager"] / (ms["backbone"] + ms["gemms"]))
    md = jpath.with_suffix(".md").read_text()
    assert "| llama | 512 | lora |" in md and "bound vs eager" in md
