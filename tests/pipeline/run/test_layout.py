"""Where a run keeps what (cpo_fast/pipeline/run/layout.py): one place for every path."""

from __future__ import annotations

from pathlib import Path

from cpo_fast.pipeline.run.layout import RunLayout


def test_paths_under_the_run_folder():
    lay = RunLayout("runs/x")
    assert lay.root == Path("runs/x") and RunLayout(Path("runs/x")) == lay
    assert (lay.config, lay.prepare, lay.tokenizer, lay.f0, lay.cache, lay.outcome_model) == tuple(
        Path("runs/x") / n for n in ("config.json", "prepare.json", "tokenizer", "f0", "cache",
                                     "outcome_model.json"))
    assert lay.method("dr_cpo") == Path("runs/x/dr_cpo")
    assert lay.eval("f_0") == Path("runs/x/eval/f_0.json")
    assert lay.samples("cpo") == Path("runs/x/samples/cpo.jsonl")
    assert lay.dm_set("f0_completions", "ab12") == Path("runs/x/dm_f0_completions_ab12.jsonl")
