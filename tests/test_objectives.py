"""Objectives: agreement with the row-by-row reference, closed-form gradients, properties,
and a Monte Carlo check that the IPW and DR estimates of V are unbiased."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpo_fast
from cpo_fast import reference
from cpo_fast.constants import IGNORE_INDEX, WEIGHTINGS

f64 = dict(dtype=torch.float64)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 12))
    m = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0.1, 1.0, 5.0]))
    g = torch.Generator().manual_seed(seed)
    r = lambda k, s=1.0: torch.randn(k, generator=g, **f64) * s
    return dict(s=r(n, spread), ref=r(n, spread), y=r(n) + 1, ghat=r(n) * 0.5 + 1,
                s_dm=r(m, spread), ref_dm=r(m, spread), ghat_dm=r(m) + 1)


LIB_KW = dict(max_log_weight=50.0, truncation=10.0, clip_eps=(0.2, 0.3))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("higher_is_better", [True, False])
@settings(max_examples=40)
@given(b=batches())
def test_losses_match_reference_values_and_grads(weighting, higher_is_better, b):
    """The fast objectives against the row-by-row reference of the same name and signature."""
    for kind in ("cpo", "dr", "oo"):
        s1 = b["s"].clone().requires_grad_(True)
        d1 = b["s_dm"].clone().requires_grad_(True)
        s2 = b["s"].clone().requires_grad_(True)
        d2 = b["s_dm"].clone().requires_grad_(True)
        dm = dict(dm_policy_logp=d1, dm_ref_logp=b["ref_dm"], dm_outcome_pred=b["ghat_dm"])
        dm2 = dict(dm, dm_policy_logp=d2)
        common = dict(weighting=weighting, higher_is_better=higher_is_better, **LIB_KW)
        if kind == "cpo":
            out = cpo_fast.cpo_loss(s1, b["ref"], b["y"], **common)
            ref = reference.cpo_loss(s2, b["ref"], b["y"], **common)
        elif kind == "dr":
            out = cpo_fast.dr_cpo_loss(s1, b["ref"], b["y"], b["ghat"], **dm, **common)
            ref = reference.dr_cpo_loss(s2, b["ref"], b["y"], b["ghat"], **dm2, **common)
        else:
            out = cpo_fast.oo_rlhf_loss(d1, b["ref_dm"], b["ghat_dm"], **common)
            ref = reference.oo_rlhf_loss(d2, b["ref_dm"], b["ghat_dm"], **common)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.value, ref.value, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.ess, ref.ess, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(out.max_weight_share, ref.max_weight_share, atol=1e-9,
                                   rtol=1e-9)
        grads = torch.autograd.grad(out.loss, [s1, d1], allow_unused=True, materialize_grads=True)
        rgrads = torch.autograd.grad(ref.loss, [s2, d2], allow_unused=True,
                                     materialize_grads=True)
        for g, rg in zip(grads, rgrads, strict=True):
            torch.testing.assert_close(g, rg, atol=1e-10, rtol=1e-10)


@settings(max_examples=30)
@given(b=batches())
def test_gradient_closed_forms(b):
    """docs/math.md: raw G_i = -(1/n) w_i a_i; self-normalized G_i = -sm_i (a_i - sum_k sm_k a_k)."""
    n = b["s"].shape[0]
    s = b["s"].clone().requires_grad_(True)
    out = cpo_fast.cpo_loss(s, b["ref"], b["y"], weighting="raw")
    (g,) = torch.autograd.grad(out.loss, s)
    torch.testing.assert_close(g, -torch.exp(s.detach() - b["ref"]) * b["y"] / n)
    s = b["s"].clone().requires_grad_(True)
    out = cpo_fast.cpo_loss(s, b["ref"], b["y"], weighting="self_normalized")
    (g,) = torch.autograd.grad(out.loss, s)
    sm = torch.softmax(s.detach() - b["ref"], 0)
    torch.testing.assert_close(g, -sm * (b["y"] - (sm * b["y"]).sum()))


@settings(max_examples=30)
@given(b=batches())
def test_properties(b):
    n = b["s"].shape[0]
    out = cpo_fast.cpo_loss(b["s"], b["ref"], b["y"])
    # Self-normalized weights sum to n; ESS in [1, n]; max share in (0, 1].
    torch.testing.assert_close(out.weights.sum(), torch.tensor(float(n), **f64))
    assert 1 - 1e-9 <= out.ess <= n + 1e-9
    assert 0 < out.max_weight_share <= 1 + 1e-12
    # DR-CPO with ghat = 0 (and ghat' = 0) is CPO, for every scheme.
    for w in WEIGHTINGS:
        cpo = cpo_fast.cpo_loss(b["s"], b["ref"], b["y"], weighting=w).loss
        zeros = torch.zeros_like(b["y"])
        dr = cpo_fast.dr_cpo_loss(b["s"], b["ref"], b["y"], zeros, weighting=w).loss
        dr2 = cpo_fast.dr_cpo_loss(b["s"], b["ref"], b["y"], zeros, dm_policy_logp=b["s_dm"],
                                   dm_ref_logp=b["ref_dm"], dm_outcome_pred=torch.zeros_like(b["s_dm"]),
                                   weighting=w).loss
        torch.testing.assert_close(dr, cpo)
        torch.testing.assert_close(dr2, cpo)
    # Permuting the batch changes nothing; a constant shift of ell leaves SNIPS unchanged.
    perm = torch.randperm(n)
    p = cpo_fast.cpo_loss(b["s"][perm], b["ref"][perm], b["y"][perm])
    torch.testing.assert_close(p.loss, out.loss)
    torch.testing.assert_close(cpo_fast.cpo_loss(b["s"] + 7.0, b["ref"], b["y"]).loss, out.loss)
    # Lower-is-better flips the sign of the loss.
    low = cpo_fast.cpo_loss(b["s"], b["ref"], b["y"], higher_is_better=False)
    torch.testing.assert_close(low.loss, -out.loss)


def test_clipping_and_truncation_diagnostics():
    s = torch.tensor([0.0, 1.0, -1.0, 0.1], **f64)
    ref = torch.zeros(4, **f64)
    y = torch.tensor([1.0, 1.0, -1.0, 1.0], **f64)
    out = cpo_fast.cpo_loss(s, ref, y, weighting="clipped", clip_eps=0.2)
    # row 1: W=e>1.2 and a>0 -> cut; row 2: W=1/e<0.8 and a<0 -> cut.
    assert out.clip_fraction.item() == pytest.approx(0.5)
    oo = cpo_fast.oo_rlhf_loss(s, ref, y, weighting="clipped", clip_eps=0.2)
    assert oo.clip_fraction.item() == pytest.approx(0.5)
    out = cpo_fast.cpo_loss(s, ref, y, weighting="truncated", truncation=2.0)
    assert out.clip_fraction.item() == pytest.approx(0.25)
    assert out.weights.max().item() == pytest.approx(2.0)


def test_overflowing_log_weights_are_clamped_and_reported():
    s = torch.tensor([500.0, 0.0], **f64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="clamped"):
        out = cpo_fast.cpo_loss(s, torch.zeros(2, **f64), torch.ones(2, **f64), weighting="raw",
                                max_log_weight=20.0)
    assert out.num_clamped == 1 and torch.isfinite(out.loss)
    out = cpo_fast.cpo_loss(s, torch.zeros(2, **f64), torch.ones(2, **f64))  # SNIPS: no clamp
    assert out.num_clamped == 0 and out.max_weight_share.item() == pytest.approx(1.0)


def test_errors_name_the_argument():
    s = torch.zeros(3)
    with pytest.raises(ValueError, match=r"outcome has a non-finite value \(nan\) at index \[1\]"):
        cpo_fast.cpo_loss(s, s, torch.tensor([0.0, math.nan, 1.0]))
    with pytest.raises(ValueError, match="outcome has a non-finite value"):
        cpo_fast.cpo_loss(s, s, torch.tensor([0.0, math.inf, 1.0]))
    with pytest.raises(ValueError, match=r"ref_logp has shape \(2,\)"):
        cpo_fast.cpo_loss(s, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        cpo_fast.cpo_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="not one of"):
        cpo_fast.cpo_loss(s, s, s, weighting="snips")
    with pytest.raises(ValueError, match="go together"):
        cpo_fast.dr_cpo_loss(s, s, s, s, dm_policy_logp=s)
    with pytest.raises(ValueError, match="empty"):
        cpo_fast.cpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0))


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


def test_monte_carlo_ipw_and_dr_are_unbiased():
    """A toy with K texts, known P^R, policy P^f and mean outcome g: over many datasets,
    the CPO (raw IPW) and DR-CPO estimates of V = sum_x P^f(x) g(x) average to V, the DR
    one with a deliberately wrong ghat too. With a good ghat and a direct-method set four
    times the labeled one (unlabeled texts are cheap), DR has the lower variance. The
    self-normalized estimate is consistent, not unbiased: only a small bias is allowed."""
    g = torch.Generator().manual_seed(1234)
    K, n, reps = 6, 200, 3000
    pR = torch.softmax(torch.randn(K, generator=g, **f64), 0)
    pf = torch.softmax(torch.randn(K, generator=g, **f64), 0)
    mu = torch.randn(K, generator=g, **f64) * 2 + 1
    V_true = (pf * mu).sum()
    ghat_good = mu + 0.1 * torch.randn(K, generator=g, **f64)
    ghat_bad = mu + 1.5  # biased outcome model
    x = torch.multinomial(pR.expand(reps, K), n, replacement=True, generator=g)
    y = mu[x] + torch.randn(reps, n, generator=g, **f64)
    x_dm = torch.multinomial(pR.expand(reps, K), 4 * n, replacement=True, generator=g)
    ests = {"ipw": [], "dr_good": [], "dr_bad": [], "snips": []}
    for r in range(reps):
        s, ref = pf.log()[x[r]], pR.log()[x[r]]
        s_dm, ref_dm = pf.log()[x_dm[r]], pR.log()[x_dm[r]]
        ests["ipw"].append(cpo_fast.cpo_loss(s, ref, y[r], weighting="raw").value)
        ests["snips"].append(cpo_fast.cpo_loss(s, ref, y[r]).value)
        for name, gh in (("dr_good", ghat_good), ("dr_bad", ghat_bad)):
            ests[name].append(cpo_fast.dr_cpo_loss(
                s, ref, y[r], gh[x[r]], dm_policy_logp=s_dm, dm_ref_logp=ref_dm,
                dm_outcome_pred=gh[x_dm[r]], weighting="raw").value)
    for name, vals in ests.items():
        v = torch.stack(vals)
        se = v.std() / math.sqrt(reps)
        bias = (v.mean() - V_true).abs()
        assert bias < 4 * se + (0.02 if name == "snips" else 0.0), (name, bias.item(), se.item())
    var = {k: torch.stack(v).var().item() for k, v in ests.items()}
    assert var["dr_good"] < var["ipw"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, s: torch.Tensor, ref: torch.Tensor,
                 y: torch.Tensor, q) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        part = slice(rank * 3, rank * 3 + 3)
        sl = s[part].clone().requires_grad_(True)
        out = cpo_fast.cpo_loss(sl, ref[part], y[part])
        out.loss.backward()
        # Plain lists: tensors would travel as shared-memory handles that die with this process.
        q.put((rank, out.loss.item(), sl.grad.tolist(), out.weights.tolist()))
    finally:
        dist.destroy_process_group()


def test_self_normalization_is_global_across_ranks():
    """Two gloo ranks with 3 rows each: weights and the DDP-averaged gradient equal the
    single-process result on all 6 rows (a per-rank softmax would differ)."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    s, ref, y = (torch.randn(6, generator=g, **f64) for _ in range(3))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, s, ref, y, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    full = s.clone().requires_grad_(True)
    out = cpo_fast.cpo_loss(full, ref, y)
    out.loss.backward()
    weights = torch.tensor([w for r in results for w in r[3]], **f64)
    torch.testing.assert_close(weights, out.weights)
    # DDP averages per-rank gradients: (1/world) * (rank's grad) == the full-batch gradient.
    grads = torch.tensor([v for r in results for v in r[2]], **f64) / 2
    torch.testing.assert_close(grads, full.grad)
    torch.testing.assert_close(torch.tensor(sum(r[1] for r in results) / 2, **f64), out.loss)


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


def test_reference_has_the_public_signatures():
    """reference.<name> takes the fast path's parameters with the same defaults (the fast
    ops add only backend/dispatch knobs)."""
    import inspect

    extra = {"backend", "inplace_backward", "validate", "grad_skip_threshold"}
    for name in ("token_logprobs", "linear_token_logprobs", "dr_cpo_loss", "cpo_loss",
                 "oo_rlhf_loss", "sequence_logprobs", "sft_loss", "entropy_bonus", "kl_penalty"):
        fast = inspect.signature(getattr(cpo_fast, name)).parameters
        ref = inspect.signature(getattr(reference, name)).parameters
        assert set(fast) - extra == set(ref), name
        for p in ref:
            assert ref[p].default == fast[p].default and ref[p].kind == fast[p].kind, (name, p)
