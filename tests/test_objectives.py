"""The objectives on per-token inputs (cpo_fast/objectives.py): the regularizers and SFT
against the reference, ``DRCPOLoss`` against the functional route (and its gradient w.r.t.
the logits against the float64 reference chain), and ``assemble_loss`` against the loss glue
the pipeline wrote before it existed."""

from __future__ import annotations

import pytest
import torch

import cpo_fast
from cpo_fast import reference
from cpo_fast.constants import IGNORE_INDEX

f64 = dict(dtype=torch.float64)


def test_regularizers_and_sft_match_reference():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g, **f64)
    ref = -torch.rand(3, 5, generator=g, **f64)
    ent = torch.rand(3, 5, generator=g, **f64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    torch.testing.assert_close(cpo_fast.kl_penalty(lp, ref, mask),
                               reference.kl_penalty(lp, ref, mask))
    torch.testing.assert_close(cpo_fast.kl_penalty(lp, ref, mask, 0.3),
                               reference.kl_penalty(lp, ref, mask, 0.3))
    torch.testing.assert_close(cpo_fast.entropy_bonus(ent, mask, 0.1),
                               reference.entropy_bonus(ent, mask, 0.1))
    torch.testing.assert_close(cpo_fast.sft_loss(lp, mask), reference.sft_loss(lp, mask))
    for ln in (False, True):
        torch.testing.assert_close(cpo_fast.sequence_logprobs(lp, mask, length_normalize=ln),
                                   reference.sequence_logprobs(lp, mask, length_normalize=ln))
    top = cpo_fast.top_quantile_mask(torch.arange(8.0), 0.75)
    assert top.tolist() == [False] * 6 + [True] * 2
    low = cpo_fast.top_quantile_mask(torch.arange(8.0), 0.75, higher_is_better=False)
    assert low.tolist() == [True] * 2 + [False] * 6


def test_module_matches_functional_and_end_to_end_logits_gradient():
    """DRCPOLoss on token log-probs from the fused op; gradient w.r.t. the logits equals
    the float64 reference chain."""
    torch.manual_seed(0)
    B, T, V = 4, 6, 23
    logits = torch.randn(B, T + 1, V, **f64)
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = IGNORE_INDEX  # a prompt
    mask = labels != IGNORE_INDEX
    ref_tok = -torch.rand(B, T, **f64)
    y, ghat = torch.randn(B, **f64), torch.randn(B, **f64)
    mod = cpo_fast.DRCPOLoss("self_normalized", entropy_coef=0.01, kl_coef=0.1)

    def run(fn):
        z = logits.clone().requires_grad_(True)
        lp, ent = fn(z[:, :-1], labels)
        out = mod(lp, mask, ref_tok, y, ghat, entropy=ent)
        out.loss.backward()
        return out.loss.detach(), z.grad

    ref_fn = lambda z, lab: reference.token_logprobs(z, lab, with_entropy=True)
    lib_fn = lambda z, lab: cpo_fast.token_logprobs(z, lab, with_entropy=True)
    l1, g1 = run(ref_fn)
    l2, g2 = run(lib_fn)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    seq = lambda t: cpo_fast.sequence_logprobs(t, mask)
    lp = reference.token_logprobs(logits[:, :-1], labels)
    direct = cpo_fast.dr_cpo_loss(seq(lp), seq(ref_tok), y, ghat).loss
    ent = reference.token_logprobs(logits[:, :-1], labels, with_entropy=True)[1]
    expect = direct + cpo_fast.entropy_bonus(ent, mask, 0.01) + cpo_fast.kl_penalty(lp, ref_tok, mask, 0.1)
    torch.testing.assert_close(l1, expect)


def _pipeline_glue(method, tok, mask, ref, ent, y, ghat, lprop, dtok, dmask, dref, dent, dghat,
                   entropy_coef, kl_coef, **kw):
    """The loss glue as the pipeline's compute_loss wrote it before assemble_loss existed
    (regularizers on the DM batch when there is one), on precomputed token tensors."""
    seq = cpo_fast.sequence_logprobs
    lo = None
    if method in ("sft_all", "sft_top"):
        loss = cpo_fast.sft_loss(tok, mask)
        reg = (tok, mask, ref, ent)
    else:
        dm, reg = {}, None
        if method in ("dr_cpo", "oo_rlhf"):
            dm = dict(dm_policy_logp=seq(dtok, dmask), dm_ref_logp=seq(dref, dmask),
                      dm_outcome_pred=dghat)
            reg = (dtok, dmask, dref, dent)
        if method == "oo_rlhf":
            lo = cpo_fast.oo_rlhf_loss(**dm, **kw)
        else:
            r = lprop if lprop is not None else seq(ref, mask)
            lo = cpo_fast.dr_cpo_loss(seq(tok, mask), r, y, ghat if method == "dr_cpo" else None,
                                      **dm, **kw)
            reg = reg or (tok, mask, ref, ent)
        loss = lo.loss
    if entropy_coef:
        loss = loss + cpo_fast.entropy_bonus(reg[3], reg[1], entropy_coef)
    if kl_coef:
        loss = loss + cpo_fast.kl_penalty(reg[0], reg[2], reg[1], kl_coef)
    return loss, lo


@pytest.mark.parametrize("method", ["sft_all", "sft_top", "cpo", "dr_cpo", "oo_rlhf"])
@pytest.mark.parametrize("with_propensity", [False, True])
def test_assemble_loss_matches_the_pipeline_glue(method, with_propensity):
    g = torch.Generator().manual_seed(7)
    B, M, T = 5, 7, 6
    r = lambda *shape: torch.randn(*shape, generator=g, **f64)
    tok, ref, ent = -r(B, T).abs(), -r(B, T).abs(), r(B, T).abs()
    dtok, dref, dent = -r(M, T).abs(), -r(M, T).abs(), r(M, T).abs()
    mask, dmask = torch.rand(B, T, generator=g) > 0.3, torch.rand(M, T, generator=g) > 0.3
    y, ghat, dghat = r(B), r(B), r(M)
    lprop = -r(B).abs() * 3 if with_propensity else None
    kw = dict(weighting="clipped", higher_is_better=False, max_log_weight=30.0, clip_eps=0.3)
    want, lo = _pipeline_glue(method, tok, mask, ref, ent, y, ghat, lprop, dtok, dmask, dref,
                              dent, dghat, 0.05, 0.2, **kw)
    batch = cpo_fast.TokenBatch(tok, mask, ref, ent, y, ghat, lprop)
    dm = cpo_fast.TokenBatch(dtok, dmask, dref, dent, outcome_pred=dghat)
    out = cpo_fast.assemble_loss(method, batch, dm if method in ("dr_cpo", "oo_rlhf") else None,
                                 entropy_coef=0.05, kl_coef=0.2, regularize_on="dm", **kw)
    torch.testing.assert_close(out.loss, want, atol=0, rtol=0)
    if lo is None:
        assert out.ess is None and out.value is None
    else:
        torch.testing.assert_close(out.value, lo.value, atol=0, rtol=0)
        torch.testing.assert_close(out.ess, lo.ess, atol=0, rtol=0)


def test_assemble_loss_errors_name_the_fix():
    t = torch.zeros(2, 3)
    b = cpo_fast.TokenBatch(t, t > -1, t, outcome=torch.zeros(2))
    with pytest.raises(ValueError, match="not one of"):
        cpo_fast.assemble_loss("ppo", b)
    with pytest.raises(ValueError, match="needs the dm TokenBatch"):
        cpo_fast.assemble_loss("oo_rlhf", b)
    with pytest.raises(ValueError, match="takes no DM batch"):
        cpo_fast.assemble_loss("cpo", b, b)
    with pytest.raises(ValueError, match="ref_logp"):
        cpo_fast.assemble_loss("cpo", cpo_fast.TokenBatch(t, t > -1, outcome=torch.zeros(2)))
    with pytest.raises(ValueError, match="kl_coef > 0 needs"):
        cpo_fast.assemble_loss("sft_all", cpo_fast.TokenBatch(t, t > -1), kl_coef=0.1)
