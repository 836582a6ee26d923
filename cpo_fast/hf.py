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
"""

from __future__ import annotations

from typing import Any

import torch

from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.models import causal_lm_token_logprobs
from cpo_fast.objectives import LossOutput, TokenBatch, assemble_loss

_REQUIRED = ("input_ids", "labels", "outcome")


def drcpo_compute_loss(
    model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, *,
    length_normalize: bool = False, backend: str | None = None, **loss_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, LossOutput]:
    """``Trainer.compute_loss``-compatible DR-CPO loss (see the module docstring)."""
    missing = [k for k in _REQUIRED if k not in inputs]
    if "ref_logp" not in inputs and "ref_token_logp" not in inputs:
        missing.append("ref_logp or ref_token_logp")
    if missing:
        raise KeyError(
            f"DR-CPO batch is missing {missing}; got keys {sorted(inputs)}. Add the columns to "
            "the dataset and set TrainingArguments(remove_unused_columns=False)."
        )
    labels = inputs["labels"][:, 1:]
    want_entropy = bool(loss_kwargs.get("entropy_coef"))
    out = causal_lm_token_logprobs(model, inputs["input_ids"], inputs["labels"],
                                   attention_mask=inputs.get("attention_mask"),
                                   with_entropy=want_entropy, backend=backend)
    logp, entropy = out if want_entropy else (out, None)
    pred, ref_tok = inputs.get("outcome_pred"), inputs.get("ref_token_logp")
    batch = TokenBatch(
        logp, labels != IGNORE_INDEX,
        ref_logp=None if ref_tok is None else ref_tok.to(logp.dtype), entropy=entropy,
        outcome=inputs["outcome"].to(logp.dtype),
        outcome_pred=None if pred is None else pred.to(logp.dtype),
        log_propensity=inputs["ref_logp"].to(logp.dtype) if "ref_logp" in inputs else None,
    )
    out = assemble_loss("dr_cpo", batch, length_normalize=length_normalize, **loss_kwargs)
    return (out.loss, out) if return_outputs else out.loss


class DRCPOTrainerMixin:
    """Mix into ``transformers.Trainer`` before it: ``class T(DRCPOTrainerMixin, Trainer)``."""

    cpo_loss_kwargs: dict[str, Any] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, out = drcpo_compute_loss(model, inputs, True, **self.cpo_loss_kwargs)
        self._cpo_last = {"ess": float(out.ess), "max_weight_share": float(out.max_weight_share),
                          "clip_fraction": float(out.clip_fraction)}
        return (loss, {"ess": out.ess}) if return_outputs else loss
