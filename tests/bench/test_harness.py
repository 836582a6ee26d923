"""The harness of the scripts in benchmarks/ (cpo_fast/bench/harness.py): the floors' arithmetic
on known fake timings (and one real tiny copy), the results-file names, ``write_results``
finishing the record (schema, timestamp, loadavg_after) and rendering the .md from exactly what
the .json holds, ``rerender`` rebuilding summary and report from a JSON file, and the report
helpers (header bullets, median [p20, p80], MiB, markdown tables) on given rows."""

from __future__ import annotations

import calendar
import json
import re
import time

import pytest
import torch

from cpo_fast.bench import harness as H
from cpo_fast.bench.measure import MiB


def _fake_measure(min_ms: float, seen: list):
    def fake(fn, device, *, warmup=2, iters=5):
        seen.append((device, warmup, iters))
        fn()
        return {"median_ms": 2 * min_ms, "p20_ms": min_ms, "p80_ms": 3 * min_ms,
                "min_ms": min_ms, "iters": iters, "times_ms": [min_ms] * iters}
    return fake


def test_copy_bandwidth_from_the_fastest_copy(monkeypatch):
    seen = []
    monkeypatch.setattr(H, "measure", _fake_measure(0.5, seen))
    nbytes = 4096
    out = H.copy_bandwidth("cpu", nbytes)
    # bytes read plus bytes written, over the fastest copy's time
    assert out["copy_bandwidth_gbs"] == pytest.approx(2 * 4096 / 0.5e-3 / 1e9)
    assert out["copy_bytes"] == nbytes and out["copy_timing"]["min_ms"] == 0.5
    assert seen == [("cpu", 3, 10)]


def test_copy_bandwidth_real_tiny_copy():
    out = H.copy_bandwidth("cpu", 1 << 16)
    t = out["copy_timing"]
    assert t["iters"] == 10 and len(t["times_ms"]) == 10
    assert out["copy_bandwidth_gbs"] == pytest.approx(2 * (1 << 16) / (t["min_ms"] / 1e3) / 1e9)


def test_matmul_rate_cpu_shape_and_rate(monkeypatch):
    seen = []
    monkeypatch.setattr(H, "measure", _fake_measure(8.0, seen))
    out = H.matmul_rate("cpu")
    assert out["matmul_shape"] == "float32 1024^3"
    assert out["matmul_gflops"] == pytest.approx(2 * 1024**3 / 8e-3 / 1e9)
    assert out["matmul_timing"]["min_ms"] == 8.0 and seen == [("cpu", 3, 10)]


@pytest.mark.parametrize("name, want", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("AMD EPYC 9R14 (2 cores, avx512)", "amd-epyc-9r14-2-cores-avx512"),
    ("  Intel(R) Xeon(R) CPU @ 2.20GHz ", "intel-r-xeon-r-cpu-2-20ghz"),
])
def test_slug(name, want):
    assert H.slug(name) == want
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", H.slug(name))


def test_results_stem():
    assert H.results_stem("NVIDIA H100", "e2e") == "nvidia-h100-e2e"
    assert H.results_stem("NVIDIA H100", "logits", quick=True) == "nvidia-h100-logits-quick"


ENV = {"device": "Test CPU (2 cores)", "device_type": "cpu", "threads": 2, "torch": "2.x",
       "triton": "3.y", "cpo_fast": "0.1.0", "python": "3.11.0", "commit": "abc1234",
       "loadavg_before": [0.5, 0.25, 0.125], "cpu_isa": "avx2", "thp": "always [madvise] never"}


def test_write_results_finishes_the_record(tmp_path):
    env = dict(ENV)
    rows = [{"variant": "eager", "status": "ok", "median_ms": 1.0}]
    seen = []

    def md(rec):
        seen.append(rec)
        return f"# {rec['benchmark']} rows={len(rec['rows'])} after={rec['environment']['loadavg_after']}"

    before = time.time()
    jpath, mpath = H.write_results("logits", env, settings={"quick": True, "vocab": 7},
                                   floors={"copy_bandwidth_gbs": 1.5}, rows=rows, markdown=md,
                                   out_dir=tmp_path / "sub", quick=True)
    assert jpath == tmp_path / "sub" / "test-cpu-2-cores-logits-quick.json"
    assert mpath == jpath.with_suffix(".md")
    rec = json.loads(jpath.read_text())
    assert rec["schema"] == H.SCHEMA == "cpo_fast-bench/1"
    assert rec["benchmark"] == "logits" and rec["rows"] == rows and rec["summary"] == {}
    assert rec["settings"] == {"quick": True, "vocab": 7}
    assert rec["floors"] == {"copy_bandwidth_gbs": 1.5}
    assert {k: v for k, v in rec["environment"].items() if k != "loadavg_after"} == ENV
    assert len(rec["environment"]["loadavg_after"]) == 3
    assert "loadavg_after" not in env  # the caller's record is not changed
    ts = calendar.timegm(time.strptime(rec["timestamp"], "%Y-%m-%dT%H:%M:%SZ"))
    assert before - 2 <= ts <= time.time() + 2  # UTC, now
    # the report is rendered from the finished record, the one the .json holds
    assert seen == [rec]
    assert mpath.read_text() == f"# logits rows=1 after={rec['environment']['loadavg_after']}"


