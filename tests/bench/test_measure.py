"""Timing and peak-memory helpers (cpo_fast/bench/measure.py): ``summarize`` against numpy's
linear percentiles, ``measure`` on a fake clock (the warm-up calls untimed, the timed calls'
known durations summarized), ``sync`` touching CUDA only for a CUDA device, ``rss_bytes``
against /proc/self/status read here, and ``peak_extra_memory`` seeing a touched 64 MiB buffer
(and None where the peak RSS cannot be reset)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cpo_fast.bench import measure as M


@pytest.mark.parametrize("times", [[5.0, 1.0, 3.0, 2.0, 4.0], [10.0, 12.5],
                                   [3.1, 0.2, 9.9, 4.4, 4.4, 7.0, 1.5]])
def test_summarize_against_numpy(times):
    s = M.summarize(times)
    assert s["median_ms"] == pytest.approx(np.median(times))
    assert s["p20_ms"] == pytest.approx(np.percentile(times, 20))
    assert s["p80_ms"] == pytest.approx(np.percentile(times, 80))
    assert s["min_ms"] == min(times) and s["iters"] == len(times)
    assert s["times_ms"] == times and s["times_ms"] is not times  # a copy, in call order


def test_summarize_known_values_one_and_none():
    s = M.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_ms"], s["p20_ms"], s["p80_ms"], s["min_ms"]) == pytest.approx((3, 1.8, 4.2, 1))
    assert M.summarize([]) == {"iters": 0}
    one = M.summarize([7.5])
    assert one == {"median_ms": 7.5, "p20_ms": 7.5, "p80_ms": 7.5, "min_ms": 7.5, "iters": 1,
                   "times_ms": [7.5]}


def test_measure_times_only_the_timed_calls(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(M.time, "perf_counter", lambda: clock[0])
    durations = iter([9.0, 9.0, 0.004, 0.001, 0.003, 0.002, 0.010])  # seconds; 2 warm-up first
    calls = []

    def fn():
        calls.append(1)
        clock[0] += next(durations)

    s = M.measure(fn, "cpu", warmup=2, iters=5)
    assert len(calls) == 7
    assert s["iters"] == 5
    assert s["times_ms"] == pytest.approx([4.0, 1.0, 3.0, 2.0, 10.0])
    assert s["median_ms"] == pytest.approx(3.0) and s["min_ms"] == pytest.approx(1.0)
    assert s["p80_ms"] == pytest.approx(np.percentile([4, 1, 3, 2, 10], 80))


def test_sync_touches_cuda_only_for_cuda(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: seen.append(a))
    M.sync("cpu")
    assert seen == []
    M.sync("cuda:1")
    M.sync(torch.device("cuda"))
    assert len(seen) == 2


def _status_field(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc (not Linux)")
def test_rss_bytes_reads_proc_status():
    assert M.rss_bytes("VmHWM") == _status_field("VmHWM")  # the peak: stable between reads
    assert abs(M.rss_bytes("VmRSS") - _status_field("VmRSS")) < 8 * M.MiB
    assert M.rss_bytes() == pytest.approx(M.rss_bytes("VmRSS"), abs=8 * M.MiB)
    assert M.rss_bytes("NoSuchField") == 0
    assert M.MiB == 1024 * 1024


def test_rss_bytes_zero_without_proc(monkeypatch):
    def nope(self):
        raise OSError("no /proc")

    monkeypatch.setattr(M.Path, "read_text", nope)
    assert M.rss_bytes("VmRSS") == 0


def test_peak_extra_memory_sees_a_touched_buffer():
    if not M.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs not writable here")
    n = 64 * M.MiB

    def alloc():
        t = torch.ones(n // 4, dtype=torch.float32)  # written: resident, not just reserved
        return float(t[-1])

    peak = M.peak_extra_memory(alloc, "cpu")
    assert peak is not None and peak >= 0.9 * n
    assert peak < 4 * n
    small = M.peak_extra_memory(lambda: None, "cpu")
    assert small is not None and small < 0.5 * n
    # after a reset the peak equals the present RSS (to within what the read itself moves)
    assert M.reset_peak_rss() is True
    assert M.rss_bytes("VmHWM") - M.rss_bytes("VmRSS") < 8 * M.MiB


def test_peak_extra_memory_none_where_reset_refused(monkeypatch):
    monkeypatch.setattr(M, "reset_peak_rss", lambda: False)
    assert M.peak_extra_memory(lambda: None, "cpu") is None


def test_reset_peak_rss_false_when_refused(monkeypatch):
    def refuse(self, *a, **k):
        raise PermissionError("read-only /proc")

    monkeypatch.setattr(M.Path, "write_text", refuse)
    assert M.reset_peak_rss() is False
