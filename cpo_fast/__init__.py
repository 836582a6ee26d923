"""cpo_fast: fused output-layer kernels and objectives for CPO / DR-CPO.

Public API:
    token_logprobs(logits, labels, ...)              per-token log-probs (fused logits path)
    linear_token_logprobs(hidden, weight, labels)    same, logits never materialized
    causal_lm_token_logprobs(model, input_ids, labels)  same for a HF causal LM (head transforms read
                                                     from its config), logits never built
    HeadTransform(temperature, softcap, logit_scale)  the logit transform the ops apply;
                                                     HeadTransform.from_model(model) reads it
    dr_cpo_loss / cpo_loss / oo_rlhf_loss            importance-weighted objectives
    Objective(method, ...).loss(TokenBatch, dm)      a training step's loss, one place
    assemble_loss(method, TokenBatch, dm=...)        the same as a function
    sequence_logprobs, sft_loss, entropy_bonus, kl_penalty, top_quantile_mask, DRCPOLoss
    IGNORE_INDEX                                     label of positions with no loss (-100)

``cpo_fast.reference`` holds the plain-PyTorch ground truth under the same names.
"""

from cpo_fast._transform import HeadTransform
from cpo_fast.constants import IGNORE_INDEX, WEIGHTINGS
from cpo_fast.estimators import LossOutput, cpo_loss, dr_cpo_loss, oo_rlhf_loss
from cpo_fast.models import TokenBatch, causal_lm_token_logprobs
from cpo_fast.objectives import (
    DRCPOLoss,
    Objective,
    assemble_loss,
    entropy_bonus,
    kl_penalty,
    sequence_logprobs,
    sft_loss,
    top_quantile_mask,
)
from cpo_fast.ops import linear_token_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX", "WEIGHTINGS", "DRCPOLoss", "LossOutput", "Objective", "TokenBatch",
    "assemble_loss",
    "HeadTransform", "causal_lm_token_logprobs",
    "cpo_loss", "dr_cpo_loss", "entropy_bonus", "kl_penalty", "linear_token_logprobs",
    "oo_rlhf_loss", "sequence_logprobs", "sft_loss", "token_logprobs", "top_quantile_mask",
]
