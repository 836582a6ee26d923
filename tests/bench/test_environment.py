"""The environment record (cpo_fast/bench/environment.py): ``environment`` has every field the
results files and reports read (cpo_fast.bench.harness.environment_lines, report.render), with
values checked against this machine read independently (cores, threads, versions, the CPU
model and AVX-512 flags from /proc/cpuinfo, the kernel build, THP, the git commit); the CUDA
branch with a faked device name; ``version`` and ``git_commit`` on present and absent inputs."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from cpo_fast.bench import environment as E

CPU_FIELDS = {"device", "device_type", "cores", "threads", "python", "torch", "triton", "cpo_fast",
              "transformers", "peft", "trl", "commit", "loadavg_before", "cpu_isa", "thp"}


def _cpuinfo() -> str:
    p = Path("/proc/cpuinfo")
    return p.read_text() if p.exists() else ""


def test_cpu_record_fields_and_values():
    env = E.environment("cpu")
    assert set(env) == CPU_FIELDS
    assert env["device_type"] == "cpu"
    assert env["cores"] == os.cpu_count() and env["threads"] == torch.get_num_threads()
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    for dist in E.VERSIONS:
        try:
            want = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            want = None
        assert env[dist] == want, dist
    assert isinstance(env["loadavg_before"], list) and len(env["loadavg_before"]) == 3
    assert all(x >= 0 for x in env["loadavg_before"])
    assert env["device"] == E.device_name("cpu")


def test_cpu_kernel_build_and_thp():
    env = E.environment("cpu")
    try:
        from cpo_fast import _C
    except ImportError:
        assert env["cpu_isa"] is None
    else:
        assert env["cpu_isa"] == _C.isa()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    assert env["thp"] == (thp.read_text().strip() if thp.exists() else None)


def test_extra_versions():
    env = E.environment("cpu", versions=("pytest", "no-such-dist-cpo-fast-test"))
    assert env["pytest"] == pytest.__version__
    assert env["no-such-dist-cpo-fast-test"] is None
    assert E.version("pytest") == pytest.__version__
    assert E.version("no-such-dist-cpo-fast-test") is None


def test_record_feeds_the_reports():
    # What harness.environment_lines and report.render read must be in the record.
    from cpo_fast.bench.harness import environment_lines
    from cpo_fast.bench.report import render

    env = E.environment("cpu")
    lines = environment_lines({"timestamp": "T", "environment": {**env, "loadavg_after": [0, 0, 0]}})
    assert lines[0].startswith(f"- {env['device']}, {env['threads']} torch threads, kernel build "
                               f"{env['cpu_isa']}, THP {env['thp']}")
    assert f"commit {env['commit']}" in lines[1] and f"torch {env['torch']}" in lines[1]
    text = render({"settings": {"vocab": 1, "hidden": 2, "tokens": 3, "dtype": "fp32",
                                "frozen_head": False}, "environment": env, "op": [], "e2e": []})
    assert f"on {env['device']} (torch {env['torch']}, trl {env['trl']}" in text


def test_cuda_record_with_a_faked_device(monkeypatch):
    seen = []

    def name(dev):
        seen.append(dev)
        return "NVIDIA Test GPU"

    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    env = E.environment("cuda:1")
    assert seen == [torch.device("cuda:1")]
    assert env["device"] == "NVIDIA Test GPU" and env["device_type"] == "cuda"
    assert env["cuda"] == torch.version.cuda
    assert "cpu_isa" not in env and "thp" not in env
    assert set(env) == CPU_FIELDS - {"cpu_isa", "thp"} | {"cuda"}


@pytest.mark.skipif(not _cpuinfo(), reason="no /proc/cpuinfo")
def test_device_name_cpu_from_cpuinfo():
    lines = _cpuinfo().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 platform.processor() or "cpu")
    flags = set(next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "").split())
    avx512 = {"avx512f", "avx512bw"} <= flags
    want = f"{model} ({os.cpu_count()} cores{', avx512' if avx512 else ''})"
    assert E.device_name("cpu") == want


def test_device_name_avx512_needs_both_flags(monkeypatch):
    texts = {
        "both": "model name\t: Fake CPU X\nflags\t\t: fpu avx2 avx512f avx512bw sse\n",
        "f_only": "model name\t: Fake CPU X\nflags\t\t: fpu avx2 avx512f avx512cd\n",
        "none": "model name\t: Fake CPU X\nflags\t\t: fpu avx2\n",
    }
    cores = os.cpu_count()
    for key, want in (("both", ", avx512"), ("f_only", ""), ("none", "")):
        monkeypatch.setattr(E.Path, "read_text", lambda self, t=texts[key]: t)
        assert E.device_name("cpu") == f"Fake CPU X ({cores} cores{want})", key


def test_device_name_without_cpuinfo(monkeypatch):
    def nope(self):
        raise OSError("no /proc")

    monkeypatch.setattr(E.Path, "read_text", nope)
    monkeypatch.setattr(E.platform, "processor", lambda: "")
    assert E.device_name("cpu") == f"cpu ({os.cpu_count()} cores)"


def test_git_commit_of_this_checkout():
    got = E.git_commit()
    if shutil.which("git") is None:
        assert got is None
        return
    top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"],
                         capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        assert got is None  # not a checkout of this project
        return
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode != 0:
        assert got is None  # no commit yet
        return
    assert got is not None
    # '+dirty' depends on edits others make at the same time: only the commit is compared
    assert got.removesuffix("+dirty") == head.stdout.strip()


def _fake_git(toplevel: str, rev_rc: int = 0, porcelain: str = ""):
    def run(cmd, **kw):
        sub = cmd[3:]
        if sub == ["rev-parse", "--show-toplevel"]:
            return subprocess.CompletedProcess(cmd, 0, toplevel + "\n", "")
        if sub == ["rev-parse", "--short", "HEAD"]:
            return subprocess.CompletedProcess(cmd, rev_rc, "1234abc\n" if rev_rc == 0 else "", "")
        if sub == ["status", "--porcelain", "-uno"]:
            return subprocess.CompletedProcess(cmd, 0, porcelain, "")
        raise AssertionError(cmd)
    return run


def test_git_commit_dirty_clean_and_not_a_checkout(monkeypatch):
    root = str(Path(E.__file__).resolve().parents[2])
    monkeypatch.setattr(E.subprocess, "run", _fake_git(root))
    assert E.git_commit() == "1234abc"
    monkeypatch.setattr(E.subprocess, "run", _fake_git(root, porcelain=" M cpo_fast/x.py\n"))
    assert E.git_commit() == "1234abc+dirty"
    monkeypatch.setattr(E.subprocess, "run", _fake_git("/somewhere/else"))
    assert E.git_commit() is None  # e.g. installed in site-packages inside another repository
    monkeypatch.setattr(E.subprocess, "run", _fake_git(root, rev_rc=128))
    assert E.git_commit() is None

    def no_git(cmd, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(E.subprocess, "run", no_git)
    assert E.git_commit() is None
