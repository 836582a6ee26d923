"""Drop-in DR-CPO loss for Hugging Face ``Trainer`` (and TRL trainers built on it).

    from transformers import Trainer, TrainingArguments
    from cpo_fast.hf import DRCPOTrainerMixin

    class DRCPOTrainer(DRCPOTrainerMixin, Trainer):
        cpo_loss_kwargs = {"weighting": "self_normalized"}

    args = TrainingArguments(..., remove_unused_columns=False)   # keep outcome columns

Each batch carries HF-convention ``labels`` [B, T] (unshifted, -100 on prompt and padding,
as for causal-LM SFT), ``outcome`` [B], and the reference log-probability: either
``ref_logp`` [B] (log P^R(x_i), e.g. a logged propensity or f_0's precomputed sum) or
``ref_token_logp`` [B, T-1] (f_0's token log-probs aligned with the shifted labels).
Optional ``outcome_pred`` [B] (cross-fitted ghat) turns CPO into DR-CPO. Token log-probs
come from the fused-linear op on the backbone's last hidden states and the output weight,
so the N x V logits are never built. The loss is put together by
:func:`cpo_fast.objectives.assemble_loss` (method ``dr_cpo``), as in ``DRCPOLoss`` and the
pipeline, so ``cpo_loss_kwargs`` may also hold ``entropy_coef`` and ``kl_coef`` (the latter
needs ``ref_token_logp``).

Gradient accumulation and DDP (docs/scale-out.md): the mixin optimizes the objective of the
*effective batch* (``gradient_accumulation_steps`` micro-batches on every rank), not of
each micro-batch. Trainer fetches a step's micro-batches up front (``get_batch_samples``);
there the mixin runs one no-grad forward over them, gathers the rows' scalars across ranks
and computes each row's coefficient dL/ds (cpo_fast/effective_batch.py), and every
micro-batch then backpropagates ``sum_i c_i s_i`` (plus its share of the token-level
regularizers). The gradient is exact for every weighting scheme; ESS and the other
diagnostics are the effective batch's. Under DDP the mixin runs the backbone and head
itself (not through DDP's forward), so it averages the gradients over the ranks itself at
each optimizer step. The RNG state is replayed after the no-grad pass, so with dropout the
backward passes draw the masks the coefficients were computed with (as long as nothing
else draws random numbers between Trainer's micro-batches). The logged ``loss`` is the
effective batch's objective without the regularizers.

Logging: ESS, DM ESS, the max weight shares and the clip fraction of each optimizer step
go into Trainer's own training log lines (averaged over the steps since the last line, as
Trainer averages the loss), so every ``report_to`` backend (TensorBoard, W&B, ...) and
``trainer.state.log_history`` get them.
"""

from __future__ import annotations

from typing import Any

import torch

from cpo_fast.distributed import average_gradients, current_world, rng_replay, rng_snapshot
from cpo_fast.effective_batch import known_loss, plan, surrogate_loss, token_pair
from cpo_fast.estimators import LossOutput
from cpo_fast.objectives import Objective

_REQUIRED = ("input_ids", "labels", "outcome")
_PLAN, _INDEX = "cpo_plan", "cpo_micro_batch"


def _checked(inputs: dict[str, torch.Tensor]) -> tuple[dict, None]:
    """The batch as a micro-batch of outcome rows (no DM rows: DR-CPO uses these rows as
    its DM set), its required columns checked with the fix named."""
    missing = [k for k in _REQUIRED if k not in inputs]
    if "ref_logp" not in inputs and "ref_token_logp" not in inputs:
        missing.append("ref_logp or ref_token_logp")
    if missing:
        raise KeyError(
            f"DR-CPO batch is missing {missing}; got keys {sorted(inputs)}. Add the columns to "
            "the dataset and set TrainingArguments(remove_unused_columns=False)."
        )
    return inputs, None


