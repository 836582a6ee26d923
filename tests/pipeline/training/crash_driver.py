"""Test helper (not a test): run ``cpo-fast ARGS`` and SIGKILL this very process at a chosen
point, to check that a run killed anywhere resumes exactly.

    python tests/pipeline/training/crash_driver.py KIND N ARGS...

KIND, N: ``step`` (inside the N-th forward of a micro-batch: the loop's two passes over
the effective batch make two per micro-batch), ``tensors`` (halfway through
writing the N-th checkpoint's tensor file), ``rename`` (between the two renames of the N-th
checkpoint swap), ``metrics`` (halfway through the N-th metrics line).
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

import cpo_fast.models as models
import cpo_fast.pipeline.training.checkpoint as checkpoint
import cpo_fast.pipeline.training.metrics as metrics
from cpo_fast.cli import main


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def on_nth_call(owner, name: str, n: int, before) -> None:
    """Replace ``owner.name`` so that its n-th call runs ``before(*args)`` first."""
    orig, calls = getattr(owner, name), [0]

    def wrapper(*args, **kw):
        calls[0] += 1
        if calls[0] == n:
            before(*args, **kw)
        return orig(*args, **kw)

    setattr(owner, name, wrapper)


def half_tensor_file(path, tensors) -> None:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.parent / f".{p.name}.tmp", "wb") as f:  # as the atomic writer names it
        f.write(b"\x00" * 4096)
        f.flush()
        os.fsync(f.fileno())
    die()


def half_metrics_line(self, row, **kw) -> None:
    self._f.write('{"step": ' + str(row["step"]) + ', "lo')
    self._f.flush()
    die()


if __name__ == "__main__":
    kind, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if kind == "step":
        on_nth_call(models, "token_batch", n, lambda *a, **k: die())
    elif kind == "tensors":
        on_nth_call(checkpoint, "save_tensors", n, half_tensor_file)
    elif kind == "metrics":
        on_nth_call(metrics.MetricsLog, "write", n, half_metrics_line)
    elif kind == "rename":
        calls = [0]
        orig = pathlib.Path.rename

        def rename(self, target):
            if self.name == "checkpoint.tmp":
                calls[0] += 1
                if calls[0] == n:
                    die()
            return orig(self, target)

        pathlib.Path.rename = rename
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    sys.exit(main(argv))
