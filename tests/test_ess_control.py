"""cpo_fast.ess_control: ESS-targeted tempering of log weights and the adaptive KL coefficient,
against float64 references on hypothesis-drawn log weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cpo_fast.ess_control import AdaptiveKL, ess_share, ess_temperature, temper_log_weights

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


def test_healthy_batch_is_untouched():
    pol = torch.tensor([0.1, -0.2, 0.05, 0.0])
    out, tau = temper_log_weights(pol, torch.zeros(4), 0.5)
    assert tau == 1.0 and out is pol


def test_collapsed_batch_is_tempered():
    lw = torch.tensor([40.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # one row holds everything
    assert ess_share(lw) == pytest.approx(1 / 8)
    tau = ess_temperature(lw, 0.5)
    assert 0.0 < tau < 0.1 and ess_share(tau * lw) >= 0.5


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="target"):
        ess_temperature(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        ess_share(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="empty"):
        ess_share(torch.zeros(0))
    with pytest.raises(ValueError, match="min_coef"):
        AdaptiveKL(coef=0.0)
    with pytest.raises(ValueError, match="ess_share"):
        AdaptiveKL().update(1.5)


def test_adaptive_kl_moves_toward_the_target():
    c = AdaptiveKL(coef=0.1, target=0.3, rate=0.5)
    assert c.update(0.05) == pytest.approx(0.1 * 1.1)  # error clipped at +0.2
    assert c.update(0.3) == pytest.approx(0.11)  # on target: unchanged
    assert c.update(0.6) == pytest.approx(0.11 * 0.9)  # above: relaxed (clipped at -0.2)
    c = AdaptiveKL(coef=9.0, max_coef=10.0)
    for _ in range(20):
        c.update(0.0)
    assert c.coef == 10.0
