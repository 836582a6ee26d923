"""The harness of the scripts in benchmarks/: floors, results files, report helpers.

Every bench script takes its environment record with cpo_fast.bench.environment.environment,
times with cpo_fast.bench.measure.measure, measures memory with
cpo_fast.bench.measure.peak_extra_memory, measures its floor with :func:`copy_bandwidth` or
:func:`matmul_rate`, and writes one record with :func:`write_results` into the folder it
names (benchmarks/results/ by default). The record and the file names are described in
docs/benchmarks.md ("Results schema"):

    results/<device-slug>-<benchmark>[-quick].json   the record (schema below)
    results/<device-slug>-<benchmark>[-quick].md     the same run as a readable report

    {"schema": SCHEMA, "benchmark": "cpu" | "logits" | "linear" | "e2e",
     "timestamp": ISO 8601 UTC, "environment": {device, versions, threads, load, ...},
     "settings": {...}, "floors": {"copy_bandwidth_gbs" | "matmul_gflops": ...},
     "rows": [{... case keys, "variant", "status", "median_ms", "p20_ms", "p80_ms",
               "min_ms", "iters", "times_ms", "peak_extra_bytes", ...}],
     "summary": {...}}
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cpo_fast.bench.measure import MiB, measure

SCHEMA = "cpo_fast-bench/1"


# ---- floors --------------------------------------------------------------------------------

def copy_bandwidth(device: str, nbytes: int) -> dict:
    """Copy bandwidth, bytes read plus bytes written, of an ``nbytes`` fp32 tensor copy.

    ``copy_bandwidth_gbs`` comes from the fastest copy: interference on a shared machine
    only slows a run down, and a floor must not be slower than the machine can go.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.zeros_like(src)  # touched, so the timed copies pay no first-touch faults
    t = measure(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return {"copy_bandwidth_gbs": 2 * nbytes / (t["min_ms"] / 1e3) / 1e9, "copy_bytes": nbytes,
            "copy_timing": t}


def matmul_rate(device: str) -> dict:
    """Dense matmul rate from the fastest of 10 runs: bf16 8192^3 on CUDA, fp32 1024^3 on CPU."""
    on_gpu = torch.device(device).type == "cuda"  # "cuda:1" too
    n, dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=3, iters=10)
    return {"matmul_gflops": 2 * n**3 / (t["min_ms"] / 1e3) / 1e9,
            "matmul_shape": f"{str(dtype).removeprefix('torch.')} {n}^3", "matmul_timing": t}


# ---- results -------------------------------------------------------------------------------

def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_stem(device: str, benchmark: str, *, quick: bool = False) -> str:
    """The one file-name scheme: ``<device-slug>-<benchmark>[-quick]``."""
    return f"{slug(device)}-{benchmark}" + ("-quick" if quick else "")


def write_results(benchmark: str, env: dict, *, settings: dict, floors: dict, rows: list[dict],
                  markdown: str | Callable[[dict], str], summary: dict | None = None,
                  out_dir: Path, quick: bool = False) -> tuple[Path, Path]:
    """Finish the record (load after, timestamp) and write its .json and .md; return the paths.

    ``markdown`` may be a function of the finished record, so that a report is always
    rendered from exactly what the .json holds.
    """
    env = {**env, "loadavg_after": list(os.getloadavg())}
    record = {"schema": SCHEMA, "benchmark": benchmark,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": env, "settings": settings, "floors": floors, "rows": rows,
              "summary": summary or {}}
    return write_record(record, markdown, out_dir=out_dir, quick=quick)


def write_record(record: dict, markdown: str | Callable[[dict], str], *,
                 out_dir: Path, quick: bool = False) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(record["environment"]["device"], record["benchmark"], quick=quick)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(record, indent=1) + "\n")
    mpath.write_text(markdown(record) if callable(markdown) else markdown)
    return jpath, mpath


def rerender(json_path: str | Path, summary_of: Callable[[dict], object],
             markdown: Callable[[dict], str], out_dir: Path | None = None) -> None:
    """Rebuild a results file's summary and report from its JSON (``--render``)."""
    record = json.loads(Path(json_path).read_text())
    record["summary"] = summary_of(record)
    for p in write_record(record, markdown, out_dir=out_dir or Path(json_path).parent,
                          quick=record["settings"].get("quick", False)):
        print("wrote", p)


def environment_lines(record: dict) -> list[str]:
    """The report's header bullets, the same for every benchmark."""
    env = record["environment"]
    load = lambda k: tuple(round(x, 2) for x in env.get(k) or ())
    versions = f"torch {env['torch']}, triton {env.get('triton')}, cpo_fast {env.get('cpo_fast')}"
    extra = (f", kernel build {env.get('cpu_isa')}, THP {env.get('thp')}"
             if env.get("device_type") == "cpu" else f", CUDA {env.get('cuda')}")
    return [
        f"- {env['device']}, {env['threads']} torch threads{extra}",
        f"- {versions}, Python {env['python']}, commit {env.get('commit')}",
        f"- {record['timestamp']}; load average (1, 5, 15 min) before / after: "
        f"{load('loadavg_before')} / {load('loadavg_after')} (above the core count, other "
        "processes competed for the CPU during the run)",
        "- time: median of the timed runs [p20, p80]; memory: peak extra bytes of one "
        "fwd+bwd (CUDA allocator peak, or peak RSS growth on the CPU)",
    ]


def fmt_ms(row: dict, digits: int = 1) -> str:
    """'112.0 [104.0, 120.3]' (median [p20, p80]), or the row's status when it did not run."""
    if "median_ms" not in row:
        return str(row.get("status", "n/a"))
    return (f"{row['median_ms']:.{digits}f} [{row['p20_ms']:.{digits}f}, "
            f"{row['p80_ms']:.{digits}f}]")


def fmt_mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{max(nbytes, 0) / MiB:.1f}"


def fmt_table(headers: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one letter per column, 'l' or 'r' (default all left)."""
    rule = [("---:" if a == "r" else "---") for a in (align or "l" * len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
