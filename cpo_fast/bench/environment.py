"""The environment record: what a benchmark's figures depend on, taken at the start of a run.

One function for every record: ``cpo-fast bench``'s and each script's in benchmarks/
(docs/benchmarks.md, "Results schema"). The scripts add ``loadavg_after`` when they write
their results (cpo_fast.bench.harness.write_results).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

VERSIONS = ("triton", "cpo_fast", "transformers", "peft", "trl")


def environment(device: str, *, versions: tuple[str, ...] = ()) -> dict:
    """Device, versions (VERSIONS and ``versions``), threads, load, commit; on CUDA the
    CUDA version, on the CPU the C++ core's kernel build and transparent huge pages."""
    cuda = str(device).startswith("cuda")
    env = {
        "device": device_name(device), "device_type": "cuda" if cuda else "cpu",
        "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        **{dist: version(dist) for dist in (*VERSIONS, *versions)},
        "commit": git_commit(), "loadavg_before": list(os.getloadavg()),
    }
    if cuda:
        env["cuda"] = torch.version.cuda
    else:
        env.update(cpu_isa=_cpu_isa(), thp=_thp_mode())
    return env


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA; 'AMD EPYC (2 cores, avx512)' (cpuinfo model, core
    count, AVX-512 when the CPU has it) on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The vector ISA tells machines apart that /proc/cpuinfo names alike ("AMD EPYC" was a
    # 2-core AVX2 VM before it was an AVX-512 one): the CPU kernels pick their build from it.
    return f"{model} ({os.cpu_count()} cores{', avx512' if _has_avx512() else ''})"


def _has_avx512() -> bool:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), "")
    except OSError:
        return False
    return " avx512f " in f" {flags.split(':', 1)[-1]} " and " avx512bw " in f" {flags} "


def version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """Short commit of the checkout cpo_fast runs from, '+dirty' with local changes; None
    for an installed (non-checkout) package."""
    root = Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(root)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None  # not a checkout of this project (e.g. site-packages)
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_isa() -> str | None:
    try:
        from cpo_fast import _C
    except ImportError:
        return None
    return _C.isa()


def _thp_mode() -> str | None:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return None
