"""Issue 12's API items: each test failed before its fix.

1. non-finite policy_logp / dm_policy_logp raise, naming the argument and the indices;
2. ESS and max weight share are overflow-free in float32 (log weights >= 45);
3. self_normalized on a batch of one row warns that its gradient is exactly zero;
8. token_logprobs' output dtype is as documented, and NaN logits warn naming the rows.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import kernel_backends

import cpo_fast
from cpo_fast import reference
from cpo_fast.constants import IGNORE_INDEX

# ---- 1: non-finite policy log-probs --------------------------------------------------------

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


# ---- 2: diagnostics without overflow ---------------------------------------------------------

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


# ---- 3: self-normalized batch of one ---------------------------------------------------------

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


# ---- 8: output dtype, NaN logits -------------------------------------------------------------

BACKENDS = ["reference", *kernel_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_is_float32_except_float64(backend):
    labels = torch.tensor([[1, 2, IGNORE_INDEX]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lp = cpo_fast.token_logprobs(torch.randn(1, 3, 5).to(dtype), labels, backend=backend)
        assert lp.dtype == torch.float32
    lp64 = cpo_fast.token_logprobs(torch.randn(1, 3, 5, dtype=torch.float64), labels,
                                   backend=backend)
    assert lp64.dtype == torch.float64  # float64 runs on the reference (gradcheck)
    assert "float64 for float64 logits" in " ".join(cpo_fast.token_logprobs.__doc__.split())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_warn_naming_the_rows(backend):
    x = torch.randn(2, 3, 11)
    x[1, 2, 4] = math.nan
    x[0, 1, 7] = math.inf
    labels = torch.randint(0, 11, (2, 3))
    labels[0, 0] = IGNORE_INDEX
    with pytest.warns(RuntimeWarning, match=r"rows .*\[\(0, 1\), \(1, 2\)\]"):
        lp, ent = cpo_fast.token_logprobs(x, labels, with_entropy=True, backend=backend)
    assert torch.isfinite(lp[0, 2]) and torch.isfinite(ent[1, 0])
    with warnings.catch_warnings():
        # (only ours: the Triton interpreter's numpy warns about inf - inf on its own)
        warnings.filterwarnings("error", message="cpo_fast")
        cpo_fast.token_logprobs(x, labels, backend=backend, validate=False)  # opt-out
        x[1, 2, 4] = x[0, 1, 7] = 0.0
        cpo_fast.token_logprobs(x, labels, backend=backend)  # finite: silent


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_warns_on_the_linear_op(backend):
    h = torch.randn(4, 8)
    h[3, 0] = math.nan
    w = torch.randn(13, 8)
    labels = torch.tensor([1, IGNORE_INDEX, 5, 2])
    with pytest.warns(RuntimeWarning, match=r"linear_token_logprobs.*rows .*\[3\]"):
        cpo_fast.linear_token_logprobs(h, w, labels, backend=backend)