def _unwrap(model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def objective(length_normalize: bool = False, **loss_kwargs: Any) -> Objective:
    """The mixin's objective: DR-CPO (CPO without ``outcome_pred``) with these settings."""
    return Objective.from_kwargs("dr_cpo", length_normalize=length_normalize, **loss_kwargs)


def drcpo_compute_loss(
    model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, *,
    backend: str | None = None, **loss_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, LossOutput]:
    """``Trainer.compute_loss``-compatible DR-CPO loss of one batch (see the module docstring)."""
    obj = objective(**loss_kwargs)
    out = obj.loss(*token_pair(_unwrap(model), _checked(inputs), obj, backend=backend))
    return (out.loss, out) if return_outputs else out.loss


def effective_batch_plan(model: Any, batches: list[dict[str, torch.Tensor]], *,
                         backend: str | None = None, **loss_kwargs: Any) -> LossOutput:
    """Pass 1 over a step's micro-batches (this rank's, on the model's device): attach to
    each batch the step's :class:`~cpo_fast.effective_batch.Plan` and its position in it;
    gather across ranks when torch.distributed is initialized. Returns the effective
    batch's loss and diagnostics."""
    obj = objective(**loss_kwargs)
    with torch.no_grad():
        pairs = [token_pair(_unwrap(model), _checked(b), obj, with_entropy=False, backend=backend)
                 for b in batches]
    p = plan(pairs, obj, current_world())
    for k, b in enumerate(batches):
        b[_PLAN], b[_INDEX] = p, k
    return p.output


def drcpo_surrogate_loss(model: Any, inputs: dict[str, Any], *, backend: str | None = None,
                         **loss_kwargs: Any) -> torch.Tensor:
    """Pass 2 for one micro-batch carrying its plan: ``sum_i c_i s_i`` plus its share of the
    regularizers; its value is the effective batch's loss (detached) divided by the number
    of micro-batches, so that Trainer's logged loss is the effective batch's."""
    obj, p, k = objective(**loss_kwargs), inputs[_PLAN], inputs[_INDEX]
    batch = {key: v for key, v in inputs.items() if key not in (_PLAN, _INDEX)}
    grad_part, _ = known_loss(_unwrap(model), _checked(batch), obj,
                              lambda pair: surrogate_loss(pair, obj, p, k), backend=backend)
    return p.output.loss.detach() / len(p.coef) + (grad_part - grad_part.detach())


def diagnostics(out: LossOutput) -> dict[str, float]:
    """The weight diagnostics of one step that the CLI writes to metrics.jsonl (those set)."""
    vals = {"ess": out.ess, "max_weight_share": out.max_weight_share,
            "clip_fraction": out.clip_fraction, "dm_ess": out.dm_ess,
            "dm_max_weight_share": out.dm_max_weight_share}
    return {k: float(v) for k, v in vals.items() if v is not None}


class LogsDiagnostics:
    """Trainer mixin: values recorded with :meth:`_cpo_record` once per optimizer step are
    averaged into the next training log line (the one with ``loss``), so they reach every
    ``report_to`` backend through Trainer's own callbacks."""

    def _cpo_record(self, values: dict[str, float | None]) -> None:
        window = self.__dict__.setdefault("_cpo_window", {})
        for k, v in values.items():
            if v is not None:
                window.setdefault(k, []).append(float(v))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        window = self.__dict__.get("_cpo_window")
        if window and "loss" in logs:  # a training line: add the window's means, then reset
            logs = {**logs, **{k: sum(v) / len(v) for k, v in window.items()}}
            self._cpo_window = {}
        return super().log(logs, *args, **kwargs)


class DRCPOTrainerMixin(LogsDiagnostics):
    """Mix into ``transformers.Trainer`` before it: ``class T(DRCPOTrainerMixin, Trainer)``."""

    cpo_loss_kwargs: dict[str, Any] = {}
    loss_is_scaled_for_ga = True  # compute_loss returns the micro-batch's share already

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            self.model.train()
            batches = [self._prepare_inputs(b) for b in batches]
            device = next(self.model.parameters()).device
            rng = rng_snapshot(device)  # pass 2 (the training steps) replays pass 1's dropout
            out = effective_batch_plan(self.model, batches, **self.cpo_loss_kwargs)
            rng_replay(rng, device)
            self._cpo_last = diagnostics(out)
            self._cpo_record(self._cpo_last)  # one optimizer step: to Trainer's next log line
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if _PLAN in inputs:  # training: the effective batch's plan (get_batch_samples)
            out: LossOutput = inputs[_PLAN].output
            loss = drcpo_surrogate_loss(model, inputs, **self.cpo_loss_kwargs)
        else:  # evaluation, or a loop without get_batch_samples: this batch's own loss
            loss, out = drcpo_compute_loss(model, inputs, True, **self.cpo_loss_kwargs)
            if model.training:
                loss = loss / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            self._cpo_last = diagnostics(out)
            if model.training:
                self._cpo_record(self._cpo_last)
        return (loss, {"ess": out.ess}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if _unwrap(model) is not model and self.accelerator.sync_gradients:
            # DDP's reducer never saw a forward through the wrapper: average here, as it would
            average_gradients([p for p in model.parameters() if p.requires_grad], current_world())
        return loss
