"""Compile gate: every Triton kernel builds for sm_80 and sm_90a, spill-free at its defaults.

Runs benchmarks/gpu_static.py --gate in a subprocess with TRITON_INTERPRET unset (conftest
sets it for the numerics tests, and the interpreter would replace the compiler this
checks). The script drives the real launchers (with and without a head transform) on meta
tensors under a stub CUDA driver, compiles each launch with triton.compile for the GPU
targets and reads ptxas -v. It builds every default config (flags all off and all on, the
latter also with a softcap) and a seeded sample of the other flag combinations, head
transforms and vocabulary buckets (CPO_FAST_GATE_SEED picks the sample). No GPU needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compiler_env, gpu_toolchain_missing

SCRIPT = ROOT / "benchmarks" / "gpu_static.py"


def test_gpu_builds_fit(tmp_path: Path) -> None:
    if not SCRIPT.exists():
        pytest.skip("benchmarks/ not in this checkout")
    why = gpu_toolchain_missing()
    if why:
        pytest.skip(why)
    env = compiler_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # fresh: a cache hit can hide an error
    report = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--gate", "--jobs", "2", "--json", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["meta"]["failures"] == [], "\n".join(doc["meta"]["failures"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in doc["rows"] if "builds" in r]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel",
                       "_linear_token_logprobs_fwd_kernel", "_linear_token_logprobs_bwd_kernel"}
    # every dtype of every kernel was built at its defaults on both architectures
    for k in kernels:
        for dt in ("fp32", "bf16", "fp16"):
            hits = [r for r in rows if r["kernel"] == k and r["dtype"] == dt and r["default"]]
            assert hits, (k, dt)
            assert all(set(r["builds"]) == {"80", "90"} for r in hits)
    # the head-transform builds (HAS_SOFTCAP, the tanh epilogue) are defaults too: every
    # kernel and dtype, both architectures, so a spill there fails the gate
    for k in kernels:
        for dt in ("fp32", "bf16", "fp16"):
            capped = [r for r in rows if r["kernel"] == k and r["dtype"] == dt and r["default"]
                      and r["consts"].get("HAS_SOFTCAP") and r["consts"].get("HAS_TRANSFORM")]
            assert capped, (k, dt, "no softcap build at the defaults")
            assert all(set(r["builds"]) == {"80", "90"} for r in capped)
    # the static speed budgets of the matmul kernels: tensor cores and a pipelined K loop
    for r in rows:
        if r["kernel"].startswith("_linear") and r["dtype"] != "fp32":
            assert r["builds"]["80"]["mma"] > 0 and r["builds"]["90"]["wgmma"] > 0, r["tag"]
        if r["kernel"].startswith("_linear"):
            assert all(b["cp_async"] + b["tma"] > 0 for b in r["builds"].values()), r["tag"]
        if r["kernel"].startswith("_token") and r["default"]:
            assert all(b["warps_per_sm"] >= 8 for b in r["builds"].values()), r["tag"]
