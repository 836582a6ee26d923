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
                                log-probs attached (:func:`step_micro_batches`)
                   b. gradient  the exact gradient of the effective batch's loss, with the
                                memory of one micro-batch (cpo_fast/effective_batch.py: a
                                no-grad pass for the rows' scalars, their coefficients over
                                all ranks, then a backward pass per micro-batch; the
                                [B, T, V] logits are never built), averaged over the ranks
                   c. update    clip, step, schedule; one metrics line (rank 0); a checkpoint
                                every ``save_every`` steps, or at once on SIGINT/SIGTERM
                                (signals.py; all ranks stop after the same step)
    4. the end     the final checkpoint and the model (save_pretrained; rank 0 writes)

What the loop samples: the rows of a run (:class:`TrainData`) and micro-batch ``k`` of them,
built on the fly from token ids and the cached reference log-probs. Micro-batch ``k`` is a
pure function of (seed, k) (:func:`batch_indices`); the effective batch of step t is the
global micro-batches ``k = t*W*A .. (t+1)*W*A - 1`` (W ranks, A = grad_accum), of which rank
r computes the A consecutive ones from ``t*W*A + r*A``. With b rows each, that is the slice
``[t*E, (t+1)*E)`` of the seeded permutation stream, E = W*A*b: a function of (seed, t, E)
alone, however E is split into ranks and micro-batches.

Exact resume: the effective batch of step t is a pure function of (seed, t, its size), and a
checkpoint holds the trainable parameters, optimizer, scheduler and every RNG state, so a
resumed run takes bitwise the same steps as an uninterrupted one (on the same split; on
another number of ranks the same steps up to float rounding). checkpoint.py restores one
and says how it survives kill -9.
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
    sum_over_ranks,
)
from cpo_fast.estimators import LossOutput
from cpo_fast.models import collate
from cpo_fast.objectives import method_of, top_quantile_mask
from cpo_fast.pipeline.run.config import RunConfig, pinned_values
from cpo_fast.pipeline.run.runtime import barrier, release_free_memory, seed_everything
from cpo_fast.pipeline.run.signals import StopRequested, TrainingInterrupted
from cpo_fast.pipeline.stages.data import Encoded
from cpo_fast.pipeline.stages.generate import bf16_pays
from cpo_fast.pipeline.stages.policy import make_policy, save_model
from cpo_fast.pipeline.training.checkpoint import Resumed, restore, save_checkpoint
from cpo_fast.pipeline.training.guard import WeightGuard, weight_stats
from cpo_fast.pipeline.training.metrics import MetricsLog, step_metrics

if TYPE_CHECKING:  # prepare.py runs f_0's SFT through train() below
    from cpo_fast.pipeline.training.prepare import Prepared

SHOWN = ("loss", "ess", "max_weight_share", "dm_ess", "dm_max_weight_share", "grad_norm")


@dataclass
class TrainData:
    """Rows the loop samples from (``rows`` indexes ``enc``), and the DM set for DR/OO."""

    enc: Encoded
    rows: np.ndarray
    ref: list[np.ndarray]  # f_0 token log-probs per row, aligned with labels
    outcomes: np.ndarray | None = None
    log_propensity: np.ndarray | None = None
    ghat: np.ndarray | None = None  # cross-fitted (out-of-fold) predictions
    dm_enc: Encoded | None = None
    dm_ref: list[np.ndarray] | None = None
    dm_ghat: np.ndarray | None = None

    def check(self, method: str, dm_rows: int = 0) -> None:
        """``dm_rows``: DM rows of one effective batch; more than the DM set holds would
        repeat rows within a batch and report an ESS over rows that do not exist."""
        spec = method_of(method)
        if spec.dm_rows and self.dm_enc is None:
            raise ValueError(f"method={method!r} needs a DM set (TrainData.dm_enc) and ghat.")
        if spec.dm_rows and dm_rows > len(self.dm_enc):
            raise ValueError(f"--dm-batch-size: {dm_rows} DM rows per optimizer step (over "
                             f"micro-batches and ranks) but the DM set has {len(self.dm_enc)}; "
                             "lower --dm-batch-size or raise --dm-size.")
        if spec.weighted and spec.outcome_rows and self.outcomes is None:
            raise ValueError(f"method={method!r} needs outcomes.")


def batch_indices(n: int, batch_size: int, k: int, seed: int) -> np.ndarray:
    """Row positions of micro-batch ``k``: consecutive slices of per-epoch permutations."""
    start = k * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, pos = divmod(start, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[pos:pos + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out, dtype=np.int64)


def ref_tokens(ref: list[np.ndarray], idx, width: int) -> torch.Tensor:
    """Cached per-token log-probs of rows ``idx`` padded/cut to ``width`` scored positions
    (``labels[:, 1:]``'s)."""
    out = torch.zeros(len(idx), width, dtype=torch.float32)
    for b, i in enumerate(idx):
        r = torch.as_tensor(np.asarray(ref[int(i)], dtype=np.float32))[:width]
        out[b, : len(r)] = r
    return out


# Training batches are padded to a multiple of 16 tokens. oneDNN (and torch's other per-shape
# caches) keep state for every matmul shape they see; with each length from 5 to 64 tokens
# a SmolLM2 run's RSS grew by about 60 MB a step (9 GB after 100 steps), with a handful of
# shapes it stays flat. The padding is masked and costs a few per cent of the step.
PAD_MULTIPLE = 16


def make_batch(enc: Encoded, idx, pad_id: int, device, ref, outcomes=None, lp=None, ghat=None):
    """collate() plus the rows' cached reference token log-probs (``ref_token_logp``) and
    ghat (``outcome_pred``), on ``device``."""
    b = collate(enc, idx, pad_id, outcomes=outcomes, log_propensity=lp,
                pad_to_multiple=PAD_MULTIPLE)
    b["ref_token_logp"] = ref_tokens(ref, idx, b["labels"].shape[1] - 1)
    if ghat is not None:
        b["outcome_pred"] = torch.as_tensor(np.asarray(ghat)[np.asarray(idx)], dtype=torch.float32)
    return {k: v.to(device) for k, v in b.items()}


def micro_batch(data: TrainData, k: int, *, cfg: RunConfig, pad_id: int,
                device) -> tuple[dict, dict | None]:
    """Micro-batch ``k`` of a run with settings ``cfg``: the training rows and, for
    DR-CPO/OO-RLHF, the DM rows (their own permutations: seed + 1)."""
    idx = data.rows[batch_indices(len(data.rows), cfg.batch_size, k, cfg.seed)]
    batch = make_batch(data.enc, idx, pad_id, device, data.ref, data.outcomes,
                       data.log_propensity, data.ghat)
    if not method_of(cfg.method).dm_rows:
        return batch, None
    didx = batch_indices(len(data.dm_enc), cfg.dm_batch_size, k, cfg.seed + 1)
    return batch, make_batch(data.dm_enc, didx, pad_id, device, data.dm_ref, ghat=data.dm_ghat)


def step_micro_batches(data: TrainData, step: int, *, cfg: RunConfig, world: World, pad_id: int,
                       device) -> list[tuple[dict, dict | None]]:
    """This rank's ``cfg.grad_accum`` micro-batches of optimizer step ``step`` (0-based); the
    ranks' micro-batches, concatenated in rank order, are the one-process order."""
    first = (step * world.size + world.rank) * cfg.grad_accum
    return [micro_batch(data, first + m, cfg=cfg, pad_id=pad_id, device=device)
            for m in range(cfg.grad_accum)]


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
