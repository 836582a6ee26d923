"""Smoke test: benchmarks/bench_cpu.py's cases run and its report renders (numbers unchecked)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import ROOT

from cpo_fast.bench import harness
from cpo_fast.bench.environment import environment

BENCH = ROOT / "benchmarks" / "bench_cpu.py"


@pytest.fixture(scope="module")
def bench():
    if not BENCH.exists():
        pytest.skip("benchmarks/ not in this checkout")
    pytest.importorskip("cpo_fast._C", reason="bench_cpu.py times the C++ core")
    spec = importlib.util.spec_from_file_location("bench_cpu_smoke", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_cpu_cases_and_report(bench, tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(reps=2, linear_reps=1, no_compile=True)
    shape = {"N": 16, "V": 257, "d": 32, "sweep_v": [257]}
    cases = bench.cases(args, shape)
    assert cases[0]["case"] == "copy" and not any(c["variant"] == "compile" for c in cases)
    cases[0]["bytes"] = 1 << 20
    # One case through the subprocess path (--child), the others in this process.
    rows = [bench.run_case(cases[0])] + [bench.child(c) for c in cases[1:]]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    copy = rows.pop(0)
    assert copy["copy_bandwidth_gbs"] > 0
    for r in rows:
        if r["reps"]:
            assert r["iters"] == r["reps"] and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    floors = {k: copy[k] for k in ("copy_bandwidth_gbs", "copy_bytes", "copy_timing")}
    env = environment("cpu")
    record = {"environment": env, "rows": rows, "floors": floors}
    summary = bench.summarize(record)
    assert summary["logits/float32/eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    jpath, mpath = harness.write_results(
        "cpu", env, settings={**shape, "quick": True}, floors=floors, rows=rows,
        summary=summary, markdown=bench.render, out_dir=tmp_path, quick=True)
    data = json.loads(jpath.read_text())
    assert data["schema"] == "cpo_fast-bench/1" and data["benchmark"] == "cpu"
    assert jpath.name.endswith("-cpu-quick.json") and "T" in data["timestamp"]
    assert {"torch", "triton", "device", "loadavg_before", "loadavg_after"} <= set(data["environment"])
    text = mpath.read_text()
    assert text.startswith("# CPU benchmark") and "| float32 | ours |" in text
