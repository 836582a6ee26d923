"""The outcome model ghat (cpo_fast/pipeline/stages/outcome.py): cross-fitted ridge and MLP
fits on toys with a known answer, its errors, its bound to the training outcomes' range,
and its features (from a callable, mean-pooled hidden states, bag of words)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_MODEL

from cpo_fast.pipeline.stages.modeling import build_model
from cpo_fast.pipeline.stages.outcome import (
    bag_of_words_features,
    features_from_callable,
    fit_outcome_model,
    mean_pooled_features,
)


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


def _linear_data(n=200, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.clip(x @ np.arange(1, d + 1) * 0.3 + 2.5 + 0.3 * rng.standard_normal(n), 0.0, 5.0)
    return x, y


def test_ghat_predictions_stay_in_the_training_outcome_range():
    x, y = _linear_data()
    fit = fit_outcome_model(x, y, alpha=1.0, bound=True)
    far = np.full((3, x.shape[1]), 40.0)  # far outside the features seen in training
    raw = fit.predict(far, clip=False)
    assert raw.max() > y.max() + 10  # ridge extrapolates linearly ...
    bounded = fit.predict(far)
    assert np.all(bounded <= y.max()) and np.all(bounded >= y.min())  # ... ghat does not
    assert fit.y_range == (y.min(), y.max())
    assert fit.summary()["bound"] == [y.min(), y.max()]
    unbounded = fit_outcome_model(x, y, alpha=1.0, support=False)  # the library default
    assert unbounded.predict(far).max() > y.max() + 10 and unbounded.support is None


def test_mean_pooled_features_ignore_padding(encoded_corpus):
    t, tok, enc = encoded_corpus
    m = build_model("gpt2", len(tok), seed=0, **TINY_MODEL)
    f_small = mean_pooled_features(m, enc, batch_size=1)
    f_big = mean_pooled_features(m, enc, batch_size=16)
    assert f_small.shape == (len(enc), 32)
    np.testing.assert_allclose(f_small, f_big, atol=1e-4)
    assert m.training  # mode restored
    f_all = mean_pooled_features(m, enc, batch_size=16, layers="all")
    assert f_all.shape == (len(enc), 32 * 2)  # embeddings + 1 layer
    np.testing.assert_allclose(f_all[:, 32:], f_big, atol=1e-5)  # last = ln_f output
    f_emb = mean_pooled_features(m, enc, batch_size=16, layers=[0])
    np.testing.assert_allclose(f_emb, f_all[:, :32], atol=1e-6)
    bow = bag_of_words_features(enc, len(tok))
    assert bow.shape == (len(enc), len(tok))
    assert bow.sum(1).tolist() == [len(r) for r in enc.input_ids]
