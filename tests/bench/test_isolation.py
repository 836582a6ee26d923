"""The fork server (cpo_fast/bench/isolation.py), driven through ``run_isolated`` with a server
of the module's own ``_serve`` whose CASES is a small module written here (so no transformers
import and no real benchmark): every case runs in a fresh fork (module state, torch settings
and peak RSS never carry from one case to the next, nor into the server), its printing does
not break the protocol, and each way a case can end maps to its row's status (error message,
``oom`` for OutOfMemoryError or SIGKILL, exit code, timeout, a dead server). Also
``isolate=False`` running in this process, and how ``_Server`` starts the real server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from cpo_fast.bench import isolation as I

FAKE_CASES = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path

    import torch

    STATE = {"calls": 0}

    def _hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
        return 0

    def probe(case):
        STATE["calls"] += 1
        threads = torch.get_num_threads()
        if case.get("set_threads"):
            torch.set_num_threads(case["set_threads"])
        threads_after = torch.get_num_threads()
        if case.get("alloc_mib"):
            t = torch.ones(case["alloc_mib"] << 18)  # float32: MiB * 2**20 / 4
            float(t[-1])
            del t
        return {**case, "status": "ok", "calls": STATE["calls"], "pid": os.getpid(),
                "ppid": os.getppid(), "threads_at_start": threads,
                "threads_after": threads_after, "hwm": _hwm()}

    def noisy(case):
        print("this is not a JSON line")
        print('{"exitcode": 99}')
        sys.stdout.flush()
        return {**case, "status": "ok", "printed": True}

    def boom(case):
        raise ValueError("bad value for " + repr(case["x"]) + "\\nsecond line")

    def silent_boom(case):
        raise RuntimeError()

    def oom(case):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")

    def killed(case):
        os.kill(os.getpid(), signal.SIGKILL)

    def exits(case):
        os._exit(3)

    def hangs(case):
        time.sleep(60)

    def kills_server(case):
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)
''')


def _start_server(folder):
    """The module's _serve, loaded from its file (the package import is not needed), serving
    the cases written in ``folder``."""
    (folder / "fakecases.py").write_text(FAKE_CASES)
    path = str(ROOT / "cpo_fast" / "bench" / "isolation.py")
    code = ("import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('iso', {path!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "m.CASES = 'fakecases'; m._PRELOAD = ['torch', 'fakecases']\n"
            "m._serve()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)


def _stop(proc):
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = _start_server(tmp_path_factory.mktemp("fork_server"))
    yield proc
    _stop(proc)


@pytest.fixture
def served(server, monkeypatch):
    """run_isolated talks to the fake server (the real one, if any, is put back after)."""
    assert server.poll() is None, "the fake server exited"
    monkeypatch.setattr(I._Server, "proc", server)
    return server


def test_each_case_is_a_fresh_fork(served):
    a = I.run_isolated("probe", {"k": 1, "set_threads": 13})
    b = I.run_isolated("probe", {"k": 2})
    assert a["status"] == b["status"] == "ok"
    assert a["k"] == 1 and b["k"] == 2  # the case comes back in the row
    # module state: each case sees the module as the server imported it
    assert a["calls"] == b["calls"] == 1
    # a fresh process per case, each a child of the server (not of this process)
    assert a["pid"] != b["pid"] and os.getpid() not in (a["pid"], b["pid"])
    assert a["ppid"] == b["ppid"] == served.pid
    # torch settings: the first case's set_num_threads(13) does not reach the second
    assert a["threads_after"] == 13 and a["threads_at_start"] != 13
    assert b["threads_at_start"] == a["threads_at_start"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc (not Linux)")
def test_peak_memory_is_each_cases_own(served):
    big = I.run_isolated("probe", {"alloc_mib": 192})
    after = I.run_isolated("probe", {})
    assert big["status"] == after["status"] == "ok"
    assert big["hwm"] - after["hwm"] > 150 * (1 << 20), (big["hwm"], after["hwm"])


def test_printing_does_not_break_the_protocol(served):
    row = I.run_isolated("noisy", {"x": 1})
    assert row == {"x": 1, "status": "ok", "printed": True}
    assert I.run_isolated("probe", {"after": True})["status"] == "ok"


def test_exception_becomes_the_rows_status(served):
    row = I.run_isolated("boom", {"x": 7})
    assert row["x"] == 7
    assert row["status"] == "error: ValueError: bad value for 7"
    assert "Traceback" in row["traceback"] and "ValueError" in row["traceback"]
    assert I.run_isolated("silent_boom", {})["status"] == "error: RuntimeError: RuntimeError"
    row = I.run_isolated("no_such_case", {})
    assert row["status"].startswith("error: AttributeError:") and "no_such_case" in row["status"]


def test_out_of_memory_and_sigkill_are_oom(served):
    assert I.run_isolated("oom", {"x": 1}) == {"x": 1, "status": "oom"}
    assert I.run_isolated("killed", {"x": 2}) == {"x": 2, "status": "oom"}


def test_exit_code_and_timeout(served):
    assert I.run_isolated("exits", {"x": 3}) == {"x": 3, "status": "error: exit code 3, signal None"}
    row = I.run_isolated("hangs", {"x": 4}, timeout=1.0)
    assert row == {"x": 4, "status": "error: timeout after 1 s"}
    assert I.run_isolated("probe", {})["status"] == "ok"  # the server goes on


def test_dead_server(tmp_path, monkeypatch):
    proc = _start_server(tmp_path)
    try:
        monkeypatch.setattr(I._Server, "proc", proc)
        row = I.run_isolated("kills_server", {"x": 5})
        assert row == {"x": 5, "status": "error: the benchmark server died"}
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -9


def test_in_process_when_not_isolated(tmp_path, monkeypatch):
    (tmp_path / "fakecases.py").write_text(FAKE_CASES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fakecases", raising=False)
    monkeypatch.setattr(I, "CASES", "fakecases")
    monkeypatch.setattr(I._Server, "proc", None)
    try:
        a = I.run_isolated("probe", {"k": 1}, isolate=False)
        b = I.run_isolated("probe", {"k": 2}, isolate=False)
        assert a["pid"] == b["pid"] == os.getpid()
        assert (a["calls"], b["calls"]) == (1, 2)  # no isolation: the module state carries over
        assert I.run_isolated("boom", {"x": "y"}, isolate=False)["status"] == \
            "error: ValueError: bad value for 'y'"
        assert I.run_isolated("oom", {}, isolate=False) == {"status": "oom"}
        assert I._Server.proc is None  # no server started
    finally:
        sys.modules.pop("fakecases", None)


def test_real_cases_in_process():
    # The real CASES module: a bad dtype becomes the row's status, not an exception.
    case = {"path": "eager", "device": "cpu", "dtype": "fp64"}
    row = I.run_isolated("e2e_case", case, isolate=False)
    assert row["status"] == "error: KeyError: 'fp64'" and row["path"] == "eager"
    assert I.run_isolated("e2e_case", {"path": "cce", "device": "cpu"}, isolate=False) == \
        {"path": "cce", "device": "cpu", "status": "n/a (Triton GPU only)"}


class _FakePopen:
    def __init__(self, cmd, *, env, stdin, stdout, stderr, text, bufsize):
        self.cmd, self.env, self.stderr_arg = cmd, env, stderr
        self.alive = True
        self.stdin = self

    def poll(self):
        return None if self.alive else 0

    def close(self):
        self.alive = False

    def wait(self, timeout=None):
        return 0


def test_server_start_command_and_reuse(monkeypatch):
    made = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: made.append(_FakePopen(*a, **k))
                        or made[-1])
    monkeypatch.setattr(I._Server, "proc", None)
    monkeypatch.delenv("CPO_FAST_BENCH_VERBOSE", raising=False)
    p = I._Server.get()
    assert p.cmd == [sys.executable, "-c", "from cpo_fast.bench.isolation import _serve; _serve()"]
    # NVML-based checks, so that the server never initializes CUDA before forking
    assert p.env["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert p.stderr_arg == subprocess.DEVNULL  # quiet unless CPO_FAST_BENCH_VERBOSE is set
    assert I._Server.get() is p and len(made) == 1  # reused while alive
    p.alive = False
    monkeypatch.setenv("CPO_FAST_BENCH_VERBOSE", "1")
    q = I._Server.get()
    assert q is not p and len(made) == 2 and q.stderr_arg is None  # a dead one is replaced
    I._Server.close()
    assert I._Server.proc is None and q.alive is False  # stdin closed: the server's loop ends
