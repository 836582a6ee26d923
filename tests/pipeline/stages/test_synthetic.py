"""The semi-synthetic corpus and its oracle g* (cpo_fast/pipeline/stages/synthetic.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cpo_fast.pipeline.stages.data import DataConfig, load_table
from cpo_fast.pipeline.stages.synthetic import make_corpus, oracle, write_corpus


def test_oracle_deterministic_and_lexicon():
    texts = ["the soup was great .", "the soup was not great .", "the soup was very great .",
             "the soup was awful .", "zebra quantum", ""]
    g = oracle(texts)
    np.testing.assert_array_equal(g, oracle(texts))
    assert g[2] > g[0] > 3.0 > g[1] and g[3] < 3.0
    assert g[4] == g[5] == 3.0 and ((g > 1) & (g < 5)).all()
    # sentiment words count only inside statements: word salad is neutral
    assert oracle(["great superb perfect amazing", "so i loved it"]).tolist() == [
        3.0, pytest.approx(3 + 2 * np.tanh(2 / 3))]


def test_synthetic_corpus_confounding(tmp_path):
    a = make_corpus(800, confounding=0.5, seed=0)
    b = make_corpus(800, confounding=0.5, seed=0)
    assert a.texts == b.texts and np.array_equal(a.outcomes, b.outcomes)
    assert len(a) == 800 and set(a.groups) == {"food", "work"}
    lens = [len(s.split()) - 1 for s in a.texts]
    assert min(lens) >= 6 and max(lens) <= 16
    g = oracle(a.texts)
    assert np.corrcoef(g, a.outcomes)[0, 1] > 0.8  # y = g* + noise
    food = np.asarray(a.groups) == "food"

    def corr(t):
        return np.corrcoef(np.asarray(t.groups) == "food", t.outcomes)[0, 1]

    assert corr(a) > 0.3  # the attribute is correlated with the outcome
    assert corr(make_corpus(800, confounding=0.9, seed=0)) > corr(
        make_corpus(800, confounding=0.0, seed=0)) + 0.15  # the knob strengthens it
    assert g[food].mean() > g[~food].mean()
    p = write_corpus(a, tmp_path / "syn.csv")
    t = load_table(DataConfig(path=str(p), group_column="group", id_column="id"))
    assert t.texts == a.texts and t.groups == a.groups
    np.testing.assert_allclose(t.outcomes, a.outcomes)
