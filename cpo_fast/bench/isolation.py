"""One fresh process per benchmark case, forked from one server that imported everything once.

``run_isolated("e2e_case", case)`` runs a function of cpo_fast.bench.cases in a child of the
server and returns its row; nothing a case allocates, compiles or leaks outlives it, and
its peak memory is its own (docs/benchmarks.md, "Isolation").
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

CASES = "cpo_fast.bench.cases"  # the module whose functions run_isolated runs
_PRELOAD = ["torch", "cpo_fast", "cpo_fast.ops", "transformers",
            "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
            "peft", "trl.trainer.utils", CASES]


def _serve() -> None:
    """The fork server: import everything once, then fork one child per case.

    Protocol (one JSON line each way): in ``{"fn", "case", "out", "timeout"}``; out
    ``{"exitcode", "signal", "timed_out"}``. The child writes its row to ``out``. The server
    only imports (no torch op runs in it), so each child starts with a clean allocator, no
    OpenMP pool and no CUDA context, and its peak RSS is its own; importing transformers
    takes seconds, which a plain subprocess per case would pay every time.
    """
    import importlib
    import signal

    _die_with_parent()
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S110  (an optional peer; the case reports it)
            pass
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a case prints goes to stderr, never into the protocol
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            code = 0
            try:
                _child(req["fn"], req["case"], req["out"])
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        deadline = None if req.get("timeout") is None else time.monotonic() + req["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        proto.write(json.dumps({"exitcode": code, "signal": sig, "timed_out": timed_out}) + "\n")
        proto.flush()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (no orphaned server or case)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def _child(fn_name: str, case: dict, out_path: str | None) -> dict:
    import importlib

    import torch

    try:
        out = getattr(importlib.import_module(CASES), fn_name)(case)
    except torch.OutOfMemoryError:
        out = {**case, "status": "oom"}
    except Exception as e:  # noqa: BLE001  (reported as the row's status, never fatal)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        out = {**case, "status": f"error: {type(e).__name__}: {msg}"[:300],
               "traceback": traceback.format_exc()[-2000:]}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(out, f)
    return out


class _Server:
    proc = None

    @classmethod
    def get(cls):
        if cls.proc is None or cls.proc.poll() is not None:
            import atexit
            import subprocess

            quiet = os.environ.get("CPO_FAST_BENCH_VERBOSE") is None
            # NVML-based device checks: an import that asks torch.cuda.is_available() must
            # not initialize the CUDA driver in the server, or its forked children cannot
            # use CUDA.
            env = {**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
            cls.proc = subprocess.Popen(
                [sys.executable, "-c", "from cpo_fast.bench.isolation import _serve; _serve()"],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL if quiet else None, text=True, bufsize=1)
            atexit.register(cls.close)
        return cls.proc

    @classmethod
    def close(cls):
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.stdin.close()
            cls.proc.wait(timeout=30)
        cls.proc = None


def run_isolated(fn_name: str, case: dict, *, timeout: float | None = None,
                 isolate: bool = True) -> dict:
    """Run ``fn_name(case)`` (a function of cpo_fast.bench.cases) in a fresh process.

    Each case is a fork of one server process that has imported torch, transformers, peft
    and trl once (:func:`_serve`). The row comes back with a ``status``; a child killed by
    the OS (SIGKILL: out of memory) gives ``oom``, one past ``timeout`` seconds
    ``error: timeout``. ``isolate=False`` runs it in this process.
    """
    if not isolate:
        return _child(fn_name, case, None)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        srv = _Server.get()
        srv.stdin.write(json.dumps({"fn": fn_name, "case": case, "out": path,
                                    "timeout": timeout}) + "\n")
        srv.stdin.flush()
        line = srv.stdout.readline()
        if not line:
            return {**case, "status": "error: the benchmark server died"}
        st = json.loads(line)
        if os.path.exists(path) and os.path.getsize(path):
            with open(path) as f:
                return json.load(f)
    if st["timed_out"]:
        return {**case, "status": f"error: timeout after {timeout:.0f} s"}
    if st["signal"] == 9:
        return {**case, "status": "oom"}
    return {**case, "status": f"error: exit code {st['exitcode']}, signal {st['signal']}"}
