"""Checks that run before the first expensive stage, so a wrong flag costs seconds, not the
minutes of building f_0, the reference cache, ghat and the DM set first.

Each check raises ``ValueError`` naming the flag (the CLI turns it into one line, exit 2). The
checks that need only the settings are :meth:`RunConfig.validate`; these need the machine
(device, backend), the scorer's code or the data file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from cpo_fast._backend import resolve_backend
from cpo_fast.objectives import method_of
from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.run.layout import RunLayout
from cpo_fast.pipeline.run.scorers import load_scorer, run_scorer


def check_device(cfg: RunConfig) -> torch.device:
    """``--device``: a device this torch can use."""
    try:
        dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {cfg.device!r}: not a device name ({e}); use cpu or "
                         "cuda[:N].") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ValueError(f"--device {cfg.device}: this torch ({torch.__version__}) has "
                             f"{build}; use --device cpu or leave --device out.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here.")
    elif dev.type != "cpu":
        raise ValueError(f"--device {cfg.device}: the pipeline runs on cpu or cuda.")
    return dev


def check_backend(cfg: RunConfig, device: torch.device) -> None:
    """``--backend``: the fused ops can run it on ``device``."""
    try:
        resolve_backend(cfg.backend, device)
    except ValueError as e:
        raise ValueError(f"--backend {cfg.backend}: {e}") from None


def check_scorer(cfg: RunConfig) -> None:
    """``--scorer``: importable, and returns one finite number per text on a probe."""
    if not cfg.scorer:
        return

    _, fn = load_scorer(cfg.scorer)
    run_scorer(cfg.scorer, fn, ["A short probe sentence.", "Another one."])


def check_rows(cfg: RunConfig, n_train: int) -> None:
    """Enough training rows for ghat's cross-fitting (2 per fold) and a batch."""
    need = 2 * cfg.outcome_folds
    if n_train < need:
        raise ValueError(f"--data {cfg.data}: {n_train} training rows after the held-out split "
                         f"(--eval-fraction {cfg.eval_fraction}); ghat's {cfg.outcome_folds}-fold "
                         f"cross-fitting needs at least {need}: add rows or lower "
                         "--outcome-folds.")


def check_outcomes(cfg: RunConfig, outcomes: np.ndarray | None) -> None:
    """A constant outcome column trains nothing: warn (it is legal, e.g. for SFT-all)."""
    if outcomes is not None and len(outcomes) > 1 and float(np.ptp(outcomes)) == 0.0:
        warnings.warn(f"--outcome-column {cfg.outcome_column!r}: every training row has the "
                      f"outcome {float(outcomes[0])!r}; the weighted methods and ghat learn "
                      "nothing from a constant outcome.", UserWarning, stacklevel=2)


def check_run_exists(cfg: RunConfig, command: str) -> None:
    """``generate`` / ``evaluate`` read a run: its directory must hold one."""
    lay = RunLayout(cfg.output_dir)
    if not lay.config.is_file():
        what = "does not exist" if not Path(cfg.output_dir).exists() else "holds no run"
        raise ValueError(f"--output-dir {cfg.output_dir}: {what} (no config.json); run "
                         f"`cpo-fast train` there first, or point --output-dir at a run, "
                         f"before `cpo-fast {command}`.")


def check_dm_batch(cfg: RunConfig) -> None:
    """``--dm-batch-size`` against ``--dm-size`` when the DM set's size is known up front
    (f_0 completions); the loop checks every DM source again once the set exists."""
    if not method_of(cfg.method).dm_rows or cfg.dm_source != "f0_completions":
        return
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    rows = cfg.dm_batch_size * cfg.grad_accum * ranks
    if rows > cfg.dm_size:
        raise ValueError(f"--dm-batch-size {cfg.dm_batch_size} x --grad-accum {cfg.grad_accum} "
                         f"x {ranks} rank(s) = {rows} DM rows per step, more than the DM set's "
                         f"--dm-size {cfg.dm_size}; lower --dm-batch-size or raise --dm-size.")


def preflight(cfg: RunConfig, command: str) -> None:
    """Every check that needs no stage to have run, for ``command`` (a CLI subcommand)."""
    if command in ("generate", "evaluate"):
        check_run_exists(cfg, command)
    check_backend(cfg, check_device(cfg))
    if command in ("train", "evaluate", "demo"):
        check_scorer(cfg)
    if command == "train":
        check_dm_batch(cfg)
