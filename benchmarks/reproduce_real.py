"""The paper's experiment on a real pretrained model: SmolLM2-135M on genre-confounded EmoBank.

Design (docs/validity.md, "On a real model"): EmoBank sentences with valence as the outcome,
selected with the genre confounding of benchmarks/reproduce_emobank.py
(cpo_fast/bench/emobank.py) at levels 0 and 0.8. The base model is the packaged
SmolLM2-135M (cpo_fast.pretrained); **f_0 is the base model fitted to the corpus texts**
(LoRA SFT, merged: the paper's first definition of f_0), from which SFT-all, SFT-top,
OO-RLHF, CPO and DR-CPO each train LoRA adapters. Every model's generations are scored by
judges that neither ghat nor any training row shaped (cpo_fast.judges): VADER, TextBlob and
all-MiniLM-L6-v2 with a ridge head fitted on Hutto & Gilbert's human ratings (disjoint from
EmoBank). ghat never judges. Each gain over f_0 has a 95% interval from a two-level bootstrap
(seeds, then each model's samples within a seed); ESS, DM ESS, the share of generations
outside ghat's support, distinct-1/2 and mean generation length sit beside it, and the
held-out off-policy estimates (SNIPS, self-normalized DR) beside the judges.

    bash scripts/fetch_judge_data.sh                   # once: the MiniLM head's rated texts
    python benchmarks/reproduce_real.py --quick        # 1 seed per level, small (<= ~15 min)
    python benchmarks/reproduce_real.py                # 3 seeds per level (<= ~2 h)
    python benchmarks/reproduce_real.py --collect      # tables from the cells done so far
    python benchmarks/reproduce_real.py --levels 0.8 --methods dr_cpo --tag r-cap \
        --remedy '{"log_weight_cap": 1.0, "ess_target": 0}'   # one remedy alone, own tag
    python benchmarks/reproduce_real.py --levels 0.8 --tag real-remedies \
        --compare r-none,r-temper,r-cap                # one table over the remedy tags

Resumable: each (dataset, level, seed, method) cell is written to
``<work-dir>/<tag>/cells/<dataset>_c<level>_s<seed>_<method>.json`` when it finishes and is
skipped when the script runs again; the shared stages of a (level, seed) (f_0, reference
cache, ghat, DM set) are reused from disk, by every tag of the same size
(``<work-dir>/stages/``), so remedies compared under different tags train from the same
f_0. Results: ``benchmarks/results/<tag>.{md,json}`` (tag ``real`` or ``real-quick``) and
``benchmarks/results/real-judges.{md,json}`` (each judge's agreement with human ratings on
held-out rows).

``--model`` takes any model cpo_fast.pretrained knows, a local HF directory, or ``scratch``
(a tiny model built from a config, for testing this script without the packaged model).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cpo_fast.bench.sweep import NAMES
from cpo_fast.objectives import METHODS as TRAINED

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EMOBANK = ROOT.parent / "shared" / "data" / "emobank.csv"
METHODS = ("f_0", *TRAINED)  # f_0 itself, then every training method
# Sizes for SmolLM2-135M on the 2-core CPU (benchmarks/results/smollm2-stages.md): LoRA,
# small batches, bf16 generation (the demo's --model settings, cpo_fast/pipeline/report/demo.py).
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(rows=600, seeds="0,1,2", config=dict(
        f0_steps=40, steps=30, num_samples=96, dm_size=96, bootstrap=500)),
    "quick": dict(rows=240, seeds="0", config=dict(
        f0_steps=15, steps=8, num_samples=32, dm_size=32, bootstrap=200)),
}
# A tiny from-scratch model (tests of this script only: its texts are not English).
SCRATCH = dict(max_tokens=24, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
               f0_steps=4, steps=2, batch_size=8, dm_batch_size=8, num_samples=8, dm_size=8,
               max_new_tokens=8, bootstrap=50, f0_lr=3e-3, lr=3e-3, threads=1)


# --------------------------------------------------------------------------- cells

def cell_name(dataset: str, level: float, seed: int, method: str) -> str:
    return f"{dataset}_c{level:g}_s{seed}_{method}"


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (whitespace words): 1 = no repeats."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def step_weights(metrics_path: Path) -> dict[str, Any]:
    """Per-step weight diagnostics of a training run (its metrics.jsonl): the smallest
    single-step ESS of the outcome and DM rows in rows (the guard's shares are 5-step
    means), the rows per step, and the tempering exponents when ``--ess-target`` was on."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] \
        if metrics_path.is_file() else []

    def pick(key: str, f) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(f(vals)) if vals else None

    return {"min_ess_rows": pick("ess", min), "min_dm_ess_rows": pick("dm_ess", min),
            "batch_rows": pick("batch_rows", max), "min_tau": pick("ess_tau", min),
            "mean_tau": pick("ess_tau", np.mean), "min_dm_tau": pick("dm_ess_tau", min),
            "mean_dm_tau": pick("dm_ess_tau", np.mean)}


