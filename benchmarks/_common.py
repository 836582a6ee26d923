"""Shared benchmark plumbing: timing, peak memory, device names, results files."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: str) -> dict:
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "loadavg": os.getloadavg()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time in ms of fn() (synchronized)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def peak_extra_memory(fn: Callable[[], object], device: str) -> int | None:
    """Peak bytes allocated by one call of fn() beyond what existed before it.

    CUDA: the caching allocator's peak statistic. CPU: the process's peak RSS (VmHWM),
    reset through /proc/self/clear_refs, minus the RSS before the call (None where the
    kernel does not allow the reset).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    base = _rss_bytes("VmRSS")
    fn()
    return _rss_bytes("VmHWM") - base


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Measured copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * nbytes / (ms / 1e3)


def write_results(stem: str, env: dict, rows: list[dict], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{slug(env['device'])}-{stem}"
    jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    jpath.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    mpath.write_text(markdown)
    return jpath, mpath


def fmt_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)
