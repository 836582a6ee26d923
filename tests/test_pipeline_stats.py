"""Pipeline statistics: cross-fitted outcome models, bootstrap intervals, off-policy
estimates of V on toys with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from cpo_fast.pipeline.report.estimate import bootstrap_ci, off_policy_estimates
from cpo_fast.pipeline.stages.outcome import features_from_callable, fit_outcome_model


def _linear(n=600, d=20, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d)  # unequal scales
    beta = rng.normal(size=d) / np.std(x, 0)
    y = 2.0 + x @ beta + noise * rng.normal(size=n)
    return x, y


def test_ridge_recovers_linear_signal_cross_fitted():
    x, y = _linear()
    fit = fit_outcome_model(x, y, kind="ridge", folds=5, seed=0)
    assert fit.r2 > 0.95 and fit.rmse < 0.4 and fit.folds == 5 and fit.kind == "ridge"
    # every row predicted by the one fold model that did not see it
    for k, m in enumerate(fit.fold_models):
        rows = fit.fold_of_row == k
        np.testing.assert_allclose(fit.oof_pred[rows], m.predict(x[rows]))
    # out-of-fold predictions differ from in-sample ones (a fit on all rows)
    insample = fit_outcome_model(x, y, folds=5, seed=0).predict(x)
    assert not np.allclose(fit.oof_pred, insample)
    # the predictor for new rows is the average of the fold models
    xn = _linear(seed=1)[0][:10]
    np.testing.assert_allclose(fit.predict(xn),
                               np.mean([m.predict(xn) for m in fit.fold_models], 0))


@pytest.mark.parametrize("shape", [(60, 8), (30, 50)])  # tall (Gram eigh) and wide (SVD)
def test_ridge_matches_normal_equations(shape):
    from cpo_fast.pipeline.stages.outcome import _fit_ridge

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=shape) * 3 + 1, rng.normal(size=shape[0])
    m = _fit_ridge(x, y, alpha=2.0)
    z = (x - x.mean(0)) / x.std(0)
    coef = np.linalg.solve(z.T @ z + 2.0 * np.eye(shape[1]), z.T @ (y - y.mean()))
    np.testing.assert_allclose(m.coef, coef, atol=1e-8)
    np.testing.assert_allclose(m.predict(x), z @ coef + y.mean(), atol=1e-8)


def test_ridge_pure_noise_has_no_skill_out_of_fold():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 50)), rng.normal(size=200)
    fit = fit_outcome_model(x, y, folds=5)
    assert fit.r2 < 0.05  # in-sample least squares would show R^2 ~ 0.25 here
    fixed = fit_outcome_model(x, y, folds=5, alpha=1e-8)
    assert fixed.r2 < fit.r2  # the inner LOO choice of alpha beats no shrinkage


def test_mlp_fits_nonlinear_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    y = np.sin(2 * x[:, 0]) + x[:, 1] ** 2 + 0.1 * rng.normal(size=400)
    mlp = fit_outcome_model(x, y, kind="mlp", folds=3, seed=0)
    ridge = fit_outcome_model(x, y, kind="ridge", folds=3, seed=0)
    assert mlp.r2 > 0.6 and mlp.r2 > ridge.r2 + 0.3
    assert mlp.predict(x[:5]).shape == (5,)


def test_fit_errors():
    x, y = _linear(n=20)
    with pytest.raises(ValueError, match="kind"):
        fit_outcome_model(x, y, kind="svm")
    with pytest.raises(ValueError, match="folds"):
        fit_outcome_model(x, y, folds=1)
    with pytest.raises(ValueError, match="2 rows per fold"):
        fit_outcome_model(x[:5], y[:5], folds=5)
    y2 = y.copy()
    y2[3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fit_outcome_model(x, y2)


def test_features_from_callable():
    import torch

    texts = [f"text {i}" for i in range(10)]
    f = features_from_callable(lambda ts: torch.tensor([[len(s), 1.0] for s in ts]), texts,
                               batch_size=3)
    assert f.shape == (10, 2) and f.dtype == np.float32 and f[0, 0] == 6
    with pytest.raises(ValueError, match=r"\[len\(texts\), d\]"):
        features_from_callable(lambda ts: np.zeros(len(ts)), texts)


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
