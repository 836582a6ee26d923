"""Pipeline data stage: loading each format, validation errors, encoding, collate,
the synthetic corpus and its oracle, and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cpo_fast.pipeline.stages.data import (
    DataConfig,
    Encoded,
    OutcomeTable,
    collate,
    encode,
    load_table,
)
from cpo_fast.pipeline.stages.synthetic import make_corpus, oracle, write_corpus
from cpo_fast.pipeline.stages.tokenizer import train_tokenizer

EMOBANK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "emobank.csv"

ROWS = [
    {"id": "a", "text": "the soup was great .", "y": 4.5, "prompt": "today", "lp": -3.0,
     "grp": "food"},
    {"id": "b", "text": "the meeting was awful .", "y": 1.5, "prompt": "", "lp": -2.5,
     "grp": "work"},
    {"id": "c", "text": "my tea is nice .", "y": 3.5, "prompt": "yesterday", "lp": -1.0,
     "grp": "food"},
]
CFG = dict(text_column="text", outcome_column="y", prompt_column="prompt",
           log_propensity_column="lp", group_column="grp", id_column="id")


def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        cols = list(rows[0])
        lines = [sep.join(cols)] + [sep.join(str(r[c]) for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def tok():
    texts = [r["text"] for r in ROWS] + [r["prompt"] for r in ROWS] + make_corpus(
        200, seed=1).texts
    return train_tokenizer(texts, 300, min_frequency=1, kind="wordlevel")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_load_each_format(tmp_path, fmt):
    p = _write(tmp_path / f"d.{fmt}", ROWS, fmt)
    t = load_table(DataConfig(path=str(p), **CFG))
    assert len(t) == 3
    assert t.texts == [r["text"] for r in ROWS]
    np.testing.assert_allclose(t.outcomes, [4.5, 1.5, 3.5])
    np.testing.assert_allclose(t.log_propensity, [-3.0, -2.5, -1.0])
    assert t.groups == ["food", "work", "food"] and t.ids == ["a", "b", "c"]
    assert t.prompts == ["today", "", "yesterday"]
    s = t.subset([2, 0])
    assert s.ids == ["c", "a"] and s.outcomes.tolist() == [3.5, 4.5] and len(s) == 2


def test_missing_column_lists_available(tmp_path):
    p = _write(tmp_path / "d.csv", ROWS, "csv")
    with pytest.raises(ValueError, match=r"'score'.*outcome_column.*available.*'text'"):
        load_table(DataConfig(path=str(p), outcome_column="score"))
    # without require_outcome the outcome column may be absent
    t = load_table(DataConfig(path=str(p), outcome_column="score"), require_outcome=False)
    assert t.outcomes is None and len(t) == 3


def test_bad_rows_named(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[1]["text"] = "  "
    p = _write(tmp_path / "e.jsonl", rows, "jsonl")
    with pytest.raises(ValueError, match=r"row 2, column 'text': empty text"):
        load_table(DataConfig(path=str(p), outcome_column="y"))
    for bad in ("nan", "inf", "abc", ""):
        rows = [dict(r) for r in ROWS]
        rows[2]["y"] = bad
        p = _write(tmp_path / "n.csv", rows, "csv")
        with pytest.raises(ValueError, match=r"row 3, column 'y'"):
            load_table(DataConfig(path=str(p), outcome_column="y"))
    rows = [dict(r) for r in ROWS]
    rows[0]["y"] = float("nan")
    p = _write(tmp_path / "n.parquet", rows, "parquet")
    with pytest.raises(ValueError, match=r"row 1, column 'y'.*not finite"):
        load_table(DataConfig(path=str(p), outcome_column="y"))


def test_unknown_extension_and_missing_file(tmp_path):
    p = tmp_path / "d.xlsx"
    p.write_text("x")
    with pytest.raises(ValueError, match="unknown file type"):
        load_table(DataConfig(path=str(p)))
    with pytest.raises(FileNotFoundError):
        load_table(DataConfig(path=str(tmp_path / "nope.csv")))


def test_encode_truncate_and_refuse(tok):
    t = OutcomeTable(texts=["the soup was great and the tea was nice .", "my tea ."],
                     outcomes=np.array([1.0, 2.0]))
    full = encode(t, tok, max_tokens=64)
    assert full.n_truncated == 0
    n0 = len(full.input_ids[0])
    cut = encode(t, tok, max_tokens=6, on_too_long="truncate")
    assert cut.n_truncated == 1 and len(cut.input_ids[0]) == 6
    assert cut.input_ids[0][-1] == tok.eos_token_id and cut.input_ids[0][0] == tok.bos_token_id
    assert cut.input_ids[1] == full.input_ids[1]
    with pytest.raises(ValueError, match=rf"data row 1 .*{n0} tokens > --max-tokens=6"):
        encode(t, tok, max_tokens=6, on_too_long="error")


def test_collate_alignment(tok):
    t = OutcomeTable(texts=["was great .", "the meeting was awful ."],
                     outcomes=np.array([4.0, 1.0]), prompts=["the soup", ""],
                     log_propensity=np.array([-1.0, -2.0]))
    enc = encode(t, tok, 32)
    assert enc.score_start[0] == 1 + len(tok("the soup", add_special_tokens=False)["input_ids"])
    assert enc.score_start[1] == 1
    b = collate(enc, [0, 1], tok.pad_token_id, t.outcomes, t.log_propensity)
    ids, lab, am = b["input_ids"], b["labels"], b["attention_mask"]
    B, T = ids.shape
    assert lab.shape == (B, T) and am.shape == (B, T)  # HF convention: unshifted
    for i in range(B):
        L = len(enc.input_ids[i])
        s = enc.score_start[i]
        assert ids[i, :L].tolist() == enc.input_ids[i]
        assert (ids[i, L:] == tok.pad_token_id).all() and am[i].sum() == L
        scored = lab[i] != -100
        # label t is token t itself, scored iff s <= t < L (so never position 0)
        pos = torch.arange(T)
        assert torch.equal(scored, (pos >= s) & (pos < L))
        assert torch.equal(lab[i][scored], ids[i][scored])
    assert b["outcome"].dtype == torch.float32 and b["outcome"].tolist() == [4.0, 1.0]
    assert b["ref_logp"].tolist() == [-1.0, -2.0]
    assert b["index"].tolist() == [0, 1]


def test_tokenizer_roundtrip_and_save(tmp_path):
    texts = make_corpus(100, seed=2).texts
    for kind in ("bpe", "wordlevel"):
        tk = train_tokenizer(texts, 400, min_frequency=1, kind=kind)
        assert [tk.pad_token_id, tk.bos_token_id, tk.eos_token_id, tk.unk_token_id] == [0, 1, 2, 3]
        ids = tk(texts[0])["input_ids"]
        assert ids[0] == tk.bos_token_id
        dec = tk.decode(ids, skip_special_tokens=True)
        assert oracle([dec])[0] == pytest.approx(oracle([texts[0]])[0])
        if kind == "bpe":
            assert dec == texts[0]
        tk.save_pretrained(tmp_path / kind)
        from transformers import AutoTokenizer

        back = AutoTokenizer.from_pretrained(tmp_path / kind)
        assert back(texts[1])["input_ids"] == tk(texts[1])["input_ids"]
        assert back.pad_token == "<pad>" and back.eos_token == "<eos>"


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


@pytest.mark.skipif(not EMOBANK.exists(), reason="shared EmoBank data not present")
def test_emobank_loads():
    t = load_table(DataConfig(path=str(EMOBANK), text_column="text", outcome_column="V",
                              id_column="id"))
    assert len(t) > 5000 and np.isfinite(t.outcomes).all()
    assert 1.0 <= t.outcomes.min() and t.outcomes.max() <= 5.0
    enc = encode(t.subset(range(300)), train_tokenizer(t.texts[:2000], 800), 64)
    assert len(enc) == 300 and isinstance(enc, Encoded)
