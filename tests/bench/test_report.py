"""The human-readable tables of a ``cpo-fast bench`` record (cpo_fast/bench/report.py): the
header (settings, device, versions, load), each op-level and end-to-end row's cells (median
[p20, p80], the ratios, peak MiB, or the row's status when it did not run), the end-to-end
section only when there are end-to-end rows, and columns aligned."""

from __future__ import annotations

import re

from cpo_fast.bench.measure import MiB
from cpo_fast.bench.report import render


def _record(e2e=True, frozen=False):
    op = [
        {"variant": "eager", "status": "ok", "median_ms": 10.0, "p20_ms": 9.5, "p80_ms": 10.44,
         "speedup_vs_eager": 1.0, "peak_extra_bytes": 8 * MiB, "mem_vs_eager": 1.0},
        {"variant": "cpo_fast-linear", "status": "ok", "median_ms": 4.0, "p20_ms": 3.96,
         "p80_ms": 4.26, "speedup_vs_eager": 2.5, "peak_extra_bytes": 2 * MiB, "mem_vs_eager": 0.25},
        {"variant": "trl-selective", "status": "skipped: trl not installed"},
        {"variant": "cpo_fast-logits", "status": "ok", "median_ms": 5.0, "p20_ms": 5.0,
         "p80_ms": 5.0, "peak_extra_bytes": None},
    ]
    rows = [
        {"path": "eager", "layers": 2, "finetune": "lora" if frozen else "full", "batch": 2,
         "seq": 256, "status": "ok", "median_ms": 100.0, "p20_ms": 90.0, "p80_ms": 110.0,
         "tokens_per_s": 5120.4, "speedup_vs_eager": 1.0, "peak_extra_bytes": 100 * MiB,
         "mem_vs_eager": 1.0},
        {"path": "cpo_fast", "layers": 2, "finetune": "full", "batch": 2, "seq": 256,
         "status": "ok", "median_ms": 50.0, "p20_ms": 45.0, "p80_ms": 55.0, "tokens_per_s": 10240.0,
         "speedup_vs_eager": 2.0, "peak_extra_bytes": -3, "mem_vs_eager": 0.5},
        {"path": "trl-fused-head", "status": "error: boom"},
    ]
    return {"settings": {"vocab": 32000, "hidden": 256, "tokens": 512, "dtype": "bf16",
                         "frozen_head": frozen},
            "environment": {"device": "Test CPU (2 cores)", "torch": "2.13.0", "trl": "1.16.0",
                            "loadavg_before": [1.234, 0.5, 0.1]},
            "op": op, "e2e": rows if e2e else []}


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _table_after(lines: list[str], header_start: str) -> list[list[str]]:
    i = next(k for k, ln in enumerate(lines) if ln.startswith(header_start))
    out = []
    for ln in lines[i:]:
        if not ln:
            break
        out.append(ln)
    return out


def test_header_line():
    text = render(_record())
    first = text.splitlines()[0]
    assert first == ("cpo-fast bench: V=32000, d=256, N=512, bf16, head trained, on Test CPU "
                     "(2 cores) (torch 2.13.0, trl 1.16.0; load 1.23)")
    assert "head frozen" in render(_record(frozen=True)).splitlines()[0]


def test_op_rows():
    table = _table_after(render(_record()).splitlines(), "variant")
    assert _cells(table[0]) == ["variant", "ms [p20, p80]", "vs eager", "peak extra MiB",
                                "mem vs eager"]
    assert set(table[1]) <= {"-", " "}
    rows = {(_cells(r)[0]): _cells(r) for r in table[2:]}
    assert list(rows) == ["eager", "cpo_fast-linear", "trl-selective", "cpo_fast-logits"]
    assert rows["eager"] == ["eager", "10.0 [9.5, 10.4]", "1.00x", "8.0", "1.00"]
    assert rows["cpo_fast-linear"] == ["cpo_fast-linear", "4.0 [4.0, 4.3]", "2.50x", "2.0", "0.25"]
    assert rows["trl-selective"] == ["trl-selective", "skipped: trl not installed", "-", "-", "-"]
    assert rows["cpo_fast-logits"] == ["cpo_fast-logits", "5.0 [5.0, 5.0]", "-", "-", "-"]


def test_e2e_rows():
    lines = render(_record()).splitlines()
    assert ("end to end: one training step (fwd, bwd, AdamW) of a 2-layer Llama-config model, "
            "full fine-tuning, batch 2 x 256 tokens") in lines
    table = _table_after(lines, "path")
    assert _cells(table[0]) == ["path", "step ms [p20, p80]", "tokens/s", "vs eager",
                                "peak extra MiB", "mem vs eager"]
    rows = {_cells(r)[0]: _cells(r) for r in table[2:]}
    assert rows["eager"] == ["eager", "100.0 [90.0, 110.0]", "5120", "1.00x", "100.0", "1.00"]
    assert rows["cpo_fast"] == ["cpo_fast", "50.0 [45.0, 55.0]", "10240", "2.00x", "0.0", "0.50"]
    assert rows["trl-fused-head"] == ["trl-fused-head", "error: boom", "-", "-", "-", "-"]


def test_no_e2e_section_without_e2e_rows():
    text = render(_record(e2e=False))
    assert "end to end" not in text and "tokens/s" not in text
    assert text.splitlines()[-1].startswith("cpo_fast-logits")


def test_columns_aligned():
    for start in ("variant", "path"):
        table = _table_after(render(_record()).splitlines(), start)
        rule = table[1]
        # every cell starts where the rule's dashes of its column start
        starts = [m.start() for m in re.finditer(r"-+", rule)]
        for ln in [table[0], *table[2:]]:
            for s in starts:
                assert s == 0 or ln[s - 2:s] == "  " and ln[s] != " ", (ln, s)
        assert all(ln == ln.rstrip() for ln in table)