def cell_record(res: dict, judges: dict, *, method: str, train: dict | None,
                seconds: float) -> dict[str, Any]:
    """What one model's evaluation contributes to the tables (samples' judge scores kept)."""
    texts = [s["text"] for s in res.get("samples", [])]
    op = res.get("off_policy") or {}
    tr = train or {}
    rec: dict[str, Any] = {
        "method": method, "seconds": seconds, "num_samples": len(texts),
        "scores": {j: [float(s[j]) for s in res["samples"]] for j in judges},
        "ghat": (res.get("ghat") or {}).get("mean"),
        "ghat_outside": (res.get("ghat_support") or {}).get("ood_share"),
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "distinct_texts": res.get("distinct_fraction"), "mean_tokens": res.get("mean_tokens"),
        "off_policy": {k: op[k] for k in ("snips", "dr_snips", "ess", "n") if k in op},
        "collapsed": bool(tr.get("weights_collapsed", False)),
        "collapse_step": tr.get("collapse_step"),
        "min_ess_share": tr.get("min_ess_share"), "min_dm_ess_share": tr.get("min_dm_ess_share"),
        "final_ess": tr.get("ess"), "final_dm_ess": tr.get("dm_ess"),
        "steps_done": tr.get("steps_done"), "examples": texts[:3],
    }
    return rec


def run_group(job: dict[str, Any], judges: dict, log=print) -> list[dict[str, Any]]:
    """Every missing method cell of one (dataset, level, seed); finished cells are read back."""
    import dataclasses
    import shutil

    cells = Path(job["cells"])
    cells.mkdir(parents=True, exist_ok=True)
    paths = {m: cells / f"{cell_name(job['dataset'], job['level'], job['seed'], m)}.json"
             for m in job["methods"]}
    out = Path(job["out"])
    f0_shared = out / "f_0.cell.json"  # f_0's evaluation does not depend on the tag
    if "f_0" in paths and not paths["f_0"].is_file() and f0_shared.is_file():
        rec = json.loads(f0_shared.read_text())
        if set(judges) <= set(rec["scores"]):
            paths["f_0"].write_text(json.dumps(rec, indent=1, default=float))
    todo = [m for m, p in paths.items() if not p.is_file()]
    if todo:
        import torch

        from cpo_fast.bench.emobank import confounded_emobank, write_table
        from cpo_fast.pipeline.report.demo import demo_config
        from cpo_fast.pipeline.report.evaluate import evaluate_model
        from cpo_fast.pipeline.training.loop import train_policy
        from cpo_fast.pipeline.training.prepare import prepare

        warnings.simplefilter("ignore", FutureWarning)
        out.mkdir(parents=True, exist_ok=True)
        table = confounded_emobank(job["data"], confounding=job["level"], rows=job["rows"],
                                   seed=job["seed"])
        if not (out / "corpus.csv").is_file():
            write_table(table, out / "corpus.csv")
        model = None if job["model"] == "scratch" else job["model"]
        cfg = demo_config(out, model=model, seed=job["seed"], progress=job["progress"],
                          **job["config"])
        t0 = time.perf_counter()
        prep = prepare(cfg, need_dm=any(m in ("oo_rlhf", "dr_cpo") for m in todo))
        log(f"[real] level={job['level']:g} seed={job['seed']}: shared stages "
            f"{time.perf_counter() - t0:.0f}s, ghat out-of-fold R^2 {prep.outcome_fit.r2:.3f}")
        for m in todo:
            t1 = time.perf_counter()
            if m == "f_0":
                model_m, summary = prep.load_f0(), None
            else:
                run_dir = out / job["tag"] / m  # the shared stages are the tags' in common
                shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
                mcfg = dataclasses.replace(cfg, method=m, **job["remedy"]).validate()
                with warnings.catch_warnings(record=True):  # the guard's note is in summary
                    warnings.simplefilter("always")
                    model_m, summary = train_policy(prep, mcfg, out_dir=run_dir)
            res = evaluate_model(prep, model_m, name=m, scorers=judges)
            rec = cell_record(res, judges, method=m, train=summary,
                              seconds=time.perf_counter() - t1)
            rec.update(dataset=job["dataset"], level=job["level"], seed=job["seed"],
                       ghat_r2=prep.outcome_fit.r2, loadavg=list(os.getloadavg()),
                       remedy=job["remedy"] if m != "f_0" else {})
            if m != "f_0":
                rec.update(step_weights(run_dir / "metrics.jsonl"))
            for dest in (paths[m], f0_shared) if m == "f_0" else (paths[m],):
                tmp = dest.with_suffix(".tmp")
                tmp.write_text(json.dumps(rec, indent=1, default=float))
                tmp.replace(dest)  # a cell file is complete or absent
            log(f"[real] cell {paths[m].stem} done ({rec['seconds']:.0f}s)")
            del model_m
            torch.manual_seed(0)
    return [json.loads(p.read_text()) for p in paths.values() if p.is_file()]


