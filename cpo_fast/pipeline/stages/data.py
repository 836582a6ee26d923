"""Direct-outcome data: load, validate and tokenize.

A *direct outcome dataset* (docs/math.md) has one text and one number per row.
This module reads it from CSV/TSV, JSONL or Parquet with configurable column names,
validates every row up front (errors name the row number and the column), tokenizes it as
``BOS + prompt + response + EOS`` and records where each row's scored tokens start;
:func:`cpo_fast.models.collate` pads rows of it into the batch dictionary, whose unshifted
labels score exactly the response tokens (plus EOS).

Row numbers in errors are 1-based data rows (the header of a CSV is not counted).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class DataConfig:
    """Where the data is and which columns mean what.

    ``prompt_column``: when set, the row's text is the *response* to that prompt and only
    response tokens (and EOS) are scored. ``log_propensity_column``: a known log P^R(x)
    (randomized design); otherwise f_0 estimates it. ``group_column``: a confounder or
    stratum, carried along for reports only. ``max_tokens`` counts every token of the
    encoded row (BOS, prompt, response, EOS); ``on_too_long`` is ``"truncate"`` (cut the
    response, keep EOS, and count the rows cut) or ``"error"``.
    """

    path: str
    text_column: str = "text"
    outcome_column: str = "outcome"
    prompt_column: str | None = None
    log_propensity_column: str | None = None
    group_column: str | None = None
    id_column: str | None = None
    max_tokens: int = 128
    on_too_long: str = "truncate"
    path_flag: str = "--data"  # how errors name ``path`` (the DM set's file is --dm-path)


@dataclass
class OutcomeTable:
    """Validated rows, in file order. ``rows`` are the 1-based data-row numbers in the file
    (kept through ``subset`` so errors point at the file); ``ids`` default to them."""

    texts: list[str]
    outcomes: np.ndarray | None = None
    prompts: list[str] | None = None
    log_propensity: np.ndarray | None = None
    groups: list[str] | None = None
    ids: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if not self.rows:
            self.rows = list(range(1, n + 1))
        if not self.ids:
            self.ids = [str(r) for r in self.rows]
        for name in ("outcomes", "prompts", "log_propensity", "groups", "ids", "rows"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"OutcomeTable.{name} has {len(v)} entries but texts has {n}.")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> OutcomeTable:
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        arr = lambda a: None if a is None else np.asarray(a)[idx]  # noqa: E731
        return OutcomeTable(texts=pick(self.texts), outcomes=arr(self.outcomes),
                            prompts=pick(self.prompts), log_propensity=arr(self.log_propensity),
                            groups=pick(self.groups), ids=pick(self.ids), rows=pick(self.rows))


# --------------------------------------------------------------------------- loading

def _decode(path: Path) -> str:
    """The file's text: UTF-8 (a BOM is dropped) or UTF-16/32 with a BOM; else a clear error."""
    raw = path.read_bytes()
    boms = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
            (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
    enc = next((e for bom, e in boms if raw.startswith(bom)), "utf-8-sig")
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not {enc.replace('-sig', '')} text (byte {e.start}: "
                         f"{e.reason}); save the file as UTF-8.") from None
    if "\x00" in text:
        raise ValueError(f"{path}: contains NUL bytes (a binary file, or UTF-16 without a "
                         "byte-order mark?); save it as UTF-8 text.")
    return text


def _unique_columns(path: Path, columns: Sequence[str], where: str = "the header") -> None:
    """A repeated column name would silently keep only its last copy: refuse it."""
    dup = sorted({c for c in columns if list(columns).count(c) > 1})
    if dup:
        raise ValueError(f"{path}: {where} repeats the column name(s) {dup}; rename them so "
                         "each column has its own name.")


def _read_csv(path: Path, text: str, delimiter: str) -> tuple[list[str], list[dict[str, Any]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are data, not errors
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        _unique_columns(path, reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: malformed {delimiter!r}-separated "
                         f"data ({e}).") from None
    return list(reader.fieldnames or []), rows


_DUPLICATE_KEYS = object()  # where _pairs records the keys of an object that repeats one


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = dict(pairs)
    if len(out) < len(pairs):
        out[_DUPLICATE_KEYS] = [k for k, _ in pairs]
    return out


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[dict[str, Any]]]:
    rows, cols = [], {}
    # "\n" only: str.splitlines() also splits at U+2028, U+0085, ... which JSON leaves raw
    # inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_pairs)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: line {lineno} is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {lineno} is not a JSON object.")
        if _DUPLICATE_KEYS in obj:
            _unique_columns(path, obj[_DUPLICATE_KEYS], f"line {lineno}")
        rows.append(obj)
        cols.update(dict.fromkeys(obj))
    return list(cols), rows


def _read_rows(path: Path, flag: str = "--data") -> tuple[list[str], list[dict[str, Any]]]:
    """Return (column names, rows as dicts) for a supported file."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{flag} {path}: unknown file type {path.suffix!r}; use one of "
                         f"{sorted(_FORMATS)} (the type is taken from the extension).")
    if not path.is_file():
        raise ValueError(f"{flag} {path}: not a file.")
    if fmt in ("csv", "tsv"):
        return _read_csv(path, _decode(path), "\t" if fmt == "tsv" else ",")
    if fmt == "jsonl":
        return _read_jsonl(path, _decode(path))
    import pyarrow.parquet as pq

    def damaged(e: Exception) -> ValueError:  # pyarrow raises several types for a bad file
        return ValueError(f"{path}: cannot read it as Parquet ({type(e).__name__}: {e}).")

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:
        raise damaged(e) from None
    _unique_columns(path, names, "the schema")  # read_table's own error does not say so
    try:
        t = pq.read_table(path)
    except Exception as e:
        raise damaged(e) from None
    return list(t.column_names), t.to_pylist()


def _as_text(v: Any, row: int, col: str, path: Path) -> str:
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple, bytes)):
        raise ValueError(f"{path}: row {row}, column {col!r}: expected text, got "
                         f"{type(v).__name__} {str(v)[:40]!r}.")
    return str(v)


def _as_float(v: Any, row: int, col: str, path: Path) -> float:
    if isinstance(v, (dict, list, tuple)):
        raise ValueError(f"{path}: row {row}, column {col!r}: {str(v)[:40]!r} is not a number.")
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{path}: row {row}, column {col!r}: {v!r} is not a number.") from None
    if not math.isfinite(x):
        raise ValueError(f"{path}: row {row}, column {col!r}: value {v!r} is not finite "
                         "(NaN/inf); fix or drop the row.")
    return x


def load_table(cfg: DataConfig, require_outcome: bool = True) -> OutcomeTable:
    """Read and validate ``cfg.path``.

    Raises ValueError naming the column (and listing the available ones) when a configured
    column is missing, and naming the row for an empty text, a missing/NaN/inf outcome or
    log-propensity. With ``require_outcome=False`` (generation prompts, DM texts) the
    outcome column may be absent; when present its values are still validated.
    """
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"{cfg.path_flag} {path}: does not exist.")
    columns, rows = _read_rows(path, cfg.path_flag)
    if not rows:
        raise ValueError(f"{path}: no data rows.")
    avail = ", ".join(repr(c) for c in columns)
    wanted = {"text_column": cfg.text_column, "prompt_column": cfg.prompt_column,
              "log_propensity_column": cfg.log_propensity_column,
              "group_column": cfg.group_column, "id_column": cfg.id_column}
    if require_outcome:
        wanted["outcome_column"] = cfg.outcome_column
    for arg, col in wanted.items():
        if col is not None and col not in columns:
            raise ValueError(f"{path}: column {col!r} (--{arg.replace('_', '-')} / {arg}) not "
                             f"found; available columns: {avail}.")
    has_outcome = cfg.outcome_column in columns

    texts, prompts, groups, ids, ys, lps = [], [], [], [], [], []
    for r, row in enumerate(rows, 1):
        text = _as_text(row.get(cfg.text_column), r, cfg.text_column, path)
        if not text.strip():
            raise ValueError(f"{path}: row {r}, column {cfg.text_column!r}: empty text.")
        texts.append(text)
        if cfg.prompt_column is not None:
            prompts.append(_as_text(row.get(cfg.prompt_column), r, cfg.prompt_column, path))
        if has_outcome:
            v = row.get(cfg.outcome_column)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise ValueError(f"{path}: row {r}, column {cfg.outcome_column!r}: "
                                 "missing outcome.")
            ys.append(_as_float(v, r, cfg.outcome_column, path))
        if cfg.log_propensity_column is not None:
            lps.append(_as_float(row.get(cfg.log_propensity_column), r,
                                 cfg.log_propensity_column, path))
        if cfg.group_column is not None:
            groups.append(str(row.get(cfg.group_column)))
        ids.append(str(row.get(cfg.id_column)) if cfg.id_column is not None else str(r))
    if cfg.id_column is not None and len(set(ids)) != len(ids):
        raise ValueError(f"{path}: column {cfg.id_column!r} (--id-column) has duplicate ids.")
    return OutcomeTable(
        texts=texts,
        outcomes=np.asarray(ys, dtype=np.float64) if has_outcome else None,
        prompts=prompts if cfg.prompt_column is not None else None,
        log_propensity=np.asarray(lps, dtype=np.float64) if lps else None,
        groups=groups if cfg.group_column is not None else None,
        ids=ids,
    )


# --------------------------------------------------------------------------- encoding

@dataclass
class Encoded:
    """Token ids per row and where scoring starts.

    ``input_ids[i] = [BOS] + prompt + response + [EOS]``; ``score_start[i]`` is the index
    of the first token whose prediction is scored (1 + number of prompt tokens, counting
    BOS), so label position ``t`` (predicting token ``t+1``) is scored iff
    ``t + 1 >= score_start[i]``.
    """

    input_ids: list[list[int]]
    score_start: list[int]
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def _special_id(tokenizer: Any, name: str) -> int:
    v = getattr(tokenizer, f"{name}_token_id", None)
    if v is None:
        raise ValueError(f"tokenizer has no {name}_token_id; set tokenizer.{name}_token "
                         "(train_tokenizer() sets <bos>/<eos>/<pad>).")
    return int(v)


def encode(table: OutcomeTable, tokenizer: Any, max_tokens: int = 128,
           on_too_long: str = "truncate") -> Encoded:
    """Tokenize every row as ``BOS + prompt + response + EOS`` (special tokens added here,
    not by the tokenizer). Too-long rows: ``"truncate"`` cuts the response (keeping EOS)
    and counts them in ``n_truncated``; ``"error"`` raises naming the row."""
    if on_too_long not in ("truncate", "error"):
        raise ValueError(f"on_too_long must be 'truncate' or 'error', got {on_too_long!r}.")
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    resp = tokenizer(list(table.texts), add_special_tokens=False, verbose=False)["input_ids"]
    if table.prompts is not None:
        prm = tokenizer(list(table.prompts), add_special_tokens=False, verbose=False)["input_ids"]
    else:
        prm = [[] for _ in resp]
    ids, starts, n_trunc = [], [], 0
    for i, (p, r) in enumerate(zip(prm, resp, strict=True)):
        n = 2 + len(p) + len(r)
        if n > max_tokens:
            keep = max_tokens - 2 - len(p)
            if on_too_long == "error" or keep < 1:
                why = ("the prompt alone leaves no room for the response"
                       if keep < 1 else "on_too_long='error'")
                raise ValueError(f"data row {table.rows[i]} (id {table.ids[i]}): {n} tokens > "
                                 f"--max-tokens={max_tokens} ({why}); raise --max-tokens, "
                                 "shorten the text, or use --on-too-long truncate.")
            r = r[:keep]
            n_trunc += 1
        ids.append([bos, *p, *r, eos])
        starts.append(1 + len(p))
    return Encoded(input_ids=ids, score_start=starts, n_truncated=n_trunc)
