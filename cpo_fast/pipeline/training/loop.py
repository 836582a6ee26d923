"""Training a policy, and the optimization loop it runs (also f_0's SFT). Read top to bottom:

:func:`train_policy` makes the policy from f_0 (LoRA or full, stages/policy.py) and trains
the rows :func:`train_data` picks for ``cfg.method`` (and the DM set); :func:`train` is the
loop, which follows one optimizer step from the data to the parameter update:

    1. setup       the ranks (one process, or those of torchrun / accelerate launch), the
                   trainable parameters, AdamW, the warmup + cosine schedule
    2. resume      parameters, optimizer, schedule and RNG states from the checkpoint (any
                   number of ranks: the effective batch does not depend on the split)
    3. each step   a. data      this rank's ``grad_accum`` micro-batches of the step's
                                effective batch (all micro-batches on all ranks), rows
                                picked by (seed, step), token ids collated, f_0's cached
                                log-probs attached (batches.py)
                   b. gradient  the exact gradient of the effective batch's loss, with the
                                memory of one micro-batch (cpo_fast/effective_batch.py: a
                                no-grad pass for the rows' scalars, their coefficients over
                                all ranks, then a backward pass per micro-batch; the
                                [B, T, V] logits are never built), averaged over the ranks
                   c. update    clip, step, schedule; one metrics line (rank 0); a checkpoint
                                every ``save_every`` steps, or at once on SIGINT/SIGTERM
                                (signals.py; all ranks stop after the same step)
    4. the end     the final checkpoint and the model (save_pretrained; rank 0 writes)

Exact resume: the effective batch of step t is a pure function of (seed, t, its size), and a
checkpoint holds the trainable parameters, optimizer, scheduler and every RNG state, so a
resumed run takes bitwise the same steps as an uninterrupted one (on the same split; on
another number of ranks the same steps up to float rounding). checkpoint.py says how a
checkpoint survives kill -9.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cpo_fast import effective_batch
from cpo_fast.distributed import (
    SINGLE,
    World,
    average_gradients,
    current_world,
    max_over_ranks,
    sum_over_ranks,
)
from cpo_fast.estimators import LossOutput
from cpo_fast.objectives import method_of, top_quantile_mask
from cpo_fast.pipeline.run.config import RunConfig, pinned_values
from cpo_fast.pipeline.run.runtime import barrier, broadcast_params, release_free_memory, seed_everything
from cpo_fast.pipeline.run.signals import StopRequested, TrainingInterrupted
from cpo_fast.pipeline.stages.generate import bf16_pays
from cpo_fast.pipeline.stages.policy import make_policy, save_model
from cpo_fast.pipeline.training.batches import TrainData, step_micro_batches
from cpo_fast.pipeline.training.checkpoint import Resumed, find_checkpoint, load_checkpoint, save_checkpoint
from cpo_fast.pipeline.training.guard import WeightGuard, weight_stats
from cpo_fast.pipeline.training.metrics import MetricsLog, step_metrics

if TYPE_CHECKING:  # prepare.py runs f_0's SFT through train() below
    from cpo_fast.pipeline.training.prepare import Prepared

SHOWN = ("loss", "ess", "max_weight_share", "dm_ess", "dm_max_weight_share", "grad_norm")


def train_data(prep: Prepared, method: str) -> TrainData:
    """The rows ``method`` trains on (``sft_top``: the top quantile) and the DM set."""
    cfg = prep.cfg
    rows = np.arange(len(prep.train_enc))
    y = np.asarray(prep.train_table.outcomes, np.float64)
    if method_of(method).top_quantile:
        m = top_quantile_mask(torch.as_tensor(y), cfg.top_quantile,
                              higher_is_better=cfg.higher_is_better)
        rows = rows[m.numpy()]
    if method_of(method).dm_rows and prep.dm is None:
        raise ValueError(f"method={method!r} needs the DM set: call prepare(..., need_dm=True).")
    lp = prep.train_table.log_propensity
    return TrainData(enc=prep.train_enc, rows=rows, ref=prep.train_ref, outcomes=y,
                     log_propensity=lp, ghat=prep.ghat_train,
                     dm_enc=prep.dm.encoded if prep.dm is not None else None,
                     dm_ref=prep.dm_ref, dm_ghat=prep.dm_ghat)


def train_policy(prep: Prepared, cfg: RunConfig | None = None, *, out_dir: str | Path | None = None,
                 resume: bool = False):
    """Train ``cfg.method`` from f_0; returns (policy model, summary dict)."""
    cfg = cfg or prep.cfg
    out_dir = Path(out_dir or prep.layout.method(cfg.method))
    seed_everything(cfg.seed)
    policy = make_policy(prep.load_f0(), cfg)
    prep.f0 = None  # no reference model in memory while training (the cache stands in)
    release_free_memory()
    summary = train(policy, train_data(prep, cfg.method), cfg, out_dir, pad_id=prep.pad_id,
                    resume=resume, desc=cfg.method, tokenizer=prep.tokenizer)
    return policy, summary


def train(model, data: TrainData, cfg: RunConfig, out_dir: str | Path, *, pad_id: int,
          resume: bool = False, desc: str = "train", tokenizer=None,
          distributed: bool = True) -> dict[str, Any]:
    """Optimize ``model`` for ``cfg.steps`` steps of ``cfg.method``; write metrics.jsonl and
    checkpoints under ``out_dir``; return a summary. ``resume=True`` continues from
    ``out_dir/checkpoint`` exactly (same batches, same RNG). Under torchrun / accelerate the
    ranks share each step's effective batch (``distributed=False``: this process alone)."""
    # 1. setup
    out_dir, device = Path(out_dir), next(model.parameters()).device
    world = current_world() if distributed else SINGLE
    rows, dm_rows = effective_rows(cfg, world)
    data.check(cfg.method, dm_rows)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters.")
    opt, sched = make_optimizer(params, cfg)
    autocast = autocast_args(model, cfg)
    run_keys = resume_keys(cfg, world)
    # 2. resume (every rank reads the checkpoint; rank 0's parameters are broadcast)
    state = restore(out_dir, model, opt, sched, run_keys=run_keys, resume=resume, desc=desc,
                    world=world)
    last, stop = state.last, min(cfg.steps, cfg.stop_after or cfg.steps)
    # the ESS guard on the outcome rows' and the DM set's weights (guard.py, docs/validity.md)
    guard = WeightGuard(cfg.ess_guard, cfg.stop_on_collapse, rows, dm_rows,
                        quiet=not world.is_main)  # rank 0 warns for all

    def checkpoint(step: int) -> Path:  # rank 0 writes; the others wait until it is complete
        path = out_dir / "checkpoint"
        if world.is_main:
            path = save_checkpoint(out_dir, step, model, opt, sched, run_keys=run_keys,
                                   last=last, tokenizer=tokenizer)
        barrier(world)
        return path

    # 3. each step
    model.train()
    with StopRequested(world) as signals, MetricsLog(out_dir / "metrics.jsonl", state.step,
                                                     cfg.log_every, enabled=world.is_main) as log, \
            tqdm(range(state.step, stop), desc=desc, disable=not (cfg.progress and world.is_main),
                 initial=state.step, total=stop) as bar:
        for step in bar:
            t0 = time.perf_counter()
            # a. data: this rank's micro-batches of the step's effective batch
            micro = step_micro_batches(data, step, cfg=cfg, world=world, pad_id=pad_id,
                                       device=device)
            # b. gradient: the effective batch's, exact, averaged over the ranks
            res = effective_gradient(model, micro, cfg, world, autocast, step + 1)
            average_gradients(params, world)
            # c. update, metrics, checkpoints, signals, the ESS guard
            gnorm = update(params, opt, sched, cfg)
            last = metrics_line(step + 1, res, gnorm, sched.get_last_lr()[0],
                                time.perf_counter() - t0, rows, dm_rows)
            log.write(last, force=step + 1 == stop)
            bar.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k in SHOWN and v is not None})
            signum = signals.agreed()
            if signum is not None:
                raise TrainingInterrupted(signum, step + 1, checkpoint(step + 1))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < stop:
                checkpoint(step + 1)
            if guard.update(step + 1, last, dm_only=not method_of(cfg.method).outcome_rows):
                stop = step + 1  # --stop-on-collapse
                break
    # 4. the end
    return {**finish(model, tokenizer, out_dir, state, stop, cfg.steps, checkpoint, last, world),
            **guard.summary()}


