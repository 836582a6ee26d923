"""benchmarks/reproduce_real.py's pieces (distinct-n, the two-level bootstrap, the summary,
resuming finished cells) on small made-up inputs, and a tiny end-to-end run with resume."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import EMOBANK, ROOT


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _reproduce_real():
    spec = importlib.util.spec_from_file_location("reproduce_real",
                                                  ROOT / "benchmarks" / "reproduce_real.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_distinct_n_and_bootstrap():
    rr = _reproduce_real()
    assert rr.distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert rr.distinct_n(["a b c", "d e f"], 2) == 1.0 and rr.distinct_n([""], 2) == 0.0
    # no noise: the interval is the point; a paired gain of exactly +1
    one = [(np.full(8, 2.0), np.full(8, 1.0))] * 3
    assert rr.two_level_bootstrap(one, n_boot=50) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    cells = [(rng.normal(0.5, 1, 64), rng.normal(0, 1, 64)) for _ in range(3)]
    m, lo, hi = rr.two_level_bootstrap(cells, n_boot=400)
    assert lo < m < hi and lo < 0.5 < hi
    # one seed: the sample noise alone still gives an interval
    m1, lo1, hi1 = rr.two_level_bootstrap(cells[:1], n_boot=400)
    assert lo1 < m1 < hi1


def test_summarize_pairs_gains_by_seed():
    rr = _reproduce_real()
    recs = []
    for seed, base in ((0, 0.0), (1, 1.0)):
        for m, shift in (("f_0", 0.0), ("cpo", 0.5)):
            recs.append({"dataset": "emobank", "level": 0.8, "seed": seed, "method": m,
                         "scores": {"vader": [base + shift] * 4}, "collapsed": m == "cpo",
                         "off_policy": {"snips": {"estimate": base, "lo": base, "hi": base}}})
    rows = rr.summarize(recs, ["vader"])
    cpo = next(r for r in rows if r["method"] == "cpo")
    assert cpo["vader_gain"] == (0.5, 0.5, 0.5)  # the seeds' different baselines cancel
    assert cpo["collapsed"] == 2 and cpo["snips"]["estimate"] == 0.5
    md = rr.markdown(rows, ["vader"], {}, {"model": "m"}, None)
    assert "+0.500 [+0.500, +0.500]*" in md


def test_finished_cells_are_not_rerun(tmp_path):
    rr = _reproduce_real()
    cells = tmp_path / "cells"
    cells.mkdir()
    for m in ("f_0", "cpo"):
        (cells / f"{rr.cell_name('emobank', 0.8, 3, m)}.json").write_text(
            json.dumps({"method": m, "seed": 3}))
    job = dict(cells=str(cells), dataset="emobank", level=0.8, seed=3, methods=["f_0", "cpo"],
               out=str(tmp_path / "stages"))
    # every cell is on disk: nothing is loaded or trained (the job lacks what training needs)
    recs = rr.run_group(job, {})
    assert sorted(r["method"] for r in recs) == ["cpo", "f_0"]


@pytest.mark.skipif(not EMOBANK.is_file(), reason="EmoBank absent (../shared/data)")
@pytest.mark.skipif(not _has("vaderSentiment"), reason="vaderSentiment absent")
def test_reproduce_real_tiny_end_to_end_and_resume(tmp_path):
    """A tiny from-scratch model through every method, twice: the second run trains
    nothing; a deleted cell is the only one redone."""
    rr = _reproduce_real()
    args = ["--model", "scratch", "--judges", "vader", "--levels", "0.8", "--seeds", "0",
            "--methods", "sft_all,cpo,dr_cpo", "--rows", "60", "--no-progress",
            "--out", str(tmp_path / "res"), "--work-dir", str(tmp_path / "work")]
    out = rr.main(args)
    cells = sorted((tmp_path / "work" / "real" / "cells").glob("*.json"))
    assert [c.stem.rsplit("_s0_", 1)[1] for c in cells] == ["cpo", "dr_cpo", "f_0", "sft_all"]
    dr = next(r for r in out["summary"] if r["method"] == "dr_cpo")
    assert dr["vader_gain"] is not None and dr["min_dm_ess_share"] is not None
    assert (tmp_path / "res" / "real.md").read_text().count("| DR-CPO |") == 2
    stamps = {c.name: c.stat().st_mtime_ns for c in cells}
    cells[0].unlink()  # the cpo cell
    rr.main(args)
    after = {c.name: c.stat().st_mtime_ns for c in sorted(cells[0].parent.glob("*.json"))}
    assert set(after) == set(stamps)
    assert [n for n in after if after[n] != stamps[n]] == [cells[0].name]
    # a remedy under its own tag: the same shared stages, f_0's cell reused (not re-evaluated)
    f0 = json.loads(next(c for c in cells if c.stem.endswith("f_0")).read_text())
    rem = list(args)
    rem[rem.index("--methods") + 1] = "dr_cpo"
    rr.main([*rem, "--tag", "tempered", "--remedy", '{"ess_target": 0.9}'])
    tcells = tmp_path / "work" / "tempered" / "cells"
    assert json.loads(next(tcells.glob("*f_0.json")).read_text()) == f0
    tdr = json.loads(next(tcells.glob("*dr_cpo.json")).read_text())
    assert tdr["remedy"] == {"ess_target": 0.9} and tdr["batch_rows"] == 8
    assert tdr["min_ess_rows"] >= 0.9 * 8 * (1 - 1e-6) and tdr["mean_tau"] is not None
    cmp = rr.main([*rem, "--tag", "remedies", "--compare", "real,tempered"])["compare"]
    assert [(r["tag"], r["method"]) for r in cmp] == [
        ("real", "f_0"), ("real", "dr_cpo"), ("tempered", "dr_cpo")]  # f_0's scores first
    md = (tmp_path / "res" / "remedies.md").read_text()
    assert "ess_target=0.9 (tempered)" in md and "none (real)" in md