# --------------------------------------------------------------------------- summary

def two_level_bootstrap(cells: list[tuple[np.ndarray, np.ndarray | None]], *, n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) of the mean over seeds of ``mean(a) - mean(b)`` (``b`` None: of
    ``mean(a)``), 95% percentile interval resampling seeds, then samples within each seed:
    both sources of noise (training and generation) are in the interval."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([a.mean() - (0.0 if b is None else b.mean()) for a, b in cells]))
    k = len(cells)
    stats = np.empty(n_boot)
    for i in range(n_boot):
        pick = rng.integers(0, k, k) if k > 1 else np.zeros(1, int)
        vals = []
        for j in pick:
            a, b = cells[j]
            v = a[rng.integers(0, a.size, a.size)].mean()
            if b is not None:
                v -= b[rng.integers(0, b.size, b.size)].mean()
            vals.append(v)
        stats[i] = np.mean(vals)
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return point, float(lo), float(hi)


def _dm_only(r: dict[str, Any]) -> dict[str, Any]:
    """OO-RLHF weights only the DM rows: the guard reports their ESS as ``ess``."""
    if r.get("method") == "oo_rlhf" and r.get("min_dm_ess_share") is None:
        r = {**r, "min_dm_ess_share": r.get("min_ess_share"), "min_ess_share": None,
             "final_dm_ess": r.get("final_ess"), "final_ess": None}
    return r


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summarize(recs: list[dict[str, Any]], judges: list[str]) -> list[dict[str, Any]]:
    """One row per (dataset, level, method): each judge's score and gain over f_0 (paired
    by seed), with the diagnostics averaged over seeds."""
    recs = [_dm_only(r) for r in recs]
    f0 = {(r["dataset"], r["level"], r["seed"]): r for r in recs if r["method"] == "f_0"}
    keys = sorted({(r["dataset"], r["level"]) for r in recs})
    rows = []
    for ds, lv in keys:
        for m in METHODS:
            rs = [r for r in recs if (r["dataset"], r["level"], r["method"]) == (ds, lv, m)]
            if not rs:
                continue
            row: dict[str, Any] = {"dataset": ds, "level": lv, "method": m,
                                   "seeds": sorted(r["seed"] for r in rs)}
            for j in judges:
                sc = [(np.asarray(r["scores"][j]), None) for r in rs if j in r["scores"]]
                row[f"{j}_score"] = two_level_bootstrap(sc) if sc else None
                pairs = [(np.asarray(r["scores"][j]),
                          np.asarray(f0[(ds, lv, r["seed"])]["scores"][j])) for r in rs
                         if (ds, lv, r["seed"]) in f0 and j in r["scores"]]
                row[f"{j}_gain"] = two_level_bootstrap(pairs) if pairs and m != "f_0" else None
            for k in ("ghat", "ghat_outside", "distinct_1", "distinct_2", "mean_tokens",
                      "min_ess_share", "min_dm_ess_share", "final_ess", "final_dm_ess",
                      "seconds"):
                row[k] = _mean(r.get(k) for r in rs)
            row["collapsed"] = sum(bool(r.get("collapsed")) for r in rs)
            for est in ("snips", "dr_snips"):
                vals = [r["off_policy"][est] for r in rs if est in (r.get("off_policy") or {})]
                row[est] = ({"estimate": _mean(v["estimate"] for v in vals),
                             "lo": _mean(v["lo"] for v in vals), "hi": _mean(v["hi"] for v in vals),
                             "reliable": sum(bool(v.get("reliable", True)) for v in vals)}
                            if vals else None)
            rows.append(row)
    return rows


