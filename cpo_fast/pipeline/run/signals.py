"""Ctrl-C and ``kill`` (SIGTERM) during training: finish the step, checkpoint, stop cleanly.

Inside :class:`StopRequested` the two signals only set a flag; the loop checks it after
each optimizer step, saves a checkpoint at that step and raises :class:`TrainingInterrupted`
(the CLI prints where the checkpoint is and the ``--resume`` command, and exits with
128 + the signal number, without a traceback). A second signal stops at once.
Handlers can only be set from the main thread; elsewhere the context does nothing.

Several ranks (torchrun, accelerate launch): a signal may reach one rank a moment before
another, so after every step the ranks agree (:meth:`StopRequested.agreed`, one tiny
all-reduce) and all of them stop after the same step; rank 0 writes the checkpoint while the
others wait, so none exits early and none waits forever in a collective. (torchrun forwards
the SIGINT / SIGTERM it receives to each worker, in its own session, and SIGKILLs them 30 s
later.) With a launcher whose workers share the terminal's process group, one Ctrl-C
arrives twice (from the terminal and forwarded): within ``DUPLICATE_S`` seconds, a second
signal on a rank counts as that same Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from cpo_fast.distributed import SINGLE, World, max_over_ranks

DUPLICATE_S = 2.0


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving the checkpoint of ``step`` in ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint saved in {checkpoint}")


class StopRequested:
    def __init__(self, world: World = SINGLE) -> None:
        self.signum: int | None = None
        self.world = world
        self._old: dict[int, object] = {}
        self._first = 0.0

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, without a checkpoint
            if self.world.distributed and time.monotonic() - self._first < DUPLICATE_S:
                return  # the launcher forwarding the Ctrl-C every worker already got
            raise KeyboardInterrupt
        self.signum, self._first = signum, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(send it again to stop at once).", flush=True)

    def agreed(self) -> int | None:
        """The signal to stop on after this step: this rank's, or any other rank's."""
        if not self.world.distributed:
            return self.signum
        signum = int(max_over_ranks(self.world, [float(self.signum or 0)])[0])
        return signum or None

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
