"""Ctrl-C and ``kill`` (SIGTERM) during training: finish the step, checkpoint, stop cleanly.

Inside :class:`StopRequested` the two signals only set a flag; the loop checks it after
each optimizer step, saves a checkpoint at that step and raises :class:`TrainingInterrupted`
(the CLI prints where the checkpoint is and the ``--resume`` command, and exits with
128 + the signal number, without a traceback). A second signal stops at once.
Handlers can only be set from the main thread; elsewhere the context does nothing.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving the checkpoint of ``step`` in ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint saved in {checkpoint}")


class StopRequested:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(send it again to stop at once).", flush=True)

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
