"""Fixtures of the pipeline tests: a synthetic corpus, a run prepared once per session (the
shared stages of tests/pipeline/*: tokenizer, f_0, reference cache, ghat, DM set), and an
encoded corpus with its tokenizer."""

from __future__ import annotations

import pytest
from conftest import TINY_RUN

from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.stages.data import encode
from cpo_fast.pipeline.stages.synthetic import make_corpus, write_corpus
from cpo_fast.pipeline.stages.tokenizer import train_tokenizer
from cpo_fast.pipeline.training.prepare import prepare


@pytest.fixture(scope="session")
def corpus_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.csv"
    write_corpus(make_corpus(120, seed=1), path)
    return path


@pytest.fixture(scope="session")
def prep(corpus_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(data=str(corpus_csv), output_dir=str(out), **TINY_RUN).validate()
    return prepare(cfg, need_dm=True)


@pytest.fixture(scope="session")
def encoded_corpus():
    """(table, tokenizer, encoded): 48 texts, a third of them with a two-word prompt."""
    t = make_corpus(48, seed=3)
    t.prompts = [" ".join(s.split()[:2]) if i % 3 == 0 else "" for i, s in enumerate(t.texts)]
    t.texts = [" ".join(s.split()[2:]) if i % 3 == 0 else s for i, s in enumerate(t.texts)]
    tok = train_tokenizer(t.texts + t.prompts, 300, min_frequency=1, kind="wordlevel")
    return t, tok, encode(t, tok, 32)
