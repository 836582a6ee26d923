"""One batch of sequences as the objectives read it, and the one way it is built from a
model and a batch dictionary.

The batch dictionary (the pipeline's ``collate``, the Hugging Face mixin and
``DRCPOTrainer`` all use it):

    input_ids        [B, T]    token ids
    attention_mask   [B, T]    optional
    labels           [B, T]    HF convention: unshifted, IGNORE_INDEX (-100) on the prompt
                               and padding; shifted once, in causal_lm_token_logprobs, and
                               the counted tokens here are ``labels[:, 1:] != -100``
    outcome          [B]       y (outcome rows)
    outcome_pred     [B]       ghat, cross-fitted (DR-CPO's outcome rows, and the DM rows)
    ref_token_logp   [B, T-1]  f_0's token log-probs aligned with ``labels[:, 1:]``
    ref_logp         [B]       a known log P^R(x) (e.g. a logged propensity); replaces the
                               sum of ``ref_token_logp`` in the weights

Every per-token tensor of a :class:`TokenBatch` is ``[B, T-1]`` and aligned with
``labels[:, 1:]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.models import causal_lm_token_logprobs


@dataclass
class TokenBatch:
    """Per-token tensors of one set of sequences, ``[B, T-1]`` and aligned, plus its per-row
    values: what :class:`cpo_fast.objectives.Objective` reads."""

    logp: Tensor  # the policy's token log-probs (differentiable)
    mask: Tensor  # True on the tokens that count (completion, not prompt or padding)
    ref_logp: Tensor | None = None  # the reference model's (f_0's) token log-probs
    entropy: Tensor | None = None  # the policy's token entropies (for entropy_coef)
    outcome: Tensor | None = None  # y [B]
    outcome_pred: Tensor | None = None  # ghat [B] (cross-fitted)
    log_propensity: Tensor | None = None  # [B] log P^R(x), replaces sum_t ref_logp


def counted_tokens(labels: Tensor) -> Tensor:
    """``[B, T-1]``: True where an unshifted HF label counts (the next token is scored)."""
    return labels[:, 1:] != IGNORE_INDEX


def counted(inputs: dict[str, Tensor] | None) -> int:
    """How many tokens of a batch dictionary count (0 for None)."""
    return 0 if inputs is None else int(counted_tokens(inputs["labels"]).sum())


def from_inputs(model: Any, inputs: dict[str, Tensor], *, with_entropy: bool = False,
                backend: str | None = None) -> TokenBatch:
    """The policy's token log-probs of ``inputs`` (fused-linear op, logits never built) with
    the batch's reference log-probs and per-row values, all in float32."""
    out = causal_lm_token_logprobs(model, inputs["input_ids"], inputs["labels"],
                                   attention_mask=inputs.get("attention_mask"),
                                   with_entropy=with_entropy, backend=backend)
    logp, entropy = out if with_entropy else (out, None)

    def row(key: str) -> Tensor | None:
        v = inputs.get(key)
        return None if v is None else v.to(logp.dtype)

    return TokenBatch(logp, counted_tokens(inputs["labels"]),
                      ref_logp=row("ref_token_logp"), entropy=entropy, outcome=row("outcome"),
                      outcome_pred=row("outcome_pred"), log_propensity=row("ref_logp"))


__all__ = ["TokenBatch", "counted", "counted_tokens", "from_inputs"]
