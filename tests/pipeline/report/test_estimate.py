"""Evaluation statistics (cpo_fast/pipeline/report/estimate.py): bootstrap intervals, and
off-policy estimates of V on toys with a known answer, marked unreliable when the weights
collapse."""

from __future__ import annotations

import numpy as np
import pytest

from cpo_fast.pipeline.report.estimate import bootstrap_ci, off_policy_estimates


def test_bootstrap_ci_covers_truth():
    rng = np.random.default_rng(0)
    hits = 0
    for s in range(40):
        v = rng.exponential(2.0, size=200)  # skewed, mean 2
        m, lo, hi = bootstrap_ci(v, n_boot=400, seed=s)
        assert lo < m < hi and m == pytest.approx(v.mean())
        hits += lo <= 2.0 <= hi
    assert hits >= 33  # nominal 95%: 38 of 40 expected
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))


def _toy(n, seed):
    """P^R uniform over 5 texts, a known policy P^f, g known: V = sum_x P^f(x) g(x)."""
    rng = np.random.default_rng(seed)
    g = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    pr = np.full(5, 0.2)
    pf = np.array([0.05, 0.1, 0.15, 0.3, 0.4])
    x = rng.integers(0, 5, n)
    y = g[x] + rng.normal(size=n)
    return x, y, g, np.log(pf[x]) - np.log(pr[x]), float(pf @ g), pf


def test_off_policy_estimates_close_to_truth():
    x, y, g, lw, truth, pf = _toy(4000, 0)
    ghat_bad = g[x] * 0.7 + 0.5  # a wrong outcome model: DR must still be right
    res = off_policy_estimates(lw, y, ghat_bad, float(pf @ (g * 0.7 + 0.5)), n_boot=500,
                               alpha=0.01)
    assert res["naive"]["estimate"] == pytest.approx(3.0, abs=0.1)  # not the policy's V
    for k in ("ipw", "snips", "dr", "dr_snips"):
        e = res[k]
        assert e["lo"] <= truth <= e["hi"], (k, e, truth)
        assert abs(e["estimate"] - truth) < 0.1
    assert abs(res["dm"]["estimate"] - truth) > 0.3  # the outcome model alone is biased
    assert 0 < res["ess"] <= 4000 and 0 < res["max_weight_share"] < 0.01
    # with the right ghat, DR has a tighter interval than IPW
    res2 = off_policy_estimates(lw, y, g[x], float(pf @ g), n_boot=500)
    assert res2["dr"]["hi"] - res2["dr"]["lo"] < res2["ipw"]["hi"] - res2["ipw"]["lo"]
    # dm term as per-sample values on policy draws: resampled, so it gets an interval
    rng = np.random.default_rng(1)
    draws = g[rng.choice(5, size=3000, p=pf)]
    res3 = off_policy_estimates(lw, y, g[x], draws, n_boot=500)
    assert res3["dm"]["lo"] < res3["dm"]["estimate"] < res3["dm"]["hi"]
    assert "dr" not in off_policy_estimates(lw, y, g[x], n_boot=10)


def test_off_policy_unbiased_monte_carlo():
    """IPW and DR are unbiased on the toy: the mean over replications hits V."""
    ests = {"ipw": [], "dr": []}
    for s in range(200):
        x, y, g, lw, truth, pf = _toy(200, s)
        r = off_policy_estimates(lw, y, g[x] * 0.5, float(pf @ (g * 0.5)), n_boot=1)
        for k in ests:
            ests[k].append(r[k]["estimate"])
    for k, v in ests.items():
        assert abs(np.mean(v) - truth) < 3 * np.std(v) / np.sqrt(len(v)) + 1e-3, k


def test_off_policy_overflow_and_errors():
    lw = np.array([0.0, 800.0, 1.0])
    y = np.array([1.0, 2.0, 3.0])
    with pytest.warns(UserWarning, match="overflow"):
        r = off_policy_estimates(lw, y, n_boot=20)
    assert r["snips"]["estimate"] == pytest.approx(2.0) and np.isinf(r["ipw"]["estimate"])
    with pytest.raises(ValueError, match="equally long"):
        off_policy_estimates(lw, y[:2])


def test_off_policy_estimates_marked_unreliable_when_weights_collapse():
    from cpo_fast.pipeline.report.estimate import describe, off_policy_estimates

    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, 60)
    lw = np.zeros(60)
    lw[:3] = 12.0  # three rows carry all the weight: ESS about 3 of 60
    op = off_policy_estimates(lw, y, np.full(60, 0.5), np.full(8, 0.5), n_boot=50)
    assert op["reliable"] is False and op["ipw"]["reliable"] is False
    line = describe(op)
    assert line["ipw"].startswith("unreliable (ESS 3.0 of 60)") and line["naive"] == round(
        float(y.mean()), 4)
    ok = off_policy_estimates(np.zeros(60), y, n_boot=50)
    assert ok["reliable"] is True and isinstance(describe(ok)["ipw"], float)