@dataclass
class StepResult:
    """The effective batch's loss (objective + regularizers), its diagnostics (None for
    SFT) and the tokens all ranks processed."""

    loss: float
    out: LossOutput | None
    tokens: int


def autocast_args(model, cfg: RunConfig) -> dict[str, Any]:
    """The training passes' ``torch.autocast`` arguments: bf16 where ``cfg.bf16`` and it pays
    (a GPU, or a CPU with native bf16 matmuls and a model of >= 20M parameters: SmolLM2's
    step 1.6x faster at 0.7x the memory here). f_0's cached log-probs are computed in the
    same precision (prepare.ref_logprobs; docs/pipeline.md gives the rounding it costs)."""
    device = next(model.parameters()).device
    return dict(device_type=device.type, dtype=torch.bfloat16,
                enabled=cfg.bf16 and bf16_pays(model, device))


def effective_gradient(model, micro, cfg: RunConfig, world: World, autocast: dict,
                       step: int) -> StepResult:
    """Accumulate into ``.grad`` the exact gradient of the step's effective batch (this
    rank's micro-batches ``micro`` on every rank: cpo_fast/effective_batch.py)."""
    def check(loss: torch.Tensor, pair) -> None:
        if not torch.isfinite(loss.detach()).all():
            rows = (pair[0] if pair[0] is not None else pair[1])["index"].tolist()
            raise ValueError(f"step {step}: the loss is {float(loss.detach())} (not finite) on "
                             f"the micro-batch of row positions {rows}; lower --lr or "
                             "--max-log-weight, or check those rows.")

    loss, out = effective_batch.effective_gradient(
        model, micro, cfg.objective(), world, backend=cfg.backend,
        context=lambda: torch.autocast(**autocast), check=check)
    tokens = sum(int(b["attention_mask"].sum()) for pair in micro for b in pair if b)
    return StepResult(loss, out, int(sum_over_ranks(world, [tokens])[0]))


