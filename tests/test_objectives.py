"""The objectives on per-token inputs (cpo_fast/objectives.py): the regularizers and SFT
against the reference, ``DRCPOLoss`` against the functional route (and its gradient w.r.t.
the logits against the float64 reference chain), and ``assemble_loss`` against the loss glue
the pipeline wrote before it existed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

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


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12), st.floats(0.05, 0.95), st.floats(0.1, 20.0),
       st.sampled_from(["cpo", "dr_cpo", "oo_rlhf"]), st.integers(0, 2**31 - 1))
@example(6, 9, 0.9, 5.0, "oo_rlhf", 1)  # every method, with tau < 1, on every run
@example(6, 9, 0.9, 5.0, "dr_cpo", 2)
@example(6, 9, 0.9, 5.0, "cpo", 3)
def test_ess_target_tempers_each_weight_set_against_the_reference(n, m, target, spread,
                                                                  method, seed):
    """``ess_target``: each weighted set's log weights are scaled by its own tau, the largest
    in [0, 1] meeting the target (the float64 reference's ESS says so), and the loss and its
    gradient are the reference estimator's at the tempered log weights."""
    from cpo_fast.estimators import ess_temperature

    g = torch.Generator().manual_seed(seed)
    ref, ref_dm = -5 - torch.rand(n, generator=g, **f64), -5 - torch.rand(m, generator=g, **f64)
    pol = (ref + spread * torch.randn(n, generator=g, **f64)).requires_grad_(True)
    pol_dm = (ref_dm + spread * torch.randn(m, generator=g, **f64)).requires_grad_(True)
    y, ghat, ghat_dm = (torch.randn(k, generator=g, **f64) for k in (n, n, m))
    rows = {"dm_policy_logp": pol_dm, "dm_ref_logp": ref_dm, "dm_outcome_pred": ghat_dm}
    if method != "oo_rlhf":
        rows.update(policy_logp=pol, ref_logp=ref, outcome=y,
                    outcome_pred=ghat if method == "dr_cpo" else None)
    if method == "cpo":
        rows = {k: v for k, v in rows.items() if not k.startswith("dm_")}
    out = cpo_fast.Objective(method, ess_target=target).rows_loss(rows)
    taus = {"": out.dm_ess_tau if method == "oo_rlhf" else out.ess_tau, "dm_": out.dm_ess_tau}
    tempered = {}
    for pre, (p, r) in {"": (pol, ref), "dm_": (pol_dm, ref_dm)}.items():
        if rows.get(f"{pre}policy_logp") is None:
            continue
        tau = taus[pre]
        assert tau == ess_temperature(p - r, target)  # the largest tau meeting the target
        tempered[f"{pre}policy_logp"] = r + tau * (p - r).detach()
        w = torch.exp(tau * (p - r).detach())
        assert float(w.sum() ** 2 / (w * w).sum()) >= target * p.numel() * (1 - 1e-9)
    if method == "oo_rlhf":
        assert out.ess_tau == out.dm_ess_tau
    want = reference.dr_cpo_loss(tempered.get("policy_logp"), rows.get("ref_logp"),
                                 rows.get("outcome"), rows.get("outcome_pred"),
                                 dm_policy_logp=tempered.get("dm_policy_logp"),
                                 dm_ref_logp=rows.get("dm_ref_logp"),
                                 dm_outcome_pred=rows.get("dm_outcome_pred"))
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-9, atol=1e-12)
    leaves = [t for t in (pol, pol_dm) if any(t is v for v in rows.values())]
    got = torch.autograd.grad(out.loss, leaves)
    for leaf, gr in zip(leaves, got, strict=True):  # d/ds of the tempered loss: tau * reference
        pre = "dm_" if leaf is pol_dm else ""
        x = tempered[f"{pre}policy_logp"].clone().requires_grad_(True)
        kw = {f"{pre}policy_logp": x}
        other = "policy_logp" if pre else "dm_policy_logp"
        if other in tempered:
            kw[other] = tempered[other]
        ref_out = reference.dr_cpo_loss(kw.get("policy_logp"), rows.get("ref_logp"),
                                        rows.get("outcome"), rows.get("outcome_pred"),
                                        dm_policy_logp=kw.get("dm_policy_logp"),
                                        dm_ref_logp=rows.get("dm_ref_logp"),
                                        dm_outcome_pred=rows.get("dm_outcome_pred"))
        (g_ref,) = torch.autograd.grad(ref_out.loss, x)
        torch.testing.assert_close(gr, taus[pre] * g_ref, rtol=1e-8, atol=1e-12)


def test_ess_target_off_is_the_plain_estimator_and_bad_targets_are_named():
    g = torch.Generator().manual_seed(3)
    ref = -torch.rand(6, generator=g, **f64)
    rows = {"policy_logp": ref + 5 * torch.randn(6, generator=g, **f64), "ref_logp": ref,
            "outcome": torch.randn(6, generator=g, **f64)}
    plain = cpo_fast.Objective("cpo").rows_loss(rows)
    assert plain.ess_tau is None and plain.dm_ess_tau is None
    torch.testing.assert_close(plain.loss, reference.dr_cpo_loss(
        rows["policy_logp"], ref, rows["outcome"]).loss)
    easy = cpo_fast.Objective("cpo", ess_target=1e-6).rows_loss(rows)  # already met
    assert easy.ess_tau == 1.0 and float(easy.loss) == pytest.approx(float(plain.loss))
    hard = cpo_fast.Objective("cpo", ess_target=0.9).rows_loss(rows)
    assert hard.ess_tau < 1.0 and float(hard.ess) >= 0.9 * 6 - 1e-6 > float(plain.ess)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ess_target"):
            cpo_fast.Objective("cpo", ess_target=bad)
