"""The estimators (cpo_fast/estimators.py: ``cpo_loss``, ``dr_cpo_loss``, ``oo_rlhf_loss``,
``cap_log_weights``): agreement with the row-by-row reference, closed-form gradients,
properties, clipping, truncation and clamping diagnostics, errors that name the argument
and the indices, diagnostics without overflow in float32, a Monte Carlo check that the IPW
and DR estimates of V are unbiased, the self-normalization across ranks,
hypothesis-drawn adversarial inputs (the property in tests/fuzz_cases.py), and ESS-targeted
tempering (``ess_share``, ``ess_temperature``, ``temper_log_weights``) against float64."""

from __future__ import annotations

import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
from fuzz_cases import FUZZ_DTYPES, FUZZ_SETTINGS, check_objective_case, objective_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import cpo_fast
from cpo_fast import reference
from cpo_fast.constants import WEIGHTINGS
from cpo_fast.estimators import ess_share, ess_temperature, temper_log_weights

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


# ---- non-finite and invalid inputs ---------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("weighting", cpo_fast.WEIGHTINGS)
def test_nonfinite_policy_logp_raises_with_indices(bad, weighting):
    s = torch.tensor([-1.0, -2.0, bad, -0.5])
    ref, y = torch.full((4,), -1.5), torch.ones(4)
    with pytest.raises(ValueError, match=r"policy_logp has non-finite values .* indices \[2\]"):
        cpo_fast.cpo_loss(s, ref, y, weighting=weighting)
    with pytest.raises(ValueError, match=r"policy_logp .* indices \[2\]"):
        cpo_fast.dr_cpo_loss(s, ref, y, torch.zeros(4), weighting=weighting)
    with pytest.raises(ValueError, match=r"dm_policy_logp has non-finite values .* \[2\]"):
        cpo_fast.oo_rlhf_loss(s, ref, y, weighting=weighting)
    ok = torch.tensor([-1.0, -2.0, -3.0, -0.5])
    with pytest.raises(ValueError, match=r"^dm_policy_logp .* \[2\]"):
        cpo_fast.dr_cpo_loss(ok, ref, y, torch.zeros(4), dm_policy_logp=s, dm_ref_logp=ref,
                             dm_outcome_pred=y, weighting=weighting)


def test_nonfinite_dm_ref_logp_raises():
    s = torch.zeros(3)
    with pytest.raises(ValueError, match=r"dm_ref_logp has a non-finite value"):
        cpo_fast.oo_rlhf_loss(s, torch.tensor([0.0, math.nan, 0.0]), s)


def test_api_refuses_a_negative_clip_eps():
    import cpo_fast

    s = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="clip_eps"):
        cpo_fast.dr_cpo_loss(s, torch.zeros(4), torch.ones(4), weighting="clipped", clip_eps=-1)


# ---- diagnostics without overflow -----------------------------------------------------------

@pytest.mark.parametrize("weighting", ["raw", "clipped", "truncated"])
@pytest.mark.parametrize("top", [45.0, 50.0, 300.0])
def test_ess_float32_equals_float64_for_large_log_weights(weighting, top):
    ell = torch.tensor([top, top - 1.0, 0.0, -3.0, top - 0.5], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    kw = dict(weighting=weighting, truncation=1e30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the clamp at 300 is reported
        o64 = cpo_fast.cpo_loss(ell, torch.zeros(5, dtype=torch.float64), y, **kw)
        o32 = cpo_fast.cpo_loss(ell.float(), torch.zeros(5), y.float(), **kw)
    for name in ("ess", "max_weight_share"):
        a, b = getattr(o32, name), getattr(o64, name)
        assert torch.isfinite(a), (name, a)
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    # the float64 textbook formula agrees (the weights are clamped at 50 first)
    W = reference.weights(ell, weighting, truncation=1e30)
    torch.testing.assert_close(o64.ess, reference.ess(W))


def test_dm_diagnostics_overflow_free_in_float32():
    ell = torch.tensor([49.0, 48.0, 1.0])
    out = cpo_fast.oo_rlhf_loss(ell, torch.zeros(3), torch.ones(3), weighting="raw")
    w = torch.exp(torch.tensor([49.0, 48.0, 1.0], dtype=torch.float64) - 49.0)
    tol = dict(rtol=1e-5, atol=0.0)
    torch.testing.assert_close(out.ess.double(), w.sum() ** 2 / (w * w).sum(), **tol)
    torch.testing.assert_close(out.max_weight_share.double(), 1 / w.sum(), **tol)


# ---- self-normalized batch of one ---------------------------------------------------------

def test_self_normalized_single_row_warns():
    s = torch.tensor([-3.0], requires_grad=True)
    with pytest.warns(RuntimeWarning, match="batch of one row.*gradient is exactly zero"):
        out = cpo_fast.cpo_loss(s, torch.tensor([-1.0]), torch.tensor([2.0]))
    (g,) = torch.autograd.grad(out.loss, s)
    assert g.item() == 0.0  # the warning is true
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two rows, or another scheme: no warning
        cpo_fast.cpo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2))
        cpo_fast.cpo_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), weighting="raw")


