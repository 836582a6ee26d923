"""The embedded demo's parts (cpo_fast/pipeline/report/demo.py) on their own: the settings it
runs with (full, --quick, --model, overrides), what it refuses before writing anything, the
results table it prints, and the VADER judge. The whole demo runs end to end in
tests/test_cli.py (test_tiny_demo, test_refused_demo_leaves_its_directory_as_it_was)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cpo_fast.objectives import METHODS
from cpo_fast.pipeline.report import demo
from cpo_fast.pipeline.report.demo import (
    DEMO_DEFAULTS,
    MODEL_DEFAULTS,
    MODEL_QUICK,
    QUICK,
    demo_config,
    format_table,
    run_demo,
)


def test_demo_config_layers_quick_model_and_overrides(tmp_path):
    full = demo_config(tmp_path)
    assert full.steps == DEMO_DEFAULTS["steps"] and full.base_model is None
    assert full.data == str(tmp_path / "corpus.csv") and full.output_dir == str(tmp_path)
    quick = demo_config(tmp_path, quick=True)
    assert (quick.steps, quick.f0_steps) == (QUICK["steps"], QUICK["f0_steps"])
    assert quick.hidden_size == DEMO_DEFAULTS["hidden_size"]  # QUICK changes only its keys
    model = demo_config(tmp_path, quick=True, model="some/dir")
    assert model.base_model == "some/dir" and model.steps == MODEL_QUICK["steps"]
    assert model.max_tokens == MODEL_DEFAULTS["max_tokens"] and model.f0_lr == MODEL_DEFAULTS["f0_lr"]
    # a flag the user gave wins; a flag left unset (None) keeps the demo's value
    over = demo_config(tmp_path, quick=True, steps=7, lr=None)
    assert over.steps == 7 and over.lr == DEMO_DEFAULTS["lr"]


def test_demo_config_refuses_data(tmp_path):
    with pytest.raises(ValueError, match="--data is not used .* `cpo-fast train --data"):
        demo_config(tmp_path, data="mine.csv")


def test_unknown_method_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(ValueError, match=r"--methods: \['dpo'\] not in"):
        run_demo(out, quick=True, methods=("cpo", "dpo"), print_fn=lambda *_: None)
    assert not out.exists()


def _row(model: str, mean: float, **extra) -> dict:
    ci = {"mean": mean, "lo": mean - 0.1, "hi": mean + 0.1}
    return {"model": model, "oracle": ci, "ghat": dict(ci), "distinct": 0.9, "off_policy": {},
            "ghat_outside": 0.25, "judge": None, "collapsed": False, **extra}


def test_format_table_rows_deltas_and_flags():
    table = [_row("f_0", 3.0),
             _row("CPO", 3.25, off_policy={"snips": {"estimate": 3.2}}),
             _row("DR-CPO", 3.5, collapsed=True, ghat=None, ghat_outside=None,
                  off_policy={"dr_snips": {"estimate": 3.4}, "reliable": False})]
    text = format_table(table, 12.4)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["model", "oracle"] and "VADER" not in lines[0]
    f0, cpo, dr = lines[2], lines[3], lines[4]
    assert f0.startswith("f_0 ") and "3.000 [2.900, 3.100]" in f0 and "+" not in f0
    assert "+0.250" in cpo and "25%" in cpo and "3.200" in cpo  # delta, outside, SNIPS
    assert "+0.500!" in dr and "unreliable" in dr and " - " in dr  # collapsed, no ghat
    assert "higher is better; run time 12s" in text
    assert "!: the importance weights collapsed" in text
    assert "unreliable: the held-out rows' importance weights collapsed" in text
    assert "lower is better" in format_table(table[:1], 1.0, higher_is_better=False)


def test_format_table_judge_column_only_when_judged():
    judged = [_row("f_0", 3.0, judge={"mean": 0.125, "lo": -0.5, "hi": 0.75}), _row("CPO", 3.1)]
    text = format_table(judged, 1.0)
    assert "VADER judge (95% CI)" in text.splitlines()[0]
    assert "+0.125 [-0.500, +0.750]" in text
    assert text.splitlines()[3].rstrip().endswith("-")  # CPO: not judged


def test_methods_and_plots_read_the_method_table(tmp_path, monkeypatch):
    """_plots draws the weight histogram for the weighted methods only, labelled as the
    method table labels them."""
    calls = {}
    monkeypatch.setattr(demo, "training_curves", lambda runs, path, guard: calls.update(curves=runs))
    monkeypatch.setattr(demo, "weight_histogram", lambda runs, path: calls.update(weights=runs))
    monkeypatch.setattr(demo, "outcome_bars", lambda *a, **k: None)
    demo._plots(tmp_path, tuple(METHODS), {}, guard=0.1)
    assert list(calls["curves"]) == [m.label for m in METHODS.values()]
    assert sorted(calls["weights"]) == sorted(m.label for m in METHODS.values() if m.weighted)
    assert calls["curves"]["DR-CPO"] == Path(tmp_path) / "dr_cpo" / "metrics.jsonl"


@pytest.mark.skipif(importlib.util.find_spec("vaderSentiment") is None,
                    reason="vaderSentiment not installed (the --model demo's judge)")
def test_vader_scores_sentiment_in_minus_one_to_one():
    good, bad, flat = demo.vader(["What a wonderful, happy day!", "This is awful and sad.",
                                  "The table is in the room."])
    assert 0 < good <= 1 and -1 <= bad < 0 and flat == 0
