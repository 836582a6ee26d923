"""What the loop records: one JSON line per logged step in ``<run>/metrics.jsonl``.

The file is append-only while training; a resumed run first cuts it back to the lines at
or before the checkpoint's step (rewritten whole, atomically), so the file of a resumed
run equals that of an uninterrupted one. A torn last line (kill -9 mid-write) is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpo_fast.pipeline.run.persist import write_text

# LossOutput fields of the step's effective batch (None when a method has none).
DIAGNOSTICS = ("ess", "max_weight_share", "clip_fraction", "value", "dm_ess", "ess_tau",
               "dm_ess_tau")


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def step_metrics(step: int, losses: list[float], outs: list, *, grad_norm, lr: float,
                 seconds: float, tokens: int, batch_rows: int) -> dict[str, Any]:
    """The metrics line of one optimizer step (``outs``: LossOutput or None; the loop passes
    the one of the effective batch, a list of several is averaged)."""
    outs = [o for o in outs if o is not None]
    row: dict[str, Any] = {"step": step, "loss": _mean(losses)}
    for name in DIAGNOSTICS:
        row[name] = _mean([float(v) for o in outs if (v := getattr(o, name, None)) is not None])
    row.update(grad_norm=float(grad_norm), lr=lr, tokens_per_s=tokens / seconds,
               batch_rows=batch_rows)
    if outs and outs[-1].weights is not None:  # for the weight histogram plot
        w = torch.log(outs[-1].weights.detach().clamp_min(1e-30))
        row["log_weights"] = [round(float(x), 4) for x in w.tolist()]
    return row


def read_metrics(path: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    """Parsed lines of a metrics file (steps <= ``up_to``); a torn line is skipped."""
    rows = []
    if path.is_file():
        for ln in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(ln)
            except ValueError:
                continue
            if isinstance(row, dict) and (up_to is None or row.get("step", 0) <= up_to):
                rows.append(row)
    return rows


class MetricsLog:
    """``with MetricsLog(path, start) as log: log.write(row)``; see the module docstring."""

    def __init__(self, path: Path, start: int, every: int, *, enabled: bool = True):
        self.path, self.every, self.enabled = path, every, enabled  # enabled: rank 0 only
        if enabled:
            kept = read_metrics(path, up_to=start) if start else []
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def __enter__(self) -> MetricsLog:
        self._f = self.path.open("a", encoding="utf-8") if self.enabled else None
        return self

    def write(self, row: dict[str, Any], *, force: bool = False) -> None:
        if self._f is not None and (force or row["step"] % self.every == 0):
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()
