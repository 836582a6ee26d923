"""Reproduce the paper's semi-synthetic confounding result (docs/validity.md).

f_0, SFT-all, SFT-top, OO-RLHF, CPO and DR-CPO on the demo's corpus (known oracle g*) at
several confounding levels x seeds; every model's generations are scored by g*. Writes
``benchmarks/results/<tag>.{md,json,png}``: per level and method the mean gain over f_0
with a 95% interval across seeds, runs whose importance weights collapsed marked.

    python benchmarks/reproduce.py                      # 3 levels x 3 seeds (default size)
    python benchmarks/reproduce.py --quick              # smaller corpus and runs
    python benchmarks/reproduce.py --remedies none,kl,clipped,lennorm   # remedy comparison

With ``--emobank PATH`` the corpus is EmoBank with genre as the confounder and the judge is
VADER (see benchmarks/reproduce_emobank.py, which sets that up).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cpo_fast.objectives import METHODS

RESULTS = Path(__file__).resolve().parent / "results"

# Default size: the demo's --quick settings (2000 rows, f_0 200 steps, 50 policy steps).
SIZES = {
    "default": dict(rows=2000, config=dict(f0_steps=200, steps=50, num_samples=256,
                                           dm_size=512, bootstrap=300)),
    "quick": dict(rows=600, config=dict(f0_steps=60, steps=15, num_samples=64, dm_size=128,
                                        batch_size=32, dm_batch_size=32, bootstrap=100,
                                        vocab_size=400)),
}


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller corpus and shorter runs")
    p.add_argument("--levels", type=_floats, default=None,
                   help="confounding levels (default 0,0.5,0.8)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--remedies", default="none",
                   help="comma-separated, for OO-RLHF/CPO/DR-CPO: none, kl, clipped, lennorm")
    p.add_argument("--remedy-methods", default="oo_rlhf,cpo,dr_cpo",
                   help="the methods the remedies are tried on (the others: none)")
    p.add_argument("--rows", type=int, default=None, help="corpus rows (overrides the size)")
    p.add_argument("--steps", type=int, default=None, help="policy steps (overrides the size)")
    p.add_argument("--f0-steps", type=int, default=None, help="f_0 SFT steps (overrides the size)")
    p.add_argument("--workers", type=int, default=2, help="cells run in parallel")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--work-dir", default="runs/reproduce", help="models and logs go here")
    p.add_argument("--tag", default=None, help="results file name (default reproduce[-quick])")
    p.add_argument("--collect", action="store_true",
                   help="no training: summarize the cells already finished under --work-dir")
    p.add_argument("--emobank", default=None, help=argparse.SUPPRESS)
    return p


def collect(jobs: list[dict]) -> list[dict]:
    """The records of the cells that finished (``records.json`` in each cell's folder)."""
    import json

    recs = []
    for j in jobs:
        p = Path(j["out"]) / "records.json"
        if p.is_file():
            recs += json.loads(p.read_text())
        else:
            print(f"[reproduce] --collect: cell level={j['level']} seed={j['seed']} not "
                  "finished; left out")
    if not recs:
        raise SystemExit("--collect: no finished cell under --work-dir")
    return recs


def main(argv: list[str] | None = None) -> dict[str, Path]:
    from cpo_fast.bench.sweep import REMEDIES, run_sweep, write_results

    a = parser().parse_args(argv)
    size = SIZES["quick" if a.quick else "default"]
    config = dict(size["config"])
    if a.steps:
        config["steps"] = a.steps
    if a.f0_steps:
        config["f0_steps"] = a.f0_steps
    remedies = [r.strip() for r in a.remedies.split(",") if r.strip()]
    bad = [r for r in remedies if r not in REMEDIES]
    if bad:
        raise SystemExit(f"--remedies: {bad} not in {sorted(REMEDIES)}")
    emobank = a.emobank is not None
    if emobank:
        config.update(max_tokens=48, max_new_tokens=40, vocab_size=1000 if not a.quick else 500)
    levels = a.levels or [0.0, 0.5, 0.8]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    tag = a.tag or ("emobank" if emobank else "reproduce") + ("-quick" if a.quick else "")
    jobs = [dict(corpus="emobank" if emobank else "synthetic", data_path=a.emobank,
                 level=lv, seed=sd, rows=a.rows or size["rows"], config=config, methods=methods,
                 remedies=remedies, remedy_methods=a.remedy_methods.split(","),
                 out=str(Path(a.work_dir) / tag / f"c{lv:g}_s{sd}"))
            for lv in levels for sd in seeds]
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    if a.collect:
        recs = collect(jobs)
        ends = [r["t_end"] for r in recs if "t_end" in r]  # first start to last end
        wall = (max(ends) - min(r["t_start"] for r in recs if "t_start" in r)) if ends else 0.0
    else:
        recs = run_sweep(jobs, workers=a.workers)
        wall = time.perf_counter() - t0
    meta = {"wall_s": round(wall, 1), "collected": a.collect, "workers": a.workers, "cpus": os.cpu_count(),
            "loadavg_start": load0, "rows": jobs[0]["rows"], "levels": levels, "seeds": seeds,
            "remedies": remedies, "config": config, "quick": a.quick}
    judge = "VADER compound sentiment" if emobank else "oracle g*"
    title = ("EmoBank, genre-confounded: gain over f_0" if emobank else
             "Semi-synthetic confounding sweep: oracle gain over f_0")
    paths = write_results(recs, a.out, tag, title=title, judge=judge, meta=meta)
    print(Path(paths["md"]).read_text())
    print(f"[reproduce] {wall:.0f}s wall; wrote {', '.join(str(p) for p in paths.values())}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