def test_write_results_plain_markdown_and_summary(tmp_path):
    jpath, mpath = H.write_results("cpu", ENV, settings={}, floors={}, rows=[], markdown="hello\n",
                                   summary={"best": "x"}, out_dir=tmp_path)
    assert jpath.name == "test-cpu-2-cores-cpu.json"
    assert mpath.read_text() == "hello\n"
    assert json.loads(jpath.read_text())["summary"] == {"best": "x"}


def test_rerender_rebuilds_summary_and_report(tmp_path, capsys):
    rec = {"schema": H.SCHEMA, "benchmark": "linear", "timestamp": "2024-01-01T00:00:00Z",
           "environment": {**ENV, "loadavg_after": [1.0, 1.0, 1.0]},
           "settings": {"quick": True}, "floors": {}, "rows": [{"median_ms": 2.0}, {"median_ms": 4.0}],
           "summary": {"stale": True}}
    src = tmp_path / "in.json"
    src.write_text(json.dumps(rec))
    out = tmp_path / "out"
    H.rerender(src, lambda r: {"total_ms": sum(x["median_ms"] for x in r["rows"])},
               lambda r: f"total {r['summary']['total_ms']}", out_dir=out)
    j = out / "test-cpu-2-cores-linear-quick.json"
    assert json.loads(j.read_text()) == {**rec, "summary": {"total_ms": 6.0}}
    assert j.with_suffix(".md").read_text() == "total 6.0"
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {j}", f"wrote {j.with_suffix('.md')}"]


def test_rerender_defaults_to_the_json_folder(tmp_path, capsys):
    rec = {"benchmark": "e2e", "environment": {"device": "GPU X"}, "settings": {}, "rows": []}
    src = tmp_path / "whatever.json"
    src.write_text(json.dumps(rec))
    H.rerender(src, lambda r: {"n": 0}, lambda r: "md")
    assert json.loads((tmp_path / "gpu-x-e2e.json").read_text())["summary"] == {"n": 0}
    assert (tmp_path / "gpu-x-e2e.md").read_text() == "md"
    capsys.readouterr()


def test_environment_lines_cpu_and_cuda():
    rec = {"timestamp": "2024-05-06T07:08:09Z",
           "environment": {**ENV, "loadavg_after": [1.234, 0.5, 0.0]}}
    lines = H.environment_lines(rec)
    assert len(lines) == 4
    assert lines[0] == "- Test CPU (2 cores), 2 torch threads, kernel build avx2, THP always [madvise] never"
    assert lines[1] == "- torch 2.x, triton 3.y, cpo_fast 0.1.0, Python 3.11.0, commit abc1234"
    assert lines[2].startswith("- 2024-05-06T07:08:09Z; load average (1, 5, 15 min) before / after: "
                               "(0.5, 0.25, 0.12) / (1.23, 0.5, 0.0)")
    cuda = {"timestamp": "t", "environment": {"device": "NVIDIA H100", "device_type": "cuda",
                                              "threads": 8, "cuda": "12.4", "torch": "2.x",
                                              "python": "3.11", "loadavg_before": [1, 2, 3]}}
    c = H.environment_lines(cuda)
    assert c[0] == "- NVIDIA H100, 8 torch threads, CUDA 12.4"
    assert c[1] == "- torch 2.x, triton None, cpo_fast None, Python 3.11, commit None"
    assert "(1, 2, 3) / ()" in c[2]  # no loadavg_after yet


def test_fmt_ms_mib_and_table():
    row = {"median_ms": 112.0, "p20_ms": 104.0, "p80_ms": 120.26}
    assert H.fmt_ms(row) == "112.0 [104.0, 120.3]"
    assert H.fmt_ms(row, digits=2) == "112.00 [104.00, 120.26]"
    assert H.fmt_ms({"status": "oom"}) == "oom"
    assert H.fmt_ms({}) == "n/a"
    assert H.fmt_mib(None) == "-"
    assert H.fmt_mib(3 * MiB + MiB // 2) == "3.5"
    assert H.fmt_mib(-5) == "0.0"
    t = H.fmt_table(["a", "bb", "c"], [[1, "x", None], ["y", 2.5, "z"]], align="lrl")
    assert t.splitlines() == ["| a | bb | c |", "|---|---:|---|", "| 1 | x | None |",
                              "| y | 2.5 | z |"]
    assert H.fmt_table(["h1", "h2"], []).splitlines() == ["| h1 | h2 |", "|---|---|"]


def test_matmul_rate_cuda_shape(monkeypatch):
    # The CUDA shape and dtype, without a GPU: the tensors are made on the meta device.
    seen = []
    monkeypatch.setattr(H, "measure", _fake_measure(100.0, seen))
    real_randn = torch.randn
    monkeypatch.setattr(H.torch, "randn",
                        lambda *s, device=None, dtype=None: real_randn(*s, device="meta", dtype=dtype))
    out = H.matmul_rate("cuda")
    assert out["matmul_shape"] == "bfloat16 8192^3"
    assert out["matmul_gflops"] == pytest.approx(2 * 8192**3 / 0.1 / 1e9)


def test_matmul_rate_cuda_index_is_cuda(monkeypatch):
    monkeypatch.setattr(H, "measure", _fake_measure(100.0, []))
    real_randn = torch.randn
    monkeypatch.setattr(H.torch, "randn",
                        lambda *s, device=None, dtype=None: real_randn(*s, device="meta", dtype=dtype))
    assert H.matmul_rate("cuda:1")["matmul_shape"] == "bfloat16 8192^3"
