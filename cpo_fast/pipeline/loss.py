"""The loss of one micro-batch: policy token log-probs (fused-linear op, logits never
built), then the method's objective and regularizers by :func:`cpo_fast.assemble_loss`, the
one loss-assembly function that the HF mixin and ``DRCPOLoss`` use too.
"""

from __future__ import annotations

from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.objectives import TokenBatch, assemble_loss
from cpo_fast.pipeline.batches import DM_METHODS
from cpo_fast.pipeline.config import RunConfig


def compute_loss(model, batch, dm_batch, cfg: RunConfig, method: str):
    """Return (loss, LossOutput or None for the SFT methods)."""
    from cpo_fast.pipeline.modeling import sequence_token_logprobs

    want_h = cfg.entropy_coef > 0

    def tokens(b, **rows) -> TokenBatch:
        out = sequence_token_logprobs(model, b, with_entropy=want_h, backend=cfg.backend)
        logp, ent = out if want_h else (out, None)
        return TokenBatch(logp, b["labels"] != IGNORE_INDEX, ref_logp=b["ref"], entropy=ent, **rows)

    # The DM batch first: the order of the forward passes is part of bitwise resume.
    dm = tokens(dm_batch, outcome_pred=dm_batch["ghat"]) if method in DM_METHODS else None
    main = None if method == "oo_rlhf" else tokens(
        batch, outcome=batch.get("outcome"), outcome_pred=batch.get("ghat"),
        log_propensity=batch.get("log_propensity"))
    out = assemble_loss(
        method, main, dm, weighting=cfg.weighting, higher_is_better=cfg.higher_is_better,
        length_normalize=cfg.length_normalize, entropy_coef=cfg.entropy_coef, kl_coef=cfg.kl_coef,
        regularize_on="dm", log_weight_cap=cfg.log_weight_cap, max_log_weight=cfg.max_log_weight,
        truncation=cfg.truncation, clip_eps=cfg.clip_eps)
    return out.loss, (None if method in ("sft_all", "sft_top") else out)
