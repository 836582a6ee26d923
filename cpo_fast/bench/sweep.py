"""Sweeps over confounding levels x seeds x methods (x remedies), judged by an independent
scorer: the engine of ``benchmarks/reproduce.py`` (semi-synthetic, oracle g*) and
``benchmarks/reproduce_emobank.py`` (EmoBank, VADER; cpo_fast.bench.emobank).

One *cell* is one (confounding level, seed): a corpus, f_0, ghat and the DM set are built
once, then every method (and, for the weighted methods, every remedy) is trained from f_0
and its generations are scored. Cells are independent and run in worker processes. The
summary gives, per level and method, the mean score over seeds and the mean gain over f_0
(paired by seed) with 95% t-intervals across seeds, and marks runs whose importance
weights collapsed (the ESS guard fired) next to their gain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from cpo_fast.bench.emobank import confounded_emobank, vader, write_table
from cpo_fast.constants import ESS_TARGET
from cpo_fast.objectives import METHODS, method_of
from cpo_fast.pipeline.report.demo import demo_config
from cpo_fast.pipeline.report.evaluate import evaluate_model
from cpo_fast.pipeline.report.plots import save, subplots
from cpo_fast.pipeline.stages.synthetic import make_corpus, oracle
from cpo_fast.pipeline.training.loop import train_policy
from cpo_fast.pipeline.training.prepare import prepare

WEIGHTED = tuple(name for name, m in METHODS.items() if m.weighted)
# Remedies for weight collapse the method allows (docs/validity.md), as config overrides.
# Each alone: the default tempering (constants.ESS_TARGET) is off except in "temper".
REMEDIES: dict[str, dict[str, Any]] = {
    "none": {"ess_target": 0.0},
    "kl": {"kl_coef": 0.2, "ess_target": 0.0},  # KL to f_0 on the DM set (outcome rows for CPO)
    "clipped": {"weighting": "clipped", "ess_target": 0.0},  # PPO-style trust region per row
    "lennorm": {"length_normalize": True, "ess_target": 0.0},  # per-token (geometric-mean) weights
    "cap": {"log_weight_cap": 1.4, "ess_target": 0.0},  # log-weight cap: ESS >= 21.6% by construction
    "temper": {"ess_target": ESS_TARGET},  # ESS-targeted tempering (the training default)
}


def min_ess_share(cap: float) -> float:
    """The smallest ESS / n that self-normalized weights under the log-weight cap can have.

    The cap (``--log-weight-cap``, cpo_fast.objectives.cap_log_weights; docs/validity.md)
    bounds each row's log weight to the batch median +- cap, so the weights differ by at
    most a factor r = exp(2 cap), and ESS / n >= 4 r / (1 + r)^2 (Kantorovich's inequality,
    a two-point worst case): cap 0.7 gives ESS >= 63% of the batch, cap 1.4 (the "cap"
    remedy above) 21.6%, above the ESS guard's 10%. The bound is on the weights actually
    used: a capped run can still drift far from f_0, which is why the sweep measures it.
    """
    r = math.exp(2.0 * cap)
    return 4.0 * r / (1.0 + r) ** 2
NAMES = {"f_0": "f_0", **{name: m.label for name, m in METHODS.items()}}
# t_{0.975, df} for df = 1..10 (95% two-sided intervals over a few seeds)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _corpus(job: dict[str, Any]):
    if job["corpus"] == "synthetic":
        return make_corpus(job["rows"], confounding=job["level"], noise=job.get("noise", 0.5),
                           seed=job["seed"])

    return confounded_emobank(job["data_path"], confounding=job["level"], rows=job["rows"],
                              seed=job["seed"])


def _scorers(job: dict[str, Any]):
    if job["corpus"] == "synthetic":
        return {"judge": oracle}

    return {"judge": vader}


def _record(res: dict, **extra: Any) -> dict[str, Any]:
    tr = res.get("train") or {}
    sup = res.get("ghat_support") or {}
    return {**extra, "judge": res["judge"]["mean"], "judge_lo": res["judge"]["lo"],
            "judge_hi": res["judge"]["hi"], "ghat": (res.get("ghat") or {}).get("mean"),
            "ghat_outside": sup.get("ood_share"), "ghat_clipped": sup.get("clipped_share"),
            "distinct": res.get("distinct_fraction"), "mean_tokens": res.get("mean_tokens"),
            "collapsed": bool(tr.get("weights_collapsed", False)),
            "collapse_step": tr.get("collapse_step"),
            "min_ess_share": tr.get("min_ess_share"), "min_dm_ess_share": tr.get("min_dm_ess_share"),
            "final_ess": tr.get("ess"), "final_dm_ess": tr.get("dm_ess"),
            "dm_max_weight_share": tr.get("dm_max_weight_share")}


def run_cell(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Train and score every method (x remedy) of one (level, seed); returns records."""
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0, started = time.perf_counter(), time.time()
    table = _corpus(job)
    write_table(table, out / "corpus.csv")
    cfg = demo_config(out, seed=job["seed"], progress=False, **job["config"])
    methods = job["methods"]
    prep = prepare(cfg, need_dm=any(method_of(m).dm_rows for m in methods))
    scorers = _scorers(job)
    base = dict(level=job["level"], seed=job["seed"])
    res = evaluate_model(prep, prep.load_f0(), name="f_0", scorers=scorers)
    recs = [_record(res, **base, method="f_0", remedy="-", train_s=0.0,
                    prepare_s=time.perf_counter() - t0, ghat_r2=prep.outcome_fit.r2,
                    dm_outside=(prep.dm_support or {}).get("ood_share"))]
    for m in methods:
        rems = job["remedies"] if m in job.get("remedy_methods", WEIGHTED) else ["none"]
        for rem in (rems if m in WEIGHTED else ["-"]):
            mcfg = dataclasses.replace(cfg, method=m, **REMEDIES.get(rem, {})).validate()
            t1 = time.perf_counter()
            with warnings.catch_warnings(record=True):  # the guard's warning is in the record
                warnings.simplefilter("always")
                policy, summary = train_policy(prep, mcfg, out_dir=out / f"{m}_{rem}")
            ts = time.perf_counter() - t1
            res = evaluate_model(prep, policy, name=m, scorers=scorers)
            res["train"] = summary
            recs.append(_record(res, **base, method=m, remedy=rem, train_s=ts,
                                steps_done=summary.get("steps_done")))
            del policy
    for r in recs:
        r.update(cell_s=time.perf_counter() - t0, t_start=started, t_end=time.time())
    (out / "records.json").write_text(json.dumps(recs, indent=2))
    return recs


