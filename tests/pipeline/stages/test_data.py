"""The data stage (cpo_fast/pipeline/stages/data.py): loading each format, validation errors,
encoding, collate, EmoBank; and hypothesis-drawn CSV, TSV, JSONL and Parquet files with bad
cells, encodings, quoting, huge fields, BOMs and mixed types, which load correctly or fail
with a clear ValueError naming the file, never a traceback of another type (issue 12,
deliverable 5, data half)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import EMOBANK
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cpo_fast.pipeline.stages.data import (
    DataConfig,
    Encoded,
    OutcomeTable,
    encode,
    load_table,
)
from cpo_fast.pipeline.stages.synthetic import make_corpus
from cpo_fast.pipeline.stages.tokenizer import train_tokenizer

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


def test_encode_marks_where_scoring_starts(tok):
    t = OutcomeTable(texts=["was great .", "the meeting was awful ."],
                     outcomes=np.array([4.0, 1.0]), prompts=["the soup", ""])
    enc = encode(t, tok, 32)
    assert enc.score_start[0] == 1 + len(tok("the soup", add_special_tokens=False)["input_ids"])
    assert enc.score_start[1] == 1
    resp = tok("was great .", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[0][enc.score_start[0]:-1] == resp  # the response, then EOS
    assert enc.input_ids[0][-1] == tok.eos_token_id


@pytest.mark.skipif(not EMOBANK.exists(), reason="shared EmoBank data not present")
def test_emobank_loads():
    t = load_table(DataConfig(path=str(EMOBANK), text_column="text", outcome_column="V",
                              id_column="id"))
    assert len(t) > 5000 and np.isfinite(t.outcomes).all()
    assert 1.0 <= t.outcomes.min() and t.outcomes.max() <= 5.0
    enc = encode(t.subset(range(300)), train_tokenizer(t.texts[:2000], 800), 64)
    assert len(enc) == 300 and isinstance(enc, Encoded)


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_duplicate_column_names_are_refused(suffix, tmp_path):
    from cpo_fast.pipeline.stages.data import DataConfig, load_table

    p = tmp_path / f"dup.{suffix}"
    if suffix == "csv":
        p.write_text("text,outcome,text\nfirst,1,second\nthird,2,fourth\n")
    elif suffix == "jsonl":
        p.write_text('{"text": "a", "outcome": 1}\n{"text": "b", "outcome": 2, "text": "c"}\n')
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array([1.0]), pa.array(["b"])],
                                            names=["text", "outcome", "text"]), p)
    with pytest.raises(ValueError, match=r"repeats the column name\(s\) \['text'\]"):
        load_table(DataConfig(path=str(p)))


# ---- drawn files (hypothesis) ---------------------------------------------------------------

HUGE = "long " * 40_000  # 200k characters: over the csv module's default field limit
texts = st.one_of(st.text(max_size=20), st.text(alphabet=',"\n\r\t\\ \'\u2028\x85;', max_size=8),
                  st.sampled_from(["", "   ", "a,b", 'say "hi"', HUGE, "\ufeffbom", "x\x00y"]))
outcomes = st.one_of(st.floats(), st.integers(), st.booleans(), st.none(),
                     st.text(max_size=6), st.lists(st.integers(), max_size=2),
                     st.sampled_from(["1.5", " 2 ", "nan", "-inf", "1e999", ""]))
rows_st = st.lists(st.tuples(texts, outcomes), max_size=5)
damage = st.sampled_from([None, None, None, "truncate", "garbage", "nul"])


def _valid(rows) -> bool:
    """Rows the loader must accept as they are."""
    def ok_y(y):
        return (isinstance(y, (int, float)) and not isinstance(y, bool) and abs(y) < 1e300
                and math.isfinite(y))
    return bool(rows) and all(isinstance(t, str) and t.strip() and "\x00" not in t and ok_y(y)
                              for t, y in rows)


def _csv_bytes(rows, delimiter: str, quoting: int, encoding: str) -> bytes:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, delimiter=delimiter, quoting=quoting)
    w.writerow(["text", "outcome"])
    for t, y in rows:
        w.writerow([t, "" if y is None else y])
    return buf.getvalue().encode(encoding, errors="replace")


def _jsonl_bytes(rows, encoding: str, ascii_only: bool) -> bytes:
    lines = [json.dumps({"text": t, "outcome": y}, ensure_ascii=ascii_only) for t, y in rows]
    return "\n".join(lines).encode(encoding, errors="replace")


def _parquet(rows, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ys = [y for _, y in rows]
    numeric = all(isinstance(y, (int, float)) and not isinstance(y, bool) and abs(y) < 1e300
                  for y in ys)
    col = pa.array([float(y) for y in ys], pa.float64()) if numeric else pa.array(
        [None if y is None else str(y) for y in ys], pa.string())
    pq.write_table(pa.table({"text": pa.array([t for t, _ in rows], pa.string()),
                             "outcome": col}), path)


def _write_drawn(tmp: Path, fmt: str, rows, encoding: str, quoting: int, hurt: str | None) -> Path:
    path = tmp / f"data.{fmt}"
    if fmt == "parquet":
        _parquet(rows, path)
    elif fmt == "jsonl":
        path.write_bytes(_jsonl_bytes(rows, encoding, quoting == csv.QUOTE_ALL))
    else:
        path.write_bytes(_csv_bytes(rows, "," if fmt == "csv" else "\t", quoting, encoding))
    raw = path.read_bytes()
    if hurt == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif hurt == "garbage":
        path.write_bytes(raw[:7] + b"\xff\xfe\x80\x00garbage\xc3" + raw[7:])
    elif hurt == "nul":
        path.write_bytes(raw + b"\x00\x00")
    return path


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=rows_st, fmt=st.sampled_from(["csv", "tsv", "jsonl", "parquet"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
       hurt=damage)
def test_data_files_load_or_fail_clearly(tmp_path, rows, fmt, encoding, quoting, hurt):
    path = _write_drawn(tmp_path, fmt, rows, encoding, quoting, hurt)
    try:
        table = load_table(DataConfig(path=str(path)))
    except ValueError as e:  # the CLI prints these as one line, exit status 2
        assert str(path) in str(e), e
        assert "Traceback" not in str(e)
    else:
        assert len(table) >= 1 and all(t.strip() for t in table.texts)
        assert all(math.isfinite(y) for y in table.outcomes)
    plain = encoding != "latin-1" or all(t.isascii() for t, _ in rows)
    if _valid(rows) and hurt is None and plain:  # a clean file must load, exactly
        table = load_table(DataConfig(path=str(path)))
        assert table.texts == [t for t, _ in rows]
        assert list(table.outcomes) == pytest.approx([float(y) for _, y in rows], rel=1e-12)


clean_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                      min_size=1, max_size=15).filter(str.strip)
clean_rows = st.lists(st.tuples(clean_texts, st.floats(-1e6, 1e6)), min_size=1, max_size=4)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=clean_rows, fmt=st.sampled_from(["csv", "tsv", "jsonl", "parquet"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
@example(rows=[("a\u2028b", 1.0)], fmt="jsonl", encoding="utf-8", quoting=csv.QUOTE_MINIMAL)
def test_clean_files_round_trip(tmp_path, rows, fmt, encoding, quoting):
    """Any valid file loads exactly (a JSONL text holding U+2028 used to split its line)."""
    path = _write_drawn(tmp_path, fmt, rows, encoding, quoting, None)
    table = load_table(DataConfig(path=str(path)))
    assert table.texts == [t for t, _ in rows]
    assert list(table.outcomes) == [float(y) for _, y in rows]