def update(params, opt, sched, cfg: RunConfig) -> torch.Tensor:
    """Clip the gradient norm (returned), step the optimizer and the schedule, zero the grads."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return gnorm


def effective_rows(cfg: RunConfig, world: World) -> tuple[int, int]:
    """Outcome rows and DM rows of one optimizer step, over all micro-batches and ranks (no
    DM rows for the methods without a DM set)."""
    n = world.size * cfg.grad_accum
    return n * cfg.batch_size, n * cfg.dm_batch_size if method_of(cfg.method).dm_rows else 0


def resume_keys(cfg: RunConfig, world: World) -> dict[str, Any]:
    """The settings a checkpoint pins (the RESUME fields of config.py), with the split of the
    effective batch (batch_size, grad_accum, dm_batch_size, and the number of ranks) replaced
    by the effective batch sizes: the gradient depends on those alone, so a run may resume
    on another number of ranks or micro-batches as long as they stay the same."""
    keys = pinned_values(cfg, "resume")
    for k in ("batch_size", "grad_accum", "dm_batch_size"):
        keys.pop(k, None)
    keys["effective_batch"], keys["effective_dm_batch"] = effective_rows(cfg, world)
    return keys


def metrics_line(step: int, res: StepResult, gnorm, lr: float, seconds: float, rows: int,
                 dm_rows: int) -> dict[str, Any]:
    """The metrics.jsonl line of one step: the effective batch's loss and diagnostics."""
    line = step_metrics(step, [res.loss], [res.out], grad_norm=gnorm, lr=lr, seconds=seconds,
                        tokens=res.tokens, batch_rows=rows)
    line.update(weight_stats([res.out]))
    if dm_rows:
        line["dm_batch_rows"] = dm_rows
    return line


def make_optimizer(params, cfg: RunConfig):
    """AdamW and its schedule: linear warmup, then cosine decay to 10% of the peak."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


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


def finish(model, tokenizer, out_dir: Path, state: Resumed, stop: int, steps: int, checkpoint,
           last: dict[str, Any], world: World = SINGLE) -> dict[str, Any]:
    """Step 4: the final checkpoint (unless nothing ran since the last one) and the model."""
    final = max(stop, state.step)
    need_model = final >= steps and tokenizer is not None and (
        final > state.step or not (out_dir / "model").is_dir())
    barrier(world)  # every rank has decided before rank 0 writes anything
    if final > state.step or state.path is None:
        checkpoint(final)
    if need_model:
        if world.is_main:
            save_model(model, tokenizer, out_dir / "model")
        barrier(world)
    return {"steps_done": final, "finished": final >= steps,
            **{k: v for k, v in last.items() if k != "log_weights"}}
