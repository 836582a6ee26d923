"""The logits benchmark script runs end to end on a tiny shape (its numbers are not checked)."""

import subprocess
import sys

from conftest import ROOT


def test_bench_logits_quick_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_logits.py"), "--quick", "--no-write",
         "--iters", "1", "--only", "ours", "eager"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 256 | 4096 | ours |" in out.stdout and "| 256 | 4096 | eager |" in out.stdout
