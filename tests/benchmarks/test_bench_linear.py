"""Smoke test: benchmarks/bench_linear.py runs end to end at its smallest setting (CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import ROOT

BENCH = ROOT / "benchmarks" / "bench_linear.py"


def test_bench_linear_smallest(tmp_path: Path) -> None:
    if not BENCH.exists():
        pytest.skip("benchmarks/ not in this checkout")
    spec = importlib.util.spec_from_file_location("bench_linear_smoke", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--cpu", "--smallest", "--out", str(tmp_path)])
    data = json.loads(Path(out["json"]).read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["reference"]["status"] == "ok" and rows["reference"]["median_ms"] > 0
    assert rows["reference"]["p20_ms"] <= rows["reference"]["median_ms"] <= rows["reference"]["p80_ms"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert rows["ours-triton-interp"]["status"] == "ok"
    for peer in ("eager", "compile", "liger", "cce"):
        assert rows[peer]["status"].startswith("skipped")
    assert Path(out["markdown"]).read_text().startswith("# Fused-linear path")
    assert data["floors"]["matmul_gflops"] > 0
    assert data["schema"] == "cpo_fast-bench/1" and data["benchmark"] == "linear"
    assert Path(out["json"]).name.endswith("-linear-quick.json")
