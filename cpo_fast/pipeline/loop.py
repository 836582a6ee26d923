"""The optimization loop, used for f_0's SFT and for every policy method. Read top to bottom:
it follows one optimizer step from the data file to the parameter update.

    1. setup       the trainable parameters, AdamW, the warmup + cosine schedule
    2. resume      parameters, optimizer, schedule and RNG states from the checkpoint
    3. each step   for each of ``grad_accum`` micro-batches:
                     a. data      micro-batch k = rows picked by (seed, k), token ids
                                  collated, f_0's cached log-probs attached (batches.py)
                     b. forward   backbone -> hidden states -> fused-linear op -> token
                                  log-probs -> sequence log-probs -> the method's loss
                                  (loss.py; the [B, T, V] logits are never built)
                     c. backward  loss / grad_accum, gradients accumulate
                   then clip, step, schedule; one metrics line; a checkpoint every
                   ``save_every`` steps, or at once on SIGINT/SIGTERM (signals.py)
    4. the end     the final checkpoint and the model (save_pretrained)

Exact resume: batch k is a pure function of (seed, k), and a checkpoint holds the trainable
parameters, optimizer, scheduler and every RNG state, so a resumed run takes bitwise the
same steps as an uninterrupted one (checkpoint.py says how a checkpoint survives kill -9).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cpo_fast.pipeline.batches import TrainData, micro_batch
from cpo_fast.pipeline.checkpoint import Resumed, find_checkpoint, load_checkpoint, save_checkpoint
from cpo_fast.pipeline.config import RunConfig, pinned_values
from cpo_fast.pipeline.guard import WeightGuard, weight_stats
from cpo_fast.pipeline.loss import compute_loss
from cpo_fast.pipeline.metrics import MetricsLog, step_metrics
from cpo_fast.pipeline.policy import save_model
from cpo_fast.pipeline.signals import StopRequested, TrainingInterrupted


def train(model, data: TrainData, cfg: RunConfig, out_dir: str | Path, *, pad_id: int,
          resume: bool = False, desc: str = "train", tokenizer=None) -> dict[str, Any]:
    """Optimize ``model`` for ``cfg.steps`` steps of ``cfg.method``; write metrics.jsonl and
    checkpoints under ``out_dir``; return a summary. ``resume=True`` continues from
    ``out_dir/checkpoint`` exactly (same batches, same RNG)."""
    # 1. setup
    out_dir, device = Path(out_dir), next(model.parameters()).device
    data.check(cfg.method)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters.")
    opt, sched = make_optimizer(params, cfg)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    run_keys = pinned_values(cfg, "resume")
    # 2. resume
    state = restore(out_dir, model, opt, sched, run_keys=run_keys, resume=resume, desc=desc)
    last, stop = state.last, min(cfg.steps, cfg.stop_after or cfg.steps)
    # the ESS guard on the outcome rows' and the DM set's weights (guard.py, docs/validity.md)
    guard = WeightGuard(cfg.ess_guard, cfg.stop_on_collapse, cfg.batch_size, cfg.dm_batch_size)

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out_dir, step, model, opt, sched, run_keys=run_keys, last=last,
                               tokenizer=tokenizer)

    # 3. each step
    model.train()
    with StopRequested() as signals, MetricsLog(out_dir / "metrics.jsonl", state.step,
                                                cfg.log_every) as log, \
            tqdm(range(state.step, stop), desc=desc, disable=not cfg.progress,
                 initial=state.step, total=stop) as bar:
        for step in bar:
            t0, losses, outs, tokens = time.perf_counter(), [], [], 0
            for micro in range(cfg.grad_accum):
                # a. data
                batch, dm_batch = micro_batch(data, step * cfg.grad_accum + micro, cfg=cfg,
                                              pad_id=pad_id, device=device)
                tokens += sum(int(b["attention_mask"].sum()) for b in (batch, dm_batch) if b)
                # b. forward
                with torch.autocast(**autocast):
                    loss, lo = compute_loss(model, batch, dm_batch, cfg, cfg.method)
                check_finite(loss, step + 1, batch)
                # c. backward
                (loss / cfg.grad_accum).backward()
                losses.append(float(loss.detach()))
                outs.append(lo)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            last = step_metrics(step + 1, losses, outs, grad_norm=gnorm, lr=sched.get_last_lr()[0],
                                seconds=time.perf_counter() - t0, tokens=tokens,
                                batch_rows=cfg.batch_size * cfg.grad_accum)
            last.update(weight_stats(outs), dm_batch_rows=cfg.dm_batch_size)
            log.write(last, force=step + 1 == stop)
            bar.set_postfix({k: f"{v:.3g}" for k, v in last.items()
                             if k in ("loss", "ess", "max_weight_share", "dm_ess",
                                      "dm_max_weight_share", "grad_norm") and v is not None})
            if signals.signum is not None:
                raise TrainingInterrupted(signals.signum, step + 1, checkpoint(step + 1))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < stop:
                checkpoint(step + 1)
            if guard.update(step + 1, last, dm_only=cfg.method == "oo_rlhf"):
                stop = step + 1  # --stop-on-collapse
                break
    # 4. the end
    return {**finish(model, tokenizer, out_dir, state, stop, cfg.steps, checkpoint, last),
            **guard.summary()}


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
            desc: str) -> Resumed:
    """Step 2: load the checkpoint when resuming (saying from which step), else step 0."""
    if not resume:
        return Resumed()
    ckpt = find_checkpoint(out_dir)
    if ckpt is None:
        print(f"[{desc}] --resume: no checkpoint in {out_dir}; starting from step 0.")
        return Resumed()
    state = load_checkpoint(ckpt, model, opt, sched, run_keys=run_keys)
    print(f"[{desc}] resuming from step {state.step} (checkpoint {ckpt}).")
    return state


def check_finite(loss: torch.Tensor, step: int, batch: dict) -> None:
    if not torch.isfinite(loss.detach()).all():
        rows = batch["index"].tolist()
        raise ValueError(f"step {step}: the loss is {float(loss.detach())} (not finite) on the "
                         f"micro-batch of row positions {rows}; lower --lr or --max-log-weight, "
                         "or check those rows.")


def finish(model, tokenizer, out_dir: Path, state: Resumed, stop: int, steps: int, checkpoint,
           last: dict[str, Any]) -> dict[str, Any]:
    """Step 4: the final checkpoint (unless nothing ran since the last one) and the model."""
    final = max(stop, state.step)
    if final > state.step or state.path is None:
        checkpoint(final)
    if final >= steps and tokenizer is not None and (final > state.step
                                                     or not (out_dir / "model").is_dir()):
        save_model(model, tokenizer, out_dir / "model")
    return {"steps_done": final, "finished": final >= steps,
            **{k: v for k, v in last.items() if k != "log_weights"}}
