"""DR-CPO as a TRL-style trainer: ``DRCPOTrainer`` and ``DRCPOConfig`` (docs/trl.md).

    args = DRCPOConfig(output_dir="out", method="dr_cpo", max_steps=100, report_to="tensorboard")
    trainer = DRCPOTrainer(model=model, args=args, train_dataset=ds,   # columns: text, outcome
                           processing_class=tokenizer, peft_config=LoraConfig(...))
    trainer.train(); trainer.evaluate(); trainer.save_model()

Not TRL's ``CPOTrainer`` (*Contrastive* Preference Optimization): this is *Causal* Preference
Optimization and its doubly robust form. A ``transformers.Trainer`` (optimizer, schedule,
clipping, checkpoints, callbacks and ``report_to`` are Trainer's) whose CPO-specific parts
are the library code the ``cpo-fast`` CLI runs, in the CLI's order: f_0 (the given model, or
its SFT: prepare.fit_f0), f_0's reference log-probs cached once, ghat cross-fitted, the DM
set (prepare.py); then each step takes the CLI's micro-batches of that step (a function of
the seed and the step: batches.step_micro_batches) and accumulates the exact gradient of the
effective batch, all micro-batches on all ranks (loop.effective_gradient). The stages live
under ``stages_dir`` in a folder keyed by the model, the data and their settings.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from cpo_fast.constants import ESS_TARGET, WEIGHTINGS
from cpo_fast.distributed import average_gradients, current_world
from cpo_fast.hf import LogsDiagnostics
from cpo_fast.objectives import METHODS, method_of
from cpo_fast.pipeline.report.evaluate import evaluate_model
from cpo_fast.pipeline.run.config import FIELDS, RunConfig
from cpo_fast.pipeline.stages.data import encode
from cpo_fast.pipeline.training.guard import WeightGuard
from cpo_fast.pipeline.training.in_memory import build_stages, dataset_table, make_trainable, split_held_out
from cpo_fast.pipeline.training.loop import (
    autocast_args,
    effective_gradient,
    effective_rows,
    metrics_line,
    step_micro_batches,
    train_data,
)
from cpo_fast.pipeline.training.prepare import ref_logprobs, texts_features

_STAGE_FIELDS = ("method", "weighting", "length_normalize", "entropy_coef", "kl_coef",
                 "max_log_weight", "truncation", "clip_eps", "top_quantile", "log_weight_cap",
                 "ess_target", "higher_is_better", "dm_source", "dm_path", "dm_size", "dm_prefix_fraction",
                 "outcome_model", "outcome_folds", "outcome_features", "ess_guard",
                 "stop_on_collapse", "num_samples", "max_new_tokens", "bootstrap", "backend")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DRCPOConfig(TrainingArguments):
    """``TrainingArguments`` plus the CPO / DR-CPO settings. Field names, meanings and
    defaults are the CLI's (``cpo-fast train --help``); the optimizer defaults are set to
    the CLI's too (AdamW betas (0.9, 0.95), cosine decay to 10% of the peak)."""

    method: str = _f("dr_cpo", "sft_all | sft_top | oo_rlhf | cpo | dr_cpo")
    weighting: str = _f("self_normalized", "raw | self_normalized | clipped | truncated")
    dataset_text_field: str = _f("text", "column with the texts (with prompt_column: the responses)")
    outcome_column: str = _f("outcome", "column with the outcome y (numbers)")
    prompt_column: str | None = _f(None, "optional prompt column (only responses scored)")
    log_propensity_column: str | None = _f(None, "optional known log P^R(x) column")
    max_length: int = _f(64, "max tokens per row (BOS + prompt + response + EOS)")
    on_too_long: str = _f("truncate", "truncate | error")
    eval_fraction: float = _f(0.0, "train_dataset rows held out when no eval_dataset is given")
    higher_is_better: bool = _f(True, "false when lower outcomes are better")
    f0_steps: int = _f(0, "0: the given model is f_0; > 0: f_0 = its SFT on the texts")
    f0_learning_rate: float | None = _f(None, "SFT learning rate of f_0 (default: the CLI's)")
    f0_lora: bool | None = _f(None, "SFT of f_0 with LoRA adapters, merged after (default: the CLI's)")
    f0_batch_size: int = _f(32, "SFT batch size of f_0")
    length_normalize: bool = _f(False, "mean instead of sum of token log-probs")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    kl_coef: float = _f(0.0, "KL-to-f_0 penalty coefficient (k3, from the cache)")
    max_log_weight: float = _f(50.0, "clamp on log weights (raw/clipped/truncated)")
    truncation: float = _f(10.0, "tau for weighting=truncated")
    clip_eps: float = _f(0.2, "eps for weighting=clipped")
    top_quantile: float = _f(0.75, "sft_top trains on rows above this outcome quantile")
    log_weight_cap: float = _f(0.0, "cap each row's log weight to the batch median +- this (0: off)")
    ess_target: float = _f(ESS_TARGET, "temper the log weights to hold the outcome and DM ESS "
                           "at this share of the effective batch (0: off)")
    dm_batch_size: int | None = _f(None, "DM rows per micro-batch (default: per_device_train_batch_size)")
    dm_source: str = _f("f0_completions", "f0_completions | dataset | file")
    dm_path: str | None = _f(None, "unlabeled texts file for dm_source=file")
    dm_size: int = _f(512, "DM texts (f0_completions: how many to sample)")
    dm_prefix_fraction: float = _f(0.3, "f0_completions: kept fraction of each text's tokens")
    outcome_model: str = _f("ridge", "ridge | mlp")
    outcome_folds: int = _f(5, "cross-fitting folds of ghat")
    outcome_features: str = _f("f0", "f0 | tokens | both")
    ess_guard: float = _f(0.1, "warn when an ESS share of its batch falls below this (0: off)")
    stop_on_collapse: bool = _f(False, "stop training when the ESS guard fires")
    num_samples: int = _f(64, "evaluate(): texts generated from the policy (ghat's DM term)")
    max_new_tokens: int = _f(48, "evaluate(): max new tokens per generated text")
    bootstrap: int = _f(1000, "evaluate(): bootstrap resamples of the 95% intervals")
    backend: str | None = _f(None, "fused-op backend (default: best available)")
    stages_dir: str | None = _f(None, "f_0, cache, ghat, DM set (default: <output_dir>/stages)")
    # Trainer settings whose defaults are the CLI's
    learning_rate: float = _f(1e-3, "peak learning rate (AdamW)")
    adam_beta2: float = _f(0.95, "AdamW beta2 (the CLI's)")
    optim: str = _f("adamw_torch", "optimizer (the CLI's: torch AdamW)")
    lr_scheduler_type: str = _f("cosine_with_min_lr", "cosine decay to min_lr_rate (the CLI's)")
    lr_scheduler_kwargs: dict | str | None = _f({"min_lr_rate": 0.1}, "scheduler arguments")
    logging_steps: float = _f(10, "log every N steps")
    seed: int = _f(0, "seed of the data order, the held-out split, the adapters' init (the CLI's)")

    def __post_init__(self) -> None:
        for name, allowed in (("method", METHODS), ("weighting", WEIGHTINGS),
                              ("on_too_long", ("truncate", "error"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DRCPOConfig.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.f0_steps < 0 or not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("DRCPOConfig: f0_steps must be >= 0 and eval_fraction in [0, 1), got "
                             f"{self.f0_steps} and {self.eval_fraction}.")
        super().__post_init__()

    def run_config(self, stages: Path, peft_config: Any = None) -> RunConfig:
        """The CLI's RunConfig of these settings (what the pipeline functions read); a LoRA
        ``peft_config`` also gives the rank, alpha and dropout of f_0's LoRA SFT."""
        same = {k: getattr(self, k) for k in _STAGE_FIELDS}
        if "f0_lora" in FIELDS:
            same["f0_lora"] = self.f0_lora
        for k, name in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
            if isinstance(getattr(peft_config, name, None), (int, float)):
                same[k] = getattr(peft_config, name)
        return RunConfig(
            text_column=self.dataset_text_field, outcome_column=self.outcome_column,
            prompt_column=self.prompt_column, log_propensity_column=self.log_propensity_column,
            max_tokens=self.max_length, on_too_long=self.on_too_long,
            eval_fraction=self.eval_fraction, f0_steps=self.f0_steps, f0_lr=self.f0_learning_rate,
            f0_batch_size=self.f0_batch_size, steps=max(1, self.max_steps),
            batch_size=self.per_device_train_batch_size, grad_accum=self.gradient_accumulation_steps,
            dm_batch_size=self.dm_batch_size or self.per_device_train_batch_size,
            lr=self.learning_rate, weight_decay=self.weight_decay,
            warmup_steps=int(self.warmup_steps) if self.warmup_steps >= 1 else 0,
            grad_clip=self.max_grad_norm, lora=peft_config is not None, bf16=bool(self.bf16), save_every=0,
            output_dir=str(stages), seed=self.seed, device=self.device.type,
            batch_size_eval=self.per_device_eval_batch_size, progress=not self.disable_tqdm,
            **same).validate()


# ------------------------------------------------------------------ the trainer

class _GuardStop(TrainerCallback):
    """Ends training after the step at which the ESS guard fired (stop_on_collapse), as the
    CLI's loop does: that step's update is applied and logged first."""

    def __init__(self, trainer: DRCPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._cpo_stop:
            control.should_training_stop = True
        return control


class DRCPOTrainer(LogsDiagnostics, Trainer):
    """``transformers.Trainer`` running the CLI's CPO / DR-CPO stages and step (module doc)."""

    def __init__(self, model: Any, args: DRCPOConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, peft_config: Any = None,
                 **kwargs: Any):
        args = args if args is not None else DRCPOConfig(output_dir="drcpo-output")
        if not isinstance(args, DRCPOConfig):
            raise TypeError(f"args must be a DRCPOConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("DRCPOTrainer needs train_dataset= (a text and an outcome column).")
        train_t = dataset_table(train_dataset, args, "train_dataset")
        eval_t = None if eval_dataset is None else dataset_table(eval_dataset, args, "eval_dataset")
        if eval_t is None and args.eval_fraction:
            train_t, eval_t = split_held_out(train_t, args.eval_fraction, args.seed)
        self.cfg = args.run_config(Path(args.stages_dir or Path(args.output_dir) / "stages"),
                                   peft_config)
        self._prep = build_stages(model, processing_class, train_t, eval_t, self.cfg,
                                  Path(self.cfg.output_dir))
        policy = make_trainable(self._prep.f0, peft_config, self.cfg.seed)
        self._prep.f0 = None  # no reference model in memory while training (the cache stands in)
        self._data = train_data(self._prep, self.cfg.method)
        self._guard = None
        self._cpo_stop = False
        super().__init__(model=policy, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.add_callback(_GuardStop(self))

    @property
    def prepared(self):
        """The pipeline's Prepared stages (tokenizer, encodings, reference cache, ghat, DM set)."""
        return self._prep

    def get_train_dataloader(self):
        """Placeholders, one per micro-batch: the rows of step t are the CLI's (seed, t) slice,
        built in get_batch_samples, so skipping batches on resume needs no data."""
        world = current_world()
        rows, dm_rows = effective_rows(self.cfg, world)
        self._guard = WeightGuard(self.cfg.ess_guard, self.cfg.stop_on_collapse, rows, dm_rows,
                                  quiet=not world.is_main)
        per_epoch = max(1, -(-len(self._data.rows) // rows))  # steps that see every row once
        return DataLoader(list(range(per_epoch * self.cfg.grad_accum)), batch_size=None)

    def get_resumed_dataloader(self, dataloader, num_batches):
        return dataloader  # placeholders: the data of a step depends on the step alone

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not [s for _, s in zip(range(num_batches), epoch_iterator, strict=False)]:
            return [], None
        self._micro = step_micro_batches(self._data, self.state.global_step, cfg=self.cfg,
                                         world=current_world(), pad_id=self._prep.pad_id,
                                         device=self.args.device)
        return [{"input_ids": b["input_ids"], "cpo_slot": m} for m, (b, _) in enumerate(self._micro)], None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The first micro-batch of a step accumulates the whole effective batch's exact
        gradient (loop.effective_gradient, averaged over the ranks as the CLI does); the
        others add nothing. Returns the step's loss once, so Trainer logs the CLI's loss."""
        if inputs["cpo_slot"]:
            return torch.zeros((), device=self.args.device)
        t0, world, dev = time.perf_counter(), current_world(), self.args.device
        self.model.train()
        autocast = autocast_args(self.model, self.cfg)
        step = self.state.global_step + 1
        res = effective_gradient(self.model, self._micro, self.cfg, world, autocast, step)
        average_gradients([p for p in self.model.parameters() if p.requires_grad], world)
        line = metrics_line(step, res, 0.0, 0.0, time.perf_counter() - t0, *effective_rows(self.cfg, world))
        # stop_on_collapse: the loop stops once this step is applied and logged (_GuardStop)
        self._cpo_stop = self._guard.update(step, line, dm_only=not method_of(self.cfg.method).outcome_rows)
        fit = self._prep.outcome_fit
        self._cpo_record({**{k: line.get(k) for k in ("ess", "max_weight_share", "clip_fraction", "dm_ess",
                                                      "dm_max_weight_share", "value", "tokens_per_s")},
                          "ess_guard_fired": float(self._guard.collapsed_at is not None),
                          **{f"ess_guard_min_{k}_share": v for k, v in self._guard.min_share.items()},
                          "ghat_oof_r2": None if fit is None else fit.r2})
        return torch.tensor(res.loss, device=dev)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The CLI's evaluation (pipeline/report/evaluate.py) of the policy: off-policy estimates of
        V on the held-out rows (naive, IPW, SNIPS, DM, DR with 95% bootstrap intervals, ESS)
        and ghat's mean over ``num_samples`` generations; logged and returned."""
        prep = self._prep if eval_dataset is None else self._held_out(eval_dataset)
        if prep.eval_enc is None:
            raise ValueError("evaluate(): no held-out rows; pass eval_dataset= (to DRCPOTrainer or "
                             "evaluate()) or set DRCPOConfig(eval_fraction=...).")
        try:
            res = evaluate_model(prep, self.model, name="policy", off_policy=True)
        finally:
            prep.f0 = None  # ghat's features loaded f_0: free it again
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in flat_metrics(res).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _held_out(self, ds: Any):
        table = dataset_table(ds, self.args, "eval_dataset")
        prep = dataclasses.replace(self._prep, eval_table=table, eval_enc=encode(
            table, self._prep.tokenizer, self.cfg.max_tokens, "truncate"))
        prep.eval_ref = ref_logprobs(prep, prep.eval_enc, "eval")
        prep.ghat_eval = prep.outcome_fit.predict(texts_features(prep, prep.eval_enc))
        return prep


def flat_metrics(res: dict[str, Any]) -> dict[str, float]:
    """evaluate_model's result as flat numbers: ``dr``, ``dr_lo``, ``dr_hi``, ``ess``, ``ghat``, ..."""
    out: dict[str, float] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) and ("estimate" in v or "mean" in v):
                out[name] = float(v.get("estimate", v.get("mean")))
                out.update({f"{name}_{b}": float(v[b]) for b in ("lo", "hi") if b in v})
            elif isinstance(v, dict):
                walk(v, "" if k == "off_policy" else f"{name}_")
            elif isinstance(v, (bool, int, float, np.floating, np.integer)):
                out[name] = float(v)

    walk({k: v for k, v in res.items() if k != "samples"}, "")
    return out


__all__ = ["DRCPOConfig", "DRCPOTrainer", "build_stages", "dataset_table", "flat_metrics",
           "make_trainable", "split_held_out"]
