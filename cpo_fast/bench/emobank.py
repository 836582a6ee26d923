"""EmoBank as a confounded direct-outcome corpus, and an independent sentiment judge.

EmoBank (Buechel and Hahn, 2017): about 10,000 English sentences with human valence ratings
(1 to 5) and each sentence's genre. The data is not shipped with the project: pass the path
of ``emobank.csv`` (its genre file ``emobank_meta.tsv`` next to it).

Confounding by genre (docs/validity.md). Genres differ in mean valence (letters and travel
guides rate warmer than fiction or news headlines), so genre already drives the outcome.
Selection makes it drive inclusion too, as ``synthetic.make_corpus`` does with its topics:
each genre leans "warm" or "cool" (its mean valence above or below the overall median), and
a sentence that goes against its genre's lean (a warm-genre sentence rated below the median,
a cool-genre one above) enters the corpus only with probability ``1 - confounding``. In the
selected corpus genre words then stand in for valence, which an outcome model can exploit.
There is no oracle here; selection uses the observed rating (the mean of several readers).

The judge is VADER (the ``vaderSentiment`` package, a fixed lexicon and rules, never fitted
to EmoBank): the mean compound score of a model's generations, in [-1, 1].
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cpo_fast.pipeline.stages.data import OutcomeTable


def read_emobank(path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, valence, genre) of every EmoBank row that has a genre."""
    p = Path(path)
    meta = p.with_name("emobank_meta.tsv")
    if not p.is_file() or not meta.is_file():
        raise FileNotFoundError(f"EmoBank not found: need {p} and {meta} (emobank.csv and its "
                                "genre file emobank_meta.tsv).")
    with meta.open(newline="", encoding="utf-8") as f:
        genre = {r["id"]: r["category"] for r in csv.DictReader(f, delimiter="\t")}
    texts, v, g = [], [], []
    with p.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            t = (r.get("text") or "").strip()
            if t and r["id"] in genre and r.get("V"):
                texts.append(t)
                v.append(float(r["V"]))
                g.append(genre[r["id"]])
    return texts, np.asarray(v), g


def confounded_emobank(path: str | Path, *, confounding: float, rows: int,
                       seed: int = 0) -> OutcomeTable:
    """``rows`` EmoBank sentences selected with genre-driven confounding (module docstring)."""
    if not 0.0 <= confounding < 1.0:
        raise ValueError(f"confounding must be in [0, 1), got {confounding}.")
    texts, v, g = read_emobank(path)
    med = float(np.median(v))
    gs = np.asarray(g)
    warm = {k: float(v[gs == k].mean()) > med for k in sorted(set(g))}
    against = np.array([(warm[k] and y < med) or (not warm[k] and y > med)
                        for k, y in zip(g, v, strict=True)])
    rng = np.random.default_rng(seed)
    keep = ~against | (rng.random(len(v)) >= confounding)
    idx = np.flatnonzero(keep)
    if len(idx) > rows:
        idx = np.sort(rng.choice(idx, rows, replace=False))
    return OutcomeTable(texts=[texts[i] for i in idx], outcomes=v[idx],
                        groups=[g[i] for i in idx], ids=[f"eb{i:05d}" for i in idx])


def write_table(table: OutcomeTable, path: str | Path) -> Path:
    """CSV with ``id, text, outcome, group`` (read back with the demo's column names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "outcome", "group"])
        for i in range(len(table)):
            w.writerow([table.ids[i], table.texts[i], repr(float(table.outcomes[i])),
                        table.groups[i]])
    return path


_VADER = None


def vader(texts: list[str]) -> np.ndarray:
    """VADER compound sentiment in [-1, 1] of each text (needs ``pip install vaderSentiment``,
    the project's ``bench`` extra)."""
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ImportError("the EmoBank judge needs vaderSentiment: pip install "
                              "'cpo_fast[bench]' (or pip install vaderSentiment).") from None
        _VADER = SentimentIntensityAnalyzer()
    return np.array([_VADER.polarity_scores(str(t))["compound"] for t in texts], np.float64)
