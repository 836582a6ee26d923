"""Checkpoints: everything a resumed run needs to take the same steps as an uninterrupted one.

A checkpoint is a directory ``<run>/checkpoint/``:

    state.json           step, the resume keys it was written with, the last metrics line,
                         optimizer hyper-parameters, scheduler state, Python/NumPy RNG states
    tensors.safetensors  trainable parameters ("param.<name>"), optimizer moments
                         ("optim.<i>.<key>"), torch/CUDA generator states ("rng.*")
    model/               save_pretrained() of the model at that step (when a tokenizer is
                         given: f_0's SFT and the policies)

No pickle anywhere: a checkpoint holding a pickled file (the ``state.pt`` of older versions,
or anything planted) is refused before anything is read.

Crash safety: a new checkpoint is written whole into ``checkpoint.tmp/`` (every file
fsync'ed), then swapped in by two renames (``checkpoint`` -> ``checkpoint.old``,
``checkpoint.tmp`` -> ``checkpoint``) and the old one deleted. At every instant one complete
checkpoint exists on disk: a kill -9 or a full disk during a save leaves the previous one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpo_fast.distributed import SINGLE, World, max_over_ranks
from cpo_fast.pipeline.run.persist import (
    WriteError,
    fsync_dir,
    load_tensors,
    read_json,
    refuse_pickle,
    save_tensors,
    write_json,
)
from cpo_fast.pipeline.run.runtime import broadcast_params, rng_state, set_rng_state
from cpo_fast.pipeline.stages.policy import load_trainable_state, save_model, trainable_state

FORMAT = "cpo_fast-checkpoint-v2"


@dataclass
class Resumed:
    """What :func:`load_checkpoint` restored: the step to continue from and the last
    metrics line written before the checkpoint (so a finished run reports real numbers)."""

    step: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def find_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of a run, or None. ``checkpoint.old`` is complete exactly when
    a crash fell between the two renames of a save."""
    for name in ("checkpoint", "checkpoint.old"):
        d = run_dir / name
        refuse_pickle(d)
        if (d / "state.json").is_file() and (d / "tensors.safetensors").is_file():
            return d
    return None


def save_checkpoint(run_dir: Path, step: int, model, opt, sched, *, run_keys: dict[str, Any],
                    last: dict[str, Any], tokenizer=None) -> Path:
    """Write the checkpoint of ``step`` (see the module docstring for the atomic swap)."""
    final, tmp, old = (run_dir / n for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted earlier
    tensors = {f"param.{n}": t for n, t in trainable_state(model).items()}
    opt_meta = _optimizer_state(opt, tensors)
    rng_meta, rng_tensors = rng_state()
    tensors.update(rng_tensors)
    meta = {"format": FORMAT, "step": step, "run_keys": run_keys, "last": last,
            "optimizer": opt_meta, "scheduler": sched.state_dict(), "rng": rng_meta}
    save_tensors(tmp / "tensors.safetensors", tensors)
    if tokenizer is not None:
        try:
            save_model(model, tokenizer, tmp / "model")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteError(e.errno, f"{e.strerror or e}; the previous checkpoint is "
                             "unchanged.") from e
    write_json(tmp / "state.json", meta)
    try:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        fsync_dir(run_dir)
    except OSError as e:
        raise WriteError(e.errno, f"cannot move the new checkpoint into {final}: "
                         f"{e.strerror or e}.") from e
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, opt, sched, *, run_keys: dict[str, Any]) -> Resumed:
    """Restore parameters, optimizer, scheduler and RNG states from ``ckpt``; refuse a
    checkpoint written with other resume keys (naming them)."""
    meta = read_json(ckpt / "state.json")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{ckpt}: unknown checkpoint format {meta.get('format')!r}.")
    saved = _effective_keys(meta["run_keys"])
    diff = {k: (saved.get(k), v) for k, v in run_keys.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"--resume: the checkpoint in {ckpt} was written with other settings "
                         f"{diff} (checkpoint, now); use the same settings or another "
                         "--output-dir.")
    tensors = load_tensors(ckpt / "tensors.safetensors")
    load_trainable_state(model, {k[6:]: t for k, t in tensors.items() if k.startswith("param.")})
    opt.load_state_dict(_optimizer_state_dict(meta["optimizer"], tensors))
    sched.load_state_dict(meta["scheduler"])
    set_rng_state(meta["rng"], {k: t for k, t in tensors.items() if k.startswith("rng.")})
    return Resumed(step=int(meta["step"]), last=meta.get("last") or {}, path=ckpt)


def _effective_keys(keys: dict[str, Any]) -> dict[str, Any]:
    """Resume keys of a checkpoint written before the effective batch (one process, keys
    batch_size / grad_accum / dm_batch_size) in today's terms (effective_batch, ...)."""
    if "effective_batch" in keys or "batch_size" not in keys:
        return keys
    keys = dict(keys)
    a = keys.pop("grad_accum", 1)
    keys["effective_batch"] = keys.pop("batch_size") * a
    keys["effective_dm_batch"] = keys.pop("dm_batch_size", 0) * a
    return keys


def _optimizer_state(opt, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Split ``opt.state_dict()``: tensors into ``tensors`` ("optim.<i>.<key>"), the rest
    (hyper-parameters, non-tensor state) returned as JSON."""
    sd = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v
            else:
                scalars.setdefault(str(i), {})[k] = v
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_dict(meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = t
    for i, kv in meta["scalars"].items():
        state.setdefault(int(i), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


def restore(out_dir: Path, model, opt, sched, *, run_keys: dict[str, Any], resume: bool,
            desc: str, world: World = SINGLE) -> Resumed:
    """Step 2: load the checkpoint when resuming (saying from which step), else step 0; then
    every rank holds rank 0's trainable parameters."""
    state = _load(out_dir, model, opt, sched, run_keys=run_keys, resume=resume, desc=desc,
                  world=world)
    same_step_everywhere(state, world)
    broadcast_params([p for p in model.parameters() if p.requires_grad], world)
    return state


def _load(out_dir: Path, model, opt, sched, *, run_keys: dict[str, Any], resume: bool,
          desc: str, world: World) -> Resumed:
    if not resume:
        return Resumed()
    ckpt = find_checkpoint(out_dir)
    say = print if world.is_main else (lambda *a, **k: None)
    if ckpt is None:
        say(f"[{desc}] --resume: no checkpoint in {out_dir}; starting from step 0.")
        return Resumed()
    state = load_checkpoint(ckpt, model, opt, sched, run_keys=run_keys)
    say(f"[{desc}] resuming from step {state.step} (checkpoint {ckpt}).")
    return state


def same_step_everywhere(state: Resumed, world: World) -> None:
    """Every rank must resume from the same checkpoint (rank 0 writes it: --output-dir has
    to be on a filesystem that all ranks, on every machine, see)."""
    hi, neg_lo = max_over_ranks(world, [state.step, -state.step])
    if hi != -neg_lo:
        raise ValueError(f"--resume: the ranks found checkpoints of different steps ({-neg_lo:.0f} "
                         f"to {hi:.0f}) in {state.path}; put --output-dir on a filesystem that "
                         "every rank sees.")
