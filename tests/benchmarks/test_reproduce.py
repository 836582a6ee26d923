"""benchmarks/reproduce.py --quick on a tiny size (the semi-synthetic sweep, docs/validity.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import ROOT


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    if not path.exists():
        pytest.skip("benchmarks/ not in this checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproduce_quick_tiny(tmp_path):
    mod = _load("reproduce")
    paths = mod.main(["--quick", "--levels", "0,0.8", "--seeds", "0", "--methods",
                      "sft_top,dr_cpo", "--rows", "160", "--steps", "2", "--f0-steps", "4",
                      "--workers", "1", "--out", str(tmp_path / "res"),
                      "--work-dir", str(tmp_path / "work"), "--tag", "t"])
    data = json.loads(Path(paths["json"]).read_text())
    recs = data["records"]
    assert {(r["level"], r["method"]) for r in recs} == {
        (lv, m) for lv in (0.0, 0.8) for m in ("f_0", "sft_top", "dr_cpo")}
    for r in recs:
        assert 1.0 <= r["judge"] <= 5.0 and "collapsed" in r and "ghat_outside" in r
    md = Path(paths["md"]).read_text()
    assert "| DR-CPO |" in md and "confounding 0.8" in md
    assert Path(paths["png"]).stat().st_size > 1000
    assert data["meta"]["wall_s"] > 0
