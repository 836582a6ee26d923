"""Semi-synthetic direct-outcome corpus with a known oracle g* (docs/math.md section 8).

Generative story
----------------
Each sentence is about one *topic* (the confounding attribute, stored as ``group``):
``"food"`` or ``"work"``. A latent mood ``s ~ Normal(mu_topic, 1)`` with
``mu_food = +0.5``, ``mu_work = -0.5`` sets how likely each sentiment slot is filled with
a positive rather than a negative word. A sentence is built from the slots::

    [opener] det NOUN copula [intensifier] [not] ADJ [and [intensifier] ADJ]
    [, but det NOUN2 copula [intensifier] [not] ADJ] [so i VERB it] .

(6 to 16 words; nouns come from the topic's list, openers/determiners/copulas are
neutral). About 160 distinct words in all.

Oracle
------
``g*(x) = 3 + 2 tanh(S(x) / 3)`` in (1, 5), with ``S(x)`` a lexicon score over the words
present in *any* text (so it scores model generations too): each sentiment word has a
weight (+2 strong positive, +1 positive, -1 negative, -2 strong negative; topic nouns and
all other words 0), multiplied by 1.5 after an intensifier ("very", "really", ...) and
sign-flipped when "not"/"never" is among the two preceding words. A sentiment word counts
only inside a statement: an adjective within three words after a copula ("was", "is",
...) or "and", a verb right after a pronoun ("so i loved it"); so a string of positive
words without syntax ("great superb perfect") scores 3, not 5, and a policy cannot reach
the top by word salad. tanh saturates: a well-formed sentence with two or three strong
positive words is near the maximum. Only the sentiment words cause the outcome; the
topic does not.

Outcomes and confounding
------------------------
``y = g*(x) + noise * (1 + confounding * [topic == "work"]) * eps``, ``eps ~ N(0, 1)``
(zero-mean noise, so g*(x) = E[Y(x)]; its scale depends on the topic). The topic is
correlated with g* through ``mu_topic``, and ``confounding`` in [0, 1) strengthens that
correlation by *selection into the corpus*: a generated sentence whose sentiment goes
against its topic's tendency (a food sentence with g* < 3, a work sentence with g* > 3)
enters the corpus only with probability ``1 - confounding``. Selection depends on the
text only, so importance weighting stays valid (P^R(x) > 0 wherever the generator can
produce x, for confounding < 1), while an outcome model fitted on the corpus can lean on
topic words as a proxy for sentiment: a policy that chases ghat drifts toward food talk,
one that follows the (doubly robust) weights learns the sentiment words.

The learnable signal: raising the share of positive (and intensified) sentiment words
and avoiding negations of them raises g*, which a policy trained with CPO/DR-CPO can do
from the corpus alone.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from cpo_fast.pipeline.run.persist import write_text
from cpo_fast.pipeline.stages.data import OutcomeTable

TOPICS = ("food", "work")
_TOPIC_MU = {"food": 0.5, "work": -0.5}
_NOUNS = {
    "food": ["soup", "bread", "pasta", "salad", "coffee", "dinner", "lunch", "breakfast",
             "cake", "pizza", "curry", "tea", "dessert", "sandwich", "menu", "kitchen",
             "cafe", "restaurant", "meal", "chef"],
    "work": ["meeting", "office", "project", "deadline", "report", "manager", "email",
             "schedule", "shift", "task", "team", "client", "presentation", "review",
             "desk", "budget", "contract", "interview", "colleague", "workload"],
}
_ADJ = {
    2: ["great", "wonderful", "excellent", "amazing", "delightful", "fantastic", "perfect",
        "superb"],
    1: ["good", "nice", "pleasant", "fine", "lovely", "warm", "friendly", "calm", "fresh",
        "bright", "cheerful", "smooth"],
    -1: ["bad", "dull", "cold", "slow", "poor", "boring", "messy", "tiring", "sad", "noisy",
         "bland", "stale"],
    -2: ["awful", "terrible", "horrible", "dreadful", "disgusting", "miserable", "painful",
         "useless"],
    0: ["usual", "long", "short", "quiet", "new", "old", "small", "large", "simple", "plain",
        "brief", "normal"],
}
_VERBS = {2: ["loved", "adored"], 1: ["liked", "enjoyed", "appreciated"],
          -1: ["disliked", "regretted", "endured"], -2: ["hated", "despised"],
          0: ["noticed", "remembered", "described", "mentioned"]}
_OPENERS = ["today", "yesterday", "this morning", "last night", "on monday", "this week",
            "at noon", "once again", "as usual", "in the evening"]
_DETS = ["the", "my", "our", "this", "that"]
_COPULAS = ["was", "is", "seemed", "felt", "looked"]
_INTENSIFIERS = ["very", "really", "truly", "extremely"]
_NEGATORS = ["not", "never"]

LEXICON: dict[str, float] = {w: float(k) for pool in (_ADJ, _VERBS)
                             for k, ws in pool.items() for w in ws if k != 0}
_VERB_WORDS = frozenset(w for ws in _VERBS.values() for w in ws)
_WORD = re.compile(r"[a-z']+")


_LINKS = frozenset({*_COPULAS, "are", "were", "be", "been", "seems", "feels", "looks", "and"})
_PRONOUNS = frozenset({"i", "we", "they", "you", "he", "she"})


def _licensed(words: list[str], j: int, w: str) -> bool:
    """A sentiment word counts only inside a statement: an adjective within three words
    after a copula or "and", a verb right after a pronoun (word salad scores 3)."""
    if w in _VERB_WORDS:
        return j >= 1 and words[j - 1] in _PRONOUNS
    return any(p in _LINKS for p in words[max(0, j - 3):j])


def oracle(texts: list[str]) -> np.ndarray:
    """g*(x) in (1, 5) for arbitrary texts (float64 [n]); see the module docstring."""
    out = np.empty(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        words = _WORD.findall(str(text).lower())
        s = 0.0
        for j, w in enumerate(words):
            v = LEXICON.get(w)
            if v is None or not _licensed(words, j, w):
                continue
            if j >= 1 and words[j - 1] in _INTENSIFIERS:
                v *= 1.5
            if any(p in _NEGATORS for p in words[max(0, j - 2):j]):
                v = -v
            s += v
        out[i] = 3.0 + 2.0 * np.tanh(s / 3.0)
    return out


def _sentence(rng: np.random.Generator, topic: str) -> str:
    mood = rng.normal(_TOPIC_MU[topic], 1.0)
    p_pos = 1.0 / (1.0 + np.exp(-1.5 * mood))

    def polarity() -> int:
        if rng.random() < 0.2:
            return 0
        sign = 1 if rng.random() < p_pos else -1
        return sign * (2 if rng.random() < 0.35 else 1)

    def pick(xs: list[str]) -> str:
        return xs[rng.integers(len(xs))]

    def adj_phrase(negate_ok: bool = True) -> list[str]:
        ws = []
        if rng.random() < 0.3:
            ws.append(pick(_INTENSIFIERS))
        if negate_ok and rng.random() < 0.12:
            ws.insert(0, pick(_NEGATORS))
        return [*ws, pick(_ADJ[polarity()])]

    nouns = _NOUNS[topic]
    words: list[str] = []
    if rng.random() < 0.5:
        words += pick(_OPENERS).split()
    words += [pick(_DETS), pick(nouns), pick(_COPULAS), *adj_phrase()]
    if rng.random() < 0.4:
        words += ["and", *adj_phrase(negate_ok=False)]
    if rng.random() < 0.4:
        words[-1] += ","
        words += ["but", pick(_DETS), pick(nouns), pick(_COPULAS), *adj_phrase()]
    if rng.random() < 0.4:
        words += ["so", "i", pick(_VERBS[polarity()]), "it"]
    return " ".join(words) + " ."


def make_corpus(n: int = 2000, *, confounding: float = 0.5, noise: float = 0.5,
                seed: int = 0) -> OutcomeTable:
    """``n`` rows: texts, outcomes ``y = g*(x) + noise``, ``groups`` = topic; see the
    module docstring for the selection (``confounding``) and the noise model."""
    if not 0.0 <= confounding < 1.0:
        raise ValueError(f"confounding must be in [0, 1), got {confounding}.")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    groups: list[str] = []
    while len(texts) < n:
        topic = TOPICS[rng.integers(2)]
        text = _sentence(rng, topic)
        if not 6 <= len(text.split()) - 1 <= 16:  # words, not counting the final "."
            continue
        g = oracle([text])[0]
        against = (topic == "food" and g < 3.0) or (topic == "work" and g > 3.0)
        if against and rng.random() < confounding:
            continue
        texts.append(text)
        groups.append(topic)
    g = oracle(texts)
    scale = noise * (1.0 + confounding * (np.asarray(groups) == "work"))
    y = g + scale * rng.standard_normal(n)
    return OutcomeTable(texts=texts, outcomes=y, groups=groups,
                        ids=[f"syn{i:05d}" for i in range(n)])


def corpus_csv(table: OutcomeTable) -> str:
    """``id, text, outcome, group, oracle`` as CSV text (readable by ``load_table`` with
    ``text_column="text"``, ``outcome_column="outcome"``, ``group_column="group"``)."""
    g = oracle(table.texts)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "text", "outcome", "group", "oracle"])
    for i in range(len(table)):
        w.writerow([table.ids[i], table.texts[i],
                    "" if table.outcomes is None else repr(float(table.outcomes[i])),
                    "" if table.groups is None else table.groups[i], repr(float(g[i]))])
    return buf.getvalue()


def write_corpus(table: OutcomeTable, path: str | Path) -> Path:
    """Write :func:`corpus_csv` to ``path``, atomically."""
    return write_text(path, corpus_csv(table))
