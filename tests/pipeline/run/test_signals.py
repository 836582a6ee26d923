"""Stopping on Ctrl-C / SIGTERM (cpo_fast/pipeline/run/signals.py), in one process: the first
signal only sets the flag, a second one stops at once, the handlers are restored after. The
loop's use of it (checkpoint, message, exit code) is tested in
tests/pipeline/training/test_checkpoint.py and tests/test_cli.py."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from cpo_fast.distributed import World
from cpo_fast.pipeline.run.signals import StopRequested, TrainingInterrupted


def test_first_signal_sets_the_flag_second_stops_at_once(capsys):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set from the main thread")
    before = signal.getsignal(signal.SIGTERM)
    with StopRequested() as stop:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed() == signal.SIGTERM
        assert "SIGTERM: finishing this step, then saving a checkpoint" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_forwarded_duplicate_on_a_rank_counts_once():
    stop = StopRequested(World(rank=1, size=2))  # the handler alone: no collective runs
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)  # the launcher's copy of the same Ctrl-C
    assert stop.signum == signal.SIGINT
    stop._first -= 10  # a later, deliberate second Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_interrupted_names_the_signal_step_and_checkpoint():
    e = TrainingInterrupted(signal.SIGINT, 7, Path("/run/checkpoint"))
    assert (e.signum, e.step) == (signal.SIGINT, 7)
    assert str(e) == "stopped by SIGINT after step 7; checkpoint saved in /run/checkpoint"