def estimate_agreement(recs: list[dict[str, Any]], judges: list[str]) -> dict[str, Any]:
    """How far the held-out off-policy estimates agree with the judges: Pearson r over the
    cells between each estimate and each judge's mean (a rough figure: few cells)."""
    out: dict[str, Any] = {}
    for est in ("snips", "dr_snips"):
        for j in judges:
            xs = [(r["off_policy"][est]["estimate"], float(np.mean(r["scores"][j]))) for r in recs
                  if est in (r.get("off_policy") or {}) and j in r["scores"]
                  and r["off_policy"][est]["estimate"] is not None
                  and math.isfinite(r["off_policy"][est]["estimate"])]
            if len(xs) >= 4:
                a = np.asarray(xs)
                r_ = float(np.corrcoef(a[:, 0], a[:, 1])[0, 1]) if a.std(0).min() > 0 else 0.0
                out[f"{est}~{j}"] = {"r": r_, "cells": len(xs)}
    return out


def _ci(v, signed: bool = False) -> str:
    if v is None:
        return "-"
    s = "+" if signed else ""
    star = "*" if signed and (v[1] > 0 or v[2] < 0) else ""
    return f"{v[0]:{s}.3f} [{v[1]:{s}.3f}, {v[2]:{s}.3f}]{star}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


def _num(v, f=".2f") -> str:
    return "-" if v is None else format(v, f)


