"""Checkpoints (cpo_fast/pipeline/training/checkpoint.py) and the crash safety of training
(issue 12, items 5-6 and deliverable 4): kill -9 anywhere, then --resume equals the
uninterrupted run bitwise; SIGINT/SIGTERM checkpoint and say how to resume; a full disk
keeps the previous checkpoint; pickled checkpoints are refused."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from cpo_fast.cli import main
from cpo_fast.pipeline.run.persist import load_tensors
from cpo_fast.pipeline.stages.synthetic import make_corpus, write_corpus

TINY = ["--max-tokens", "40", "--vocab-size", "200", "--hidden-size", "32", "--num-layers", "1",
        "--num-heads", "2", "--f0-steps", "6", "--f0-batch-size", "16", "--steps", "3",
        "--batch-size", "8", "--outcome-folds", "3", "--warmup-steps", "1", "--progress", "false",
        "--eval-fraction", "0.2", "--lora-r", "4"]
DRIVER = Path(__file__).with_name("crash_driver.py")
# One thread everywhere: the in-process reference and the subprocesses must do the same
# float reductions for a bitwise comparison.
RUN = [*TINY, "--threads", "1", "--method", "cpo", "--lora-dropout", "0.1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """An output dir with the shared stages (tokenizer, f_0, cache, ghat) built once."""
    threads = torch.get_num_threads()
    d = tmp_path_factory.mktemp("crash")
    write_corpus(make_corpus(100, seed=2), d / "corpus.csv")
    out = d / "prepared"
    assert main(["fit-outcome", "--data", str(d / "corpus.csv"), "--output-dir", str(out),
                 *RUN]) == 0
    yield out
    torch.set_num_threads(threads)


def _copy(prepared: Path, dst: Path) -> Path:
    shutil.copytree(prepared, dst)
    return dst


def _subprocess(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests") + os.pathsep + str(ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "cpo" / "model" / "adapter_model.safetensors")


def _metrics(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "cpo" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["ess"], r["grad_norm"], r["lr"]) for r in rows]


def test_kill9_anywhere_then_resume_is_bitwise_equal(prepared, tmp_path):
    steps = ["--steps", "8", "--save-every", "2", "--grad-accum", "2"]
    steps.append("--no-eval")
    ref = _copy(prepared, tmp_path / "ref")
    assert main(["train", "--output-dir", str(ref), *RUN, *steps]) == 0
    run = _copy(prepared, tmp_path / "run")
    rng = random.Random(2026)
    # Kill points (the N-th event of each process, drawn): a forward, a checkpoint's tensor
    # file half written, the gap between the two renames of a checkpoint swap, a torn
    # metrics line. Each process resumes from what the previous one left.
    plans = [("step", rng.randint(3, 8)), ("tensors", rng.randint(1, 2)),
             ("rename", rng.randint(1, 2)), ("metrics", rng.randint(1, 3))]
    for kind, n in plans:
        p = _subprocess([str(DRIVER), kind, str(n), "train", "--output-dir", str(run), "--resume",
                         *RUN, *steps])
        _, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, (kind, n, err[-2000:])
        if kind == "rename":  # killed between the renames: only checkpoint.old is complete
            assert not (run / "cpo" / "checkpoint").exists()
            assert (run / "cpo" / "checkpoint.old" / "state.json").is_file()
    assert main(["train", "--output-dir", str(run), "--resume", *RUN, *steps]) == 0
    a, b = _adapter(ref), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run) == _metrics(ref)


def _wait_for_lines(path: Path, n: int, alive, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not (path.is_file() and len(path.read_text().splitlines()) >= n):
        assert alive() and time.monotonic() - t0 < timeout
        time.sleep(0.2)


def _check_interrupted(run: Path, err: str, capsys, args: list[str]) -> None:
    assert "Traceback" not in err
    assert f"Continue with: cpo-fast train --output-dir {run} --method cpo --resume" in err
    state = json.loads((run / "cpo" / "checkpoint" / "state.json").read_text())
    metrics = (run / "cpo" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(x)["step"] for x in metrics]
    assert state["step"] == logged[-1] >= 2 and f"after step {state['step']}" in err
    capsys.readouterr()
    assert main([*args, "--resume", "--stop-after", str(state["step"] + 1)]) == 0
    assert f"resuming from step {state['step']}" in capsys.readouterr().out


def test_sigint_saves_checkpoint_and_prints_resume(prepared, tmp_path, capsys):
    """Item 5, a real process and a real Ctrl-C (was: exit 130 with a traceback, the
    checkpoint up to save_every steps behind, no hint)."""
    run = _copy(prepared, tmp_path / "run")
    args = ["train", "--output-dir", str(run), *RUN, "--steps", "100000", "--save-every", "0",
            "--no-eval"]
    # Its own session: a background job of a non-interactive shell ignores SIGINT.
    p = _subprocess(["-m", "cpo_fast", *args], start_new_session=True)  # also: python -m cpo_fast
    _wait_for_lines(run / "cpo" / "metrics.jsonl", 2, lambda: p.poll() is None)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    _check_interrupted(run, err, capsys, args)


def test_sigterm_saves_checkpoint(prepared, tmp_path, capsys):
    """Item 5 for `kill PID` (SIGTERM), in this process: a thread sends it mid-training."""
    import threading

    run = _copy(prepared, tmp_path / "run")
    args = ["train", "--output-dir", str(run), *RUN, "--steps", "100000", "--save-every", "0",
            "--no-eval"]

    def send():
        _wait_for_lines(run / "cpo" / "metrics.jsonl", 2, lambda: True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send, daemon=True).start()
    assert main(args) == 128 + signal.SIGTERM
    _check_interrupted(run, capsys.readouterr().err, capsys, args)


def test_full_disk_keeps_previous_checkpoint(prepared, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    run = _copy(prepared, tmp_path / "run")
    args = ["train", "--output-dir", str(run), *RUN, "--steps", "4", "--save-every", "1",
            "--no-eval"]
    real, calls = safetensors.torch.save_file, [0]

    def save_file(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "tensors.safetensors" in err
    assert "Traceback" not in err
    ckpt = run / "cpo" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert not list(ckpt.parent.glob("checkpoint.tmp/.*.tmp"))  # the partial file is gone
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main([*args, "--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out


def test_unwritable_output_dir_is_a_clear_error(prepared, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", "--output-dir", str(blocker / "run"), "--data",
                 str(prepared.parent / "corpus.csv"), *RUN]) == 1
    err = capsys.readouterr().err
    assert "--output-dir" in err and "Traceback" not in err


class _Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_is_refused(prepared, tmp_path, capsys):
    run = _copy(prepared, tmp_path / "run")
    marker = tmp_path / "code-ran"
    ckpt = run / "cpo" / "checkpoint"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "payload": _Planted(marker)}, ckpt / "state.pt")  # old format
    assert main(["train", "--output-dir", str(run), *RUN, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "state.pt" in err and not marker.exists()
    # The same bytes under the safetensors name are refused too, before any parsing.
    (ckpt / "state.pt").rename(ckpt / "tensors.safetensors")
    (ckpt / "state.json").write_text("{}")
    assert main(["train", "--output-dir", str(run), *RUN, "--resume"]) == 2
    assert "pickle" in capsys.readouterr().err and not marker.exists()
