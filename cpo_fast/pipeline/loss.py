"""The loss of one micro-batch: policy token log-probs (fused-linear op, logits never
built), the method's objective, and the entropy/KL regularizers.

This is the glue between a batch and :mod:`cpo_fast.objectives`; it keeps its own module so
that a single loss-assembly function can replace its body without touching the loop.
"""

from __future__ import annotations

from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.objectives import (
    dr_cpo_loss,
    entropy_bonus,
    kl_penalty,
    oo_rlhf_loss,
    sequence_logprobs,
    sft_loss,
)
from cpo_fast.pipeline.batches import DM_METHODS
from cpo_fast.pipeline.config import RunConfig


def compute_loss(model, batch, dm_batch, cfg: RunConfig, method: str):
    """Return (loss, LossOutput or None). Token log-probs: fused-linear op, no logits."""
    from cpo_fast.pipeline.modeling import sequence_token_logprobs

    def logp(b):
        want_h = cfg.entropy_coef > 0
        out = sequence_token_logprobs(model, b, with_entropy=want_h, backend=cfg.backend)
        return out if want_h else (out, None)

    lo = None
    seq = lambda t, m: sequence_logprobs(t, m, length_normalize=cfg.length_normalize)
    kw = dict(weighting=cfg.weighting, higher_is_better=cfg.higher_is_better,
              max_log_weight=cfg.max_log_weight, truncation=cfg.truncation, clip_eps=cfg.clip_eps)
    reg_logp = reg_mask = reg_ref = ent = None
    if method in ("sft_all", "sft_top"):
        tok, ent = logp(batch)
        mask = batch["labels"] != IGNORE_INDEX
        loss = sft_loss(tok, mask)
        reg_logp, reg_mask, reg_ref = tok, mask, batch["ref"]
    else:
        dm = {}
        if method in DM_METHODS:
            dtok, dent = logp(dm_batch)
            dmask = dm_batch["labels"] != IGNORE_INDEX
            dm = dict(dm_policy_logp=seq(dtok, dmask), dm_ref_logp=seq(dm_batch["ref"], dmask),
                      dm_outcome_pred=dm_batch["ghat"])
            reg_logp, reg_mask, reg_ref, ent = dtok, dmask, dm_batch["ref"], dent
        if method == "oo_rlhf":
            lo = oo_rlhf_loss(**dm, **kw)
        else:
            tok, ent_r = logp(batch)
            mask = batch["labels"] != IGNORE_INDEX
            ref = batch["log_propensity"] if "log_propensity" in batch else seq(batch["ref"], mask)
            lo = dr_cpo_loss(seq(tok, mask), ref, batch["outcome"],
                             batch["ghat"] if method == "dr_cpo" else None, **dm, **kw)
            if reg_logp is None:
                reg_logp, reg_mask, reg_ref, ent = tok, mask, batch["ref"], ent_r
        loss = lo.loss
    if cfg.entropy_coef and ent is not None:
        loss = loss + entropy_bonus(ent, reg_mask, cfg.entropy_coef)
    if cfg.kl_coef:
        loss = loss + kl_penalty(reg_logp, reg_ref, reg_mask, cfg.kl_coef)
    return loss, lo