# ---- the log-weight cap --------------------------------------------------------------------

def test_log_weight_cap_bounds_the_ess_and_cuts_gradients():
    import torch

    from cpo_fast.bench.sweep import min_ess_share
    from cpo_fast.estimators import cap_log_weights

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(64, generator=gen) * 3 - 40
    pol = (ref + torch.randn(64, generator=gen) * 6).requires_grad_(True)
    w = torch.softmax(pol.detach() - ref, 0)
    assert float(1 / (w**2).sum()) / 64 < 0.1  # uncapped: collapsed
    capped = cap_log_weights(pol, ref, 1.4)
    wc = torch.softmax(capped.detach() - ref, 0)
    assert float(1 / (wc**2).sum()) / 64 >= min_ess_share(1.4) - 1e-6
    assert min_ess_share(1.4) == pytest.approx(0.2162, abs=1e-3)
    capped.sum().backward()
    ell = pol.detach() - ref
    inside = (ell - ell.median()).abs() < 1.4
    assert torch.equal(pol.grad, inside.float())  # rows at the cap get no gradient
    assert cap_log_weights(pol, ref, 0.0) is pol


# ---- unbiasedness, ranks -------------------------------------------------------------------

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


# ---- hypothesis-drawn adversarial inputs (CI size; the long run is tests/test_fuzz.py) -------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@settings(max_examples=60, **FUZZ_SETTINGS)
@given(data=st.data())
def test_objectives_adversarial(dtype, data):
    check_objective_case(data.draw(objective_cases(FUZZ_DTYPES[dtype])))


# ---- ESS-targeted tempering (the training default's log-weight control) against float64 -------

log_ws = arrays(np.float64, st.integers(2, 48), elements=st.floats(-60, 60, allow_nan=False))
targets = st.floats(0.05, 0.95)


def ess_ref(lw: np.ndarray) -> float:
    """ESS / n in float64 from its definition (shifted: exp of the max is 1)."""
    w = np.exp(lw - lw.max())
    return float(w.sum() ** 2 / (w ** 2).sum() / lw.size)


@given(log_ws)
def test_ess_share_matches_reference(lw):
    assert ess_share(torch.from_numpy(lw)) == pytest.approx(ess_ref(lw), rel=1e-12, abs=1e-15)
    assert ess_share(torch.from_numpy(lw + 123.0)) == pytest.approx(ess_ref(lw), rel=1e-9)


@given(log_ws, targets)
def test_temperature_meets_target_and_is_largest(lw, target):
    tau = ess_temperature(torch.from_numpy(lw), target, tol=1e-6)
    assert 0.0 <= tau <= 1.0
    assert ess_ref(tau * lw) >= target - 1e-12  # the batch meets the target
    if tau < 1.0:  # and no larger tau (beyond the tolerance) would
        assert ess_ref(min(1.0, tau + 2e-6) * lw) < target
    else:
        assert ess_ref(lw) >= target


@given(log_ws, st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_ess_is_non_increasing_in_tau(lw, a, b):
    lo, hi = sorted((a, b))
    assert ess_ref(hi * lw) <= ess_ref(lo * lw) + 1e-12


@given(log_ws, targets)
def test_tempered_values_and_gradient(lw, target):
    ref = torch.from_numpy(np.linspace(-3.0, 2.0, lw.size))
    pol = (ref + torch.from_numpy(lw)).requires_grad_(True)
    out, tau = temper_log_weights(pol, ref, target, tol=1e-6)
    want = ref.numpy() + tau * lw
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=0, atol=1e-9)
    g = torch.from_numpy(np.random.default_rng(0).normal(size=lw.size))
    (out * g).sum().backward()
    np.testing.assert_allclose(pol.grad.numpy(), tau * g.numpy(), rtol=1e-12, atol=1e-15)
    assert ess_share(out - ref) >= target - 1e-9


def test_healthy_batch_is_not_tempered():
    pol = torch.tensor([0.1, -0.2, 0.05, 0.0])
    out, tau = temper_log_weights(pol, torch.zeros(4), 0.5)
    assert tau == 1.0 and out is pol


def test_collapsed_batch_is_tempered_to_the_target():
    lw = torch.tensor([40.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # one row holds everything
    assert ess_share(lw) == pytest.approx(1 / 8)
    tau = ess_temperature(lw, 0.5)
    assert 0.0 < tau < 0.1 and ess_share(tau * lw) >= 0.5


def test_tempering_errors_name_the_argument():
    with pytest.raises(ValueError, match="target"):
        ess_temperature(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        ess_share(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="non-empty"):
        ess_share(torch.zeros(0))
