"""Where ghat can be trusted (cpo_fast/pipeline/stages/support.py): the support test on its
inputs."""

from __future__ import annotations

import numpy as np
import pytest

from cpo_fast.pipeline.stages.support import fit_support


def test_support_test_is_calibrated_and_flags_shifted_inputs():
    rng = np.random.default_rng(1)
    cov = np.diag(np.linspace(0.2, 3.0, 8))
    x = rng.multivariate_normal(np.zeros(8), cov, size=600)
    sup = fit_support(x, quantile=0.95)
    fresh = rng.multivariate_normal(np.zeros(8), cov, size=2000)
    share = sup.outside(fresh).mean()
    assert 0.02 < share < 0.10  # about 1 - quantile of new in-distribution inputs
    shifted = fresh + 4.0 * np.sqrt(np.diag(cov))
    assert sup.outside(shifted).mean() > 0.95
    with pytest.raises(ValueError, match="quantile"):
        fit_support(x, quantile=1.0)


def test_support_flags_a_never_seen_token():
    """A bag-of-tokens feature that is constant in training (a token no training text has)
    must still count: a text using it is flagged."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.poisson(1.0, (300, 6)), np.zeros((300, 2))], axis=1).astype(float)
    sup = fit_support(x)
    new = rng.poisson(1.0, (50, 8)).astype(float)
    new[:, 6:] = 0
    odd = new.copy()
    odd[:, 7] = 6.0
    assert sup.outside(odd).mean() > sup.outside(new).mean() + 0.5