def markdown(rows, judges: list[str], agree: dict, meta: dict, judge_agreement: dict | None) -> str:
    jn = {"vader": "VADER", "textblob": "TextBlob", "minilm": "MiniLM-ridge"}
    lines = [f"# The paper's experiment on a real model: {meta['model']}, genre-confounded EmoBank",
             "",
             f"Base model: {meta['model']}; f_0 = the base model fitted to the corpus texts "
             "(LoRA SFT, merged); each method trains LoRA adapters from f_0. Outcome: EmoBank "
             "valence (1-5). Judges (never ghat): "
             + ", ".join(jn.get(j, j) for j in judges)
             + ". Gain = a judge's mean over a model's generations minus f_0's, paired by seed; "
             "95% interval from a two-level bootstrap (seeds, then samples). `*`: the interval "
             "excludes 0. ESS min / DM ESS min: the smallest 5-step mean ESS of the outcome rows / DM "
             "rows during training, as a share of the batch (mean over seeds); guard fired: "
             "seeds whose ESS fell below the guard's 10%.", ""]
    if judge_agreement:
        lines += ["What each judge is worth (Pearson r with human ratings on held-out rows, 95% "
                  "interval; benchmarks/results/real-judges.md):", ""]
        for j in judges:
            parts = [f"{ds} {v['r']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}] (n={v['n']})"
                     for ds, per in judge_agreement.items() for jj, v in per.items() if jj == j]
            lines.append(f"- {jn.get(j, j)}: " + "; ".join(parts))
        lines.append("")
    for ds, lv in sorted({(r["dataset"], r["level"]) for r in rows}):
        rs = [r for r in rows if (r["dataset"], r["level"]) == (ds, lv)]
        seeds = max(len(r["seeds"]) for r in rs)
        lines += [f"## {ds}, confounding {lv:g} ({seeds} seed{'s' * (seeds > 1)})", "",
                  "| method | " + " | ".join(f"{jn.get(j, j)} gain" for j in judges)
                  + " | ESS min | DM ESS min | guard fired | ghat outside | distinct-1/2 | mean tokens |",
                  "|---|" + "---|" * (len(judges) + 6)]
        for r in rs:
            gains = [(_ci(r[f"{j}_score"]) + " (score)") if r["method"] == "f_0"
                     else _ci(r[f"{j}_gain"], signed=True) for j in judges]
            lines.append(f"| {NAMES[r['method']]} | " + " | ".join(gains) + " | "
                         f"{_pct(r['min_ess_share'])} | {_pct(r['min_dm_ess_share'])} | "
                         f"{r['collapsed']}/{len(r['seeds'])} | {_pct(r['ghat_outside'])} | "
                         f"{_num(r['distinct_1'])}/{_num(r['distinct_2'])} | "
                         f"{_num(r['mean_tokens'], '.1f')} |")
        lines += ["", "Held-out off-policy estimates of V (EmoBank valence units; mean over "
                  "seeds of each estimate and its bootstrap interval) beside ghat's score of "
                  "the generations:", "",
                  "| method | SNIPS | DR (self-normalized) | ghat of generations |",
                  "|---|---|---|---|"]
        for r in rs:
            cell = lambda e: "-" if e is None else (
                f"{e['estimate']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]")
            lines.append(f"| {NAMES[r['method']]} | {cell(r['snips'])} | {cell(r['dr_snips'])} | "
                         f"{_num(r['ghat'], '.3f')} |")
        lines.append("")
    if agree:
        lines += ["Agreement of the off-policy estimates with the judges over all cells "
                  "(Pearson r between a cell's estimate and its judge mean): "
                  + ", ".join(f"{k} r={v['r']:+.2f} ({v['cells']} cells)" for k, v in agree.items()),
                  ""]
    lines += ["Run: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- remedies

def _tau(r: dict[str, Any], mean: str, low: str) -> str:
    return "-" if r[mean] is None else f"{r[mean]:.2f} ({r[low]:.2f})"


def _rows_of(v: float | None, n: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" + ("" if not n else f" ({v / n:.0%})")


def compare_remedies(tags: list[str], work: Path, judges: list[str], level: float,
                     methods: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """One table over remedy tags (each a run of this script with its own ``--remedy``):
    per (method, tag), each judge's gain over f_0 (paired by seed, two-level bootstrap), ghat's
    gain, the smallest single-step ESS of the outcome and DM rows (in rows, min over steps and
    seeds), the guard, tau, support and the generations' diversity and length."""
    jn = {"vader": "VADER", "textblob": "TextBlob", "minilm": "MiniLM-ridge"}
    out_rows: list[dict[str, Any]] = []
    for tag in tags:
        recs = [_dm_only(json.loads(p.read_text())) for p in sorted(
            (work / tag / "cells").glob(f"emobank_c{level:g}_s*.json"))]
        f0 = {r["seed"]: r for r in recs if r["method"] == "f_0"}
        if tag == tags[0] and f0:  # f_0's own scores, length and diversity, for reference
            rs0 = list(f0.values())
            out_rows.append({"tag": tag, "method": "f_0", "remedy": {}, "seeds": sorted(f0),
                             **{f"{j}_score": two_level_bootstrap(
                                 [(np.asarray(r["scores"][j]), None) for r in rs0])
                                for j in judges if all(j in r["scores"] for r in rs0)},
                             "ghat": _mean(r.get("ghat") for r in rs0),
                             **{k: _mean(r.get(k) for r in rs0)
                                for k in ("ghat_outside", "distinct_2", "mean_tokens")}})
        for m in methods:
            rs = [r for r in recs if r["method"] == m and r["seed"] in f0]
            if not rs:
                continue
            row: dict[str, Any] = {"tag": tag, "method": m, "remedy": rs[0].get("remedy", {}),
                                   "seeds": sorted(r["seed"] for r in rs)}
            for j in [*judges, "ghat"]:
                if j == "ghat":
                    row["ghat_gain"] = _mean(r["ghat"] - f0[r["seed"]]["ghat"] for r in rs
                                             if r.get("ghat") is not None)
                    continue
                pairs = [(np.asarray(r["scores"][j]), np.asarray(f0[r["seed"]]["scores"][j]))
                         for r in rs if j in r["scores"] and j in f0[r["seed"]]["scores"]]
                row[f"{j}_gain"] = two_level_bootstrap(pairs) if pairs else None
            for k, f in (("min_ess_rows", min), ("min_dm_ess_rows", min), ("batch_rows", max),
                         ("mean_tau", np.mean), ("min_tau", min), ("mean_dm_tau", np.mean),
                         ("min_dm_tau", min), ("ghat_outside", np.mean), ("distinct_2", np.mean),
                         ("mean_tokens", np.mean), ("min_ess_share", min),
                         ("min_dm_ess_share", min)):
                vals = [r[k] for r in rs if r.get(k) is not None]
                row[k] = float(f(vals)) if vals else None
            if m == "oo_rlhf":  # its one weighted set is the DM rows (the "ess" metric too)
                row["min_ess_rows"] = row["min_ess_share"] = None
                row["mean_dm_tau"], row["min_dm_tau"] = row["mean_tau"], row["min_tau"]
                row["mean_tau"] = row["min_tau"] = None
            row["collapsed"] = sum(bool(r.get("collapsed")) for r in rs)
            out_rows.append(row)
    lines = ["| method | remedy (tag) | " + " | ".join(f"{jn.get(j, j)} gain" for j in judges)
             + " | ghat gain | ESS min, rows | DM ESS min, rows | guard fired | tau mean (min) "
             "| DM tau mean (min) | ghat outside | distinct-2 | mean tokens |",
             "|---|---|" + "---|" * (len(judges) + 9)]
    for r in out_rows:
        if r["method"] == "f_0":
            lines.append("| f_0 (score, not gain) | - | " + " | ".join(
                _ci(r.get(f"{j}_score")) for j in judges) + f" | {_num(r['ghat'], '.3f')} | - | - "
                f"| - | - | - | {_pct(r['ghat_outside'])} | {_num(r['distinct_2'])} | "
                f"{_num(r['mean_tokens'], '.1f')} |")
            continue
        rem = ", ".join(f"{k}={v}" for k, v in r["remedy"].items()) or "none"
        n = r["batch_rows"]
        lines.append(
            f"| {NAMES[r['method']]} | {rem} ({r['tag']}) | "
            + " | ".join(_ci(r[f"{j}_gain"], signed=True) for j in judges)
            + f" | {_num(r['ghat_gain'], '+.3f')} | {_rows_of(r['min_ess_rows'], n)} | "
            f"{_rows_of(r['min_dm_ess_rows'], n)} | {r['collapsed']}/{len(r['seeds'])} | "
            f"{_tau(r, 'mean_tau', 'min_tau')} | {_tau(r, 'mean_dm_tau', 'min_dm_tau')} | "
            f"{_pct(r['ghat_outside'])} | {_num(r['distinct_2'])} | {_num(r['mean_tokens'], '.1f')} |")
    return "\n".join(lines), out_rows


# --------------------------------------------------------------------------- judges' worth

def judge_agreement(judges: dict, *, rows: int, log=print) -> dict[str, dict[str, Any]]:
    """Each judge's Pearson r with human ratings: held-out Hutto rows and EmoBank valence."""
    from cpo_fast import judges as J

    out: dict[str, dict[str, Any]] = {}
    rng = np.random.default_rng(0)
    if J.hutto_available():
        texts, y, _ = J.read_hutto()
        _, test = J.hutto_split(len(texts))
        test = np.sort(rng.choice(test, min(rows, len(test)), replace=False))
        out["Hutto held-out"] = {n: J.agreement(f, [texts[i] for i in test], y[test])
                                 for n, f in judges.items()}
    if EMOBANK.is_file():
        from cpo_fast.bench.emobank import read_emobank

        texts, v, _ = read_emobank(EMOBANK)
        idx = np.sort(rng.choice(len(texts), min(rows, len(texts)), replace=False))
        out["EmoBank valence"] = {n: J.agreement(f, [texts[i] for i in idx], v[idx])
                                  for n, f in judges.items()}
    for ds, per in out.items():
        for n, a in per.items():
            log(f"[real] judge {n} on {ds}: r = {a['r']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] "
                f"(n={a['n']})")
    return out


def write_agreement(agr: dict, out_dir: Path) -> None:
    lines = ["# Judges' agreement with human sentiment ratings (held-out rows)", "",
             "Pearson r between a judge's score and the mean human rating, 95% interval "
             "(Fisher z). Hutto held-out: rows of Hutto & Gilbert (2014) that the MiniLM "
             "ridge head was not fitted on (cpo_fast.judges.hutto_split); VADER's authors "
             "evaluated VADER on these texts, so its Hutto figure is not an independent test. "
             "EmoBank valence: no judge was fitted on EmoBank.", "",
             "| data | judge | r [95% CI] | n |", "|---|---|---|---|"]
    for ds, per in agr.items():
        for n, a in per.items():
            lines.append(f"| {ds} | {n} | {a['r']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] | {a['n']} |")
    lines += ["", f"Measured with load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs.",
              ""]
    (out_dir / "real-judges.md").write_text("\n".join(lines))
    (out_dir / "real-judges.json").write_text(json.dumps(agr, indent=2))


# --------------------------------------------------------------------------- main

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed per level, small runs")
    p.add_argument("--levels", default="0,0.8", help="confounding levels")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default by size)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="smollm2-135m",
                   help="base model: a packaged name, an HF directory, or 'scratch' (tests)")
    p.add_argument("--rows", type=int, default=None, help="corpus rows (overrides the size)")
    p.add_argument("--steps", type=int, default=None, help="policy steps (overrides the size)")
    p.add_argument("--judges", default="vader,textblob,minilm")
    p.add_argument("--agreement-rows", type=int, default=2000,
                   help="held-out rows per dataset for the judges' agreement")
    p.add_argument("--no-agreement", action="store_true", help="skip the judges' agreement")
    p.add_argument("--remedy", default="{}", help="JSON config overrides for every policy "
                   "(e.g. '{\"log_weight_cap\": 1.4}')")
    p.add_argument("--data", default=str(EMOBANK), help="EmoBank csv (genre file beside it)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--work-dir", default="runs/reproduce_real", help="models, cells, logs")
    p.add_argument("--tag", default=None, help="results name (default real[-quick])")
    p.add_argument("--collect", action="store_true", help="no training: tables from done cells")
    p.add_argument("--compare", default=None, help="no training: one table over these tags' "
                   "cells (comma-separated; each run with its own --remedy), at the first "
                   "level, written as <tag>.md")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    a = parser().parse_args(argv)
    if not Path(a.data).is_file():
        print(f"[real] EmoBank not found ({a.data}): skipped.")
        return None
    from tqdm.auto import tqdm

    from cpo_fast import judges as J

    size = SIZES["quick" if a.quick else "full"]
    config = dict(size["config"])
    if a.model == "scratch":
        config.update(SCRATCH)
    if a.steps:
        config["steps"] = a.steps
    have = J.available_judges()
    want = [j.strip() for j in a.judges.split(",") if j.strip()]
    missing = [j for j in want if j not in have]
    if missing:
        print(f"[real] judges {missing} unavailable (install: {J.INSTALL}; MiniLM's data: "
              f"{J.FETCH}); running without them.")
    judges = {j: have[j] for j in want if j in have}
    if not judges:
        raise SystemExit(f"[real] no judge available: {J.INSTALL}")
    levels = [float(x) for x in a.levels.split(",") if x.strip()]
    seeds = [int(s) for s in (a.seeds or size["seeds"]).split(",") if s.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: {bad} not in {METHODS}")
    if "f_0" not in methods:
        methods.insert(0, "f_0")  # every gain is paired with f_0's cell
    tag = a.tag or "real" + ("-quick" if a.quick else "")
    work = Path(a.work_dir)
    rows_n = a.rows or size["rows"]
    if a.compare:
        tags = [t.strip() for t in a.compare.split(",") if t.strip()]
        table, rows = compare_remedies(tags, work, list(judges), levels[0],
                                       [m for m in methods if m != "f_0"])
        md = (f"# Remedies against weight collapse on {a.model}, EmoBank confounding "
              f"{levels[0]:g}\n\nEach tag is a run of benchmarks/reproduce_real.py with its own "
              "`--remedy` (config overrides) from the same f_0, ghat and DM set per seed. Gain = "
              "a judge's mean over a model's generations minus f_0's, paired by seed, 95% "
              "two-level bootstrap (seeds, then samples); `*`: the interval excludes 0. ESS "
              "min: the smallest single-step ESS of the effective batch in rows (share of the "
              "batch), over steps and seeds; guard fired: seeds whose 5-step mean ESS share "
              "fell below --ess-guard; tau: the tempering exponent (mean over steps and seeds, "
              "and its minimum).\n\n"
              f"{table}\n\nRun: model {a.model}, rows {rows_n}, config {config}, judges "
              f"{list(judges)}, cpus {os.cpu_count()}\n")
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{tag}.md").write_text(md)
        (Path(a.out) / f"{tag}.json").write_text(json.dumps(rows, indent=1, default=float))
        print(md)
        return {"compare": rows}
    # f_0, ghat and the DM set of a (level, seed) are shared by every tag (remedy) of a size
    stages = hashlib.sha1(json.dumps([a.model, rows_n, {k: v for k, v in config.items()
                                      if k != "steps"}], sort_keys=True).encode()).hexdigest()[:8]
    jobs = [dict(dataset="emobank", data=a.data, level=lv, seed=sd, rows=rows_n, tag=tag,
                 config=config, methods=methods, model=a.model, remedy=json.loads(a.remedy),
                 progress=not a.no_progress, cells=str(work / tag / "cells"),
                 out=str(work / "stages" / f"emobank_c{lv:g}_s{sd}_{stages}"))
            for lv in levels for sd in seeds]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    agr = None
    agr_path = out_dir / "real-judges.json"
    if not a.no_agreement and a.model != "scratch":
        if agr_path.is_file():
            agr = json.loads(agr_path.read_text())
        elif not a.collect:
            agr = judge_agreement(judges, rows=a.agreement_rows)
            write_agreement(agr, out_dir)
    recs: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="cells (level, seed)", disable=a.no_progress)
    for j in bar:
        bar.set_postfix(level=j["level"], seed=j["seed"])
        if a.collect:
            cells = Path(j["cells"])
            recs += [json.loads(p.read_text()) for m in methods if (p := cells / (
                cell_name("emobank", j["level"], j["seed"], m) + ".json")).is_file()]
        else:
            recs += run_group(j, judges, log=tqdm.write)
    if not recs:
        raise SystemExit("[real] no finished cell")
    wall = time.perf_counter() - t0
    rows = summarize(recs, list(judges))
    agree = estimate_agreement(recs, list(judges))
    meta = {"model": a.model, "rows": jobs[0]["rows"], "levels": levels, "seeds": seeds,
            "config": config, "remedy": jobs[0]["remedy"], "wall_s (this invocation)": round(wall),
            "cells": len(recs), "collected only": a.collect, "loadavg_start": load0,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    md = markdown(rows, list(judges), agree, meta, agr)
    (out_dir / f"{tag}.md").write_text(md)
    (out_dir / f"{tag}.json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "estimate_vs_judges": agree, "judges": agr,
         "records": recs}, indent=1, default=float))
    print(md)
    return {"summary": rows, "records": recs, "meta": meta}


if __name__ == "__main__":
    main(sys.argv[1:])