def run_sweep(jobs: list[dict[str, Any]], workers: int = 1, log=print) -> list[dict[str, Any]]:
    """Run the cells (``workers`` processes; 1: in this process); all records."""
    recs: list[dict[str, Any]] = []
    if workers <= 1:
        for j in jobs:
            recs += run_cell(j)
            log(f"[sweep] cell level={j['level']} seed={j['seed']} done")
        return recs
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
        for j, r in zip(jobs, ex.map(run_cell, jobs), strict=True):
            recs += r
            log(f"[sweep] cell level={j['level']} seed={j['seed']} done "
                f"({r[-1]['cell_s']:.0f}s)")
    return recs


# --------------------------------------------------------------------------- summary

def t_interval(x: list[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): the 95% t-interval of the mean over seeds (lo = hi = mean for one)."""
    a = np.asarray(x, np.float64)
    m = float(a.mean())
    if a.size < 2:
        return m, m, m
    t = _T975[a.size - 2] if a.size - 1 <= len(_T975) else 1.96
    h = t * float(a.std(ddof=1)) / math.sqrt(a.size)
    return m, m - h, m + h


def label(method: str, remedy: str, remedies: list[str]) -> str:
    name = NAMES.get(method, method)
    return name if remedy == "-" or len(remedies) == 1 else f"{name} [{remedy}]"


def summarize(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (level, method, remedy): judge mean and gain over f_0 with intervals."""
    remedies = sorted({r["remedy"] for r in recs if r["remedy"] != "-"})
    f0 = {(r["level"], r["seed"]): r["judge"] for r in recs if r["method"] == "f_0"}
    keys = list(dict.fromkeys((r["level"], r["method"], r["remedy"]) for r in recs))
    rows = []
    for lev, m, rem in keys:
        rs = [r for r in recs if (r["level"], r["method"], r["remedy"]) == (lev, m, rem)]
        score = t_interval([r["judge"] for r in rs])
        gain = t_interval([r["judge"] - f0[(lev, r["seed"])] for r in rs])
        ghat = [r["ghat"] for r in rs if r["ghat"] is not None]
        out = [r["ghat_outside"] for r in rs if r["ghat_outside"] is not None]
        rows.append({"level": lev, "method": m, "remedy": rem,
                     "label": label(m, rem, remedies), "seeds": len(rs),
                     "score": score, "gain": gain, "collapsed": sum(r["collapsed"] for r in rs),
                     "ghat": float(np.mean(ghat)) if ghat else None,
                     "ghat_outside": float(np.mean(out)) if out else None,
                     "distinct": float(np.mean([r["distinct"] for r in rs])),
                     "train_s": float(np.mean([r.get("train_s", 0.0) for r in rs]))})
    return rows


def _fmt(v: tuple[float, float, float], signed: bool = False) -> str:
    s = "+" if signed else ""
    return f"{v[0]:{s}.3f} [{v[1]:{s}.3f}, {v[2]:{s}.3f}]"


def markdown(rows: list[dict[str, Any]], *, title: str, judge: str, meta: dict[str, Any]) -> str:
    """The results page: gains over f_0 per level (collapse-marked), then the details."""
    levels = sorted({r["level"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["level"], r["label"]): r for r in rows}
    lines = [f"# {title}", "", f"Judge: {judge}. Gain = the judge's mean over a model's "
             "generations minus f_0's, paired by seed; mean over seeds with a 95% t-interval "
             "across seeds. `(k/n collapsed)`: in k of n seeds the ESS guard fired (outcome or "
             "DM-set ESS below its threshold): read that gain with care.", "",
             "| method | " + " | ".join(f"confounding {lv:g}" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for lab in labels:
        cells = []
        for lv in levels:
            r = by.get((lv, lab))
            if r is None:
                cells.append("")
                continue
            if r["method"] == "f_0":
                cells.append(f"{r['score'][0]:.3f} (score)")
                continue
            mark = f" ({r['collapsed']}/{r['seeds']} collapsed)" if r["collapsed"] else ""
            cells.append(_fmt(r["gain"], signed=True) + mark)
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "Details (per level and method: judge score, ghat's own score of the "
              "generations, the share of generations outside ghat's support, distinct "
              "generations, training seconds):", "",
              "| level | method | judge [95% CI] | ghat | outside | distinct | train s |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = "-" if r["ghat"] is None else f"{r['ghat']:.3f}"
        o = "-" if r["ghat_outside"] is None else f"{r['ghat_outside']:.0%}"
        lines.append(f"| {r['level']:g} | {r['label']} | {_fmt(r['score'])} | {g} | {o} | "
                     f"{r['distinct']:.2f} | {r['train_s']:.0f} |")
    lines += ["", "Run: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path, *, judge: str) -> Path:
    """Grouped bars: gain over f_0 per level and method, 95% intervals; hatched bars had a
    collapse in at least one seed."""
    levels = sorted({r["level"] for r in rows})
    labels = [lab for lab in dict.fromkeys(r["label"] for r in rows) if lab != "f_0"]
    by = {(r["level"], r["label"]): r for r in rows}
    fig, ax = subplots(figsize=(max(6, 1.6 * len(levels) * len(labels) / 3), 4.2))
    w = 0.8 / max(1, len(labels))
    for j, lab in enumerate(labels):
        xs, ms, err, hatch = [], [], [[], []], []
        for i, lv in enumerate(levels):
            r = by.get((lv, lab))
            if r is None:
                continue
            m, lo, hi = r["gain"]
            xs.append(i + (j - (len(labels) - 1) / 2) * w)
            ms.append(m)
            err[0].append(m - lo)
            err[1].append(hi - m)
            hatch.append(r["collapsed"] > 0)
        bars = ax.bar(xs, ms, w, yerr=err, capsize=3, label=lab, color=f"C{j}")
        for b, h in zip(bars, hatch, strict=True):
            if h:
                b.set_hatch("//")
    ax.axhline(0, color="0.3", lw=1)
    ax.set_xticks(range(len(levels)), [f"confounding {lv:g}" for lv in levels])
    ax.set(ylabel=f"gain over f_0 in {judge} (95% CI over seeds)",
           title="gain over f_0 (hatched: weights collapsed in some seed)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def write_results(recs: list[dict[str, Any]], out_dir: str | Path, tag: str, *, title: str,
                  judge: str, meta: dict[str, Any]) -> dict[str, Path]:
    """``<tag>.json`` (records, summary, run facts), ``<tag>.md`` and ``<tag>.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(recs)
    meta = {**meta, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    paths = {"json": out / f"{tag}.json", "md": out / f"{tag}.md", "png": out / f"{tag}.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "summary": rows, "records": recs},
                                        indent=2, default=float))
    paths["md"].write_text(markdown(rows, title=title, judge=judge, meta=meta))
    plot(rows, paths["png"], judge=judge)
    return paths
