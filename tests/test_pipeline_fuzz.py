"""Fuzzing the data loader (issue 12, deliverable 5, data half): hypothesis-drawn CSV, TSV,
JSONL and Parquet files with bad cells, encodings, quoting, huge fields, BOMs and mixed
types load correctly or fail with a clear ValueError naming the file, never a traceback
of another type."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cpo_fast.pipeline.stages.data import DataConfig, load_table

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


def _write(tmp: Path, fmt: str, rows, encoding: str, quoting: int, hurt: str | None) -> Path:
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
    path = _write(tmp_path, fmt, rows, encoding, quoting, hurt)
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
    path = _write(tmp_path, fmt, rows, encoding, quoting, None)
    table = load_table(DataConfig(path=str(path)))
    assert table.texts == [t for t, _ in rows]
    assert list(table.outcomes) == [float(y) for _, y in rows]
