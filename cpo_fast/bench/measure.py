"""Timing and peak-memory helpers of ``cpo-fast bench`` and of every script in benchmarks/
(docs/benchmarks.md, "Timing" and "Memory")."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

MiB = 1 << 20


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def summarize(times_ms: list[float]) -> dict:
    """median, p20, p80 and min of wall times in ms (the schema's timing fields)."""
    if not times_ms:
        return {"iters": 0}
    if len(times_ms) == 1:
        q20 = q80 = times_ms[0]
    else:  # inclusive: the quantiles of the sample itself, interpolated linearly
        q20, _, _, q80 = statistics.quantiles(times_ms, n=5, method="inclusive")
    return {"median_ms": statistics.median(times_ms), "p20_ms": q20, "p80_ms": q80,
            "min_ms": min(times_ms), "iters": len(times_ms), "times_ms": list(times_ms)}


def measure(fn: Callable[[], object], device: str, *, warmup: int = 2, iters: int = 5) -> dict:
    """Time ``iters`` synchronized calls of fn() after ``warmup`` untimed ones: summarize()."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def rss_bytes(field: str = "VmRSS") -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: peak); 0 if absent."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_extra_memory(fn: Callable[[], object], device: str) -> int | None:
    """Peak bytes allocated by one call of fn() beyond what existed before it.

    CUDA: the caching allocator's peak statistic. CPU: the process's peak RSS (VmHWM),
    reset to the current RSS through /proc/self/clear_refs, minus the RSS before the call
    (tracemalloc cannot see torch's allocations). None where the reset is not allowed.
    """
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not reset_peak_rss():
        return None
    base = rss_bytes("VmRSS")
    fn()
    return rss_bytes("VmHWM") - base
