"""The loss of one micro-batch: policy token log-probs (fused-linear op, logits never
built), then the method's objective and regularizers by :func:`cpo_fast.assemble_loss`, the
one loss-assembly function that the HF mixin and ``DRCPOLoss`` use too.

The pieces are also what the two-pass step over an effective batch (step.py) needs: the
token log-probs of a micro-batch (:func:`token_batches`), its per-row scalars
(:func:`row_values`: s_i, log P^R, y, ghat, and the DM set's) and its token-level
regularizers (:func:`regularizers`).
"""

from __future__ import annotations

from torch import Tensor

from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.objectives import (
    TokenBatch,
    assemble_loss,
    entropy_bonus,
    kl_penalty,
    sequence_logprobs,
)
from cpo_fast.pipeline.batches import DM_METHODS
from cpo_fast.pipeline.config import RunConfig


def token_batches(model, batch, dm_batch, cfg: RunConfig, method: str, *,
                  with_entropy: bool | None = None) -> tuple[TokenBatch | None, TokenBatch | None]:
    """(outcome rows, DM rows) as TokenBatches of the policy's token log-probs (None where
    ``method`` has no such rows); entropies when ``cfg.entropy_coef > 0``."""
    from cpo_fast.pipeline import modeling

    want_h = cfg.entropy_coef > 0 if with_entropy is None else with_entropy

    def tokens(b, **rows) -> TokenBatch:
        out = modeling.sequence_token_logprobs(model, b, with_entropy=want_h, backend=cfg.backend)
        logp, ent = out if want_h else (out, None)
        return TokenBatch(logp, b["labels"] != IGNORE_INDEX, ref_logp=b["ref"], entropy=ent, **rows)

    # The DM batch first: the order of the forward passes is part of bitwise resume.
    dm = tokens(dm_batch, outcome_pred=dm_batch["ghat"]) if method in DM_METHODS else None
    main = None if method == "oo_rlhf" else tokens(
        batch, outcome=batch.get("outcome"), outcome_pred=batch.get("ghat"),
        log_propensity=batch.get("log_propensity"))
    return main, dm


def compute_loss(model, batch, dm_batch, cfg: RunConfig, method: str):
    """Return (loss, LossOutput or None for the SFT methods)."""
    main, dm = token_batches(model, batch, dm_batch, cfg, method)
    out = assemble_loss(
        method, main, dm, weighting=cfg.weighting, higher_is_better=cfg.higher_is_better,
        length_normalize=cfg.length_normalize, entropy_coef=cfg.entropy_coef, kl_coef=cfg.kl_coef,
        regularize_on="dm", log_weight_cap=cfg.log_weight_cap, max_log_weight=cfg.max_log_weight,
        truncation=cfg.truncation, clip_eps=cfg.clip_eps)
    return out.loss, (None if method in ("sft_all", "sft_top") else out)


def sequence_values(tb: TokenBatch | None, cfg: RunConfig) -> Tensor | None:
    """s_i of a TokenBatch (masked sums of token log-probs, or means with length_normalize)."""
    if tb is None:
        return None
    return sequence_logprobs(tb.logp, tb.mask, length_normalize=cfg.length_normalize)


def row_values(main: TokenBatch | None, dm: TokenBatch | None, cfg: RunConfig,
               method: str) -> dict[str, Tensor | None]:
    """The per-row scalars the objective depends on, named as dr_cpo_loss's arguments (what
    the no-grad pass keeps of each micro-batch: O(rows) numbers)."""
    rows: dict[str, Tensor | None] = {}
    if main is not None:
        ref = main.log_propensity
        if ref is None:
            ref = sequence_logprobs(main.ref_logp, main.mask, length_normalize=cfg.length_normalize)
        rows.update(policy_logp=sequence_values(main, cfg), ref_logp=ref, outcome=main.outcome,
                    outcome_pred=main.outcome_pred if method == "dr_cpo" else None)
    if dm is not None:
        rows.update(dm_policy_logp=sequence_values(dm, cfg),
                    dm_ref_logp=sequence_logprobs(dm.ref_logp, dm.mask,
                                                  length_normalize=cfg.length_normalize),
                    dm_outcome_pred=dm.outcome_pred)
    return rows


def regularized(main: TokenBatch | None, dm: TokenBatch | None) -> TokenBatch:
    """The rows the entropy and KL terms run over (assemble_loss's regularize_on="dm")."""
    return dm if dm is not None else main


def regularizers(tb: TokenBatch, cfg: RunConfig) -> Tensor | None:
    """entropy_coef * entropy bonus + kl_coef * KL (k3): token means over ``tb`` (as in
    assemble_loss), None when both coefficients are 0."""
    terms = []
    if cfg.entropy_coef and tb.entropy is not None:
        terms.append(entropy_bonus(tb.entropy, tb.mask, cfg.entropy_coef))
    if cfg.kl_coef:
        terms.append(kl_penalty(tb.logp, tb.ref_logp, tb.mask, cfg.kl_coef))
    return sum(terms[1:], terms[0]) if terms else None
