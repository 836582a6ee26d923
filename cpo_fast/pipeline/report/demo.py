"""The embedded demo (``cpo-fast demo``): everything from scratch, no downloads.

1. a semi-synthetic corpus with a known oracle g* (``synthetic.make_corpus``), written as CSV;
2. a byte-level BPE tokenizer trained on it; a small Llama-config model SFT'd on it = f_0;
3. f_0's reference log-probs (cache), a cross-fitted ridge ghat on f_0's features, and the
   DM set (f_0's completions of truncated corpus texts);
4. SFT-all, SFT-top, OO-RLHF, CPO and DR-CPO, each from f_0 with LoRA;
5. each model (and f_0) generates texts, the oracle scores them: the true V(theta) of each
   model, with bootstrap 95% intervals, printed as a table (plus ghat's view and the
   off-policy estimates on held-out rows in ``results.json``) and plotted.

``--model smollm2-135m`` (or any HF model directory) runs the same five methods on a real
pretrained model instead: f_0 is its LoRA SFT on the corpus (the model's own tokenizer,
texts written between ``<|endoftext|>`` tokens), with settings sized for a 2-core CPU
(:data:`MODEL_DEFAULTS`), and VADER (Hutto & Gilbert 2014's human-rated lexicon, from the
``vaderSentiment`` package) judges every model's generations next to the oracle: an
independent judge that neither ghat nor the oracle was built from.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any

from cpo_fast.objectives import METHODS
from cpo_fast.pipeline.report.evaluate import evaluate_model, format_row, write_eval
from cpo_fast.pipeline.report.plots import outcome_bars, training_curves, weight_histogram
from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.run.layout import RunLayout
from cpo_fast.pipeline.run.persist import write_json, write_text
from cpo_fast.pipeline.run.preflight import preflight
from cpo_fast.pipeline.stages.synthetic import corpus_csv, make_corpus, oracle
from cpo_fast.pipeline.training.loop import train_policy
from cpo_fast.pipeline.training.prepare import check_cached_settings, prepare

# Settings tuned on a 2-core CPU so the full demo stays under ten minutes. One torch thread:
# at hidden size 64 intra-op parallelism costs more than it gives (and on a shared machine
# two spinning threads per process made the demo several times slower).
DEMO_DEFAULTS: dict[str, Any] = dict(
    text_column="text", outcome_column="outcome", group_column="group", id_column="id",
    max_tokens=40, eval_fraction=0.1, vocab_size=600, arch="llama", hidden_size=64,
    num_layers=2, num_heads=4, f0_steps=400, f0_lr=3e-3, f0_batch_size=32,
    weighting="self_normalized", steps=120, batch_size=64, lr=3e-3, warmup_steps=10,
    lora=True, lora_r=8, lora_alpha=16.0, dm_source="f0_completions", dm_size=1024, threads=1,
    dm_prefix_fraction=0.3, dm_batch_size=64, num_samples=512, max_new_tokens=36,
    save_every=0, batch_size_eval=128, bootstrap=1000, top_quantile=0.75, outcome_features="both",
)
QUICK: dict[str, Any] = dict(f0_steps=200, steps=50, num_samples=256, dm_size=512)
DEMO_ROWS, QUICK_ROWS = 4000, 2000
# --model: a 135M-parameter model on a 2-core CPU (benchmarks/results/smollm2-stages.md):
# small batches, LoRA everywhere, learning rates for a pretrained model, bf16 generation.
# f_0's LoRA SFT runs at 2e-3 (not the 5e-4 default for a pretrained base): in a few dozen
# steps it must learn the corpus's sentence form, or its samples stay web text the oracle
# scores neutral (3.0) and no method has anything to move.
MODEL_DEFAULTS: dict[str, Any] = dict(
    max_tokens=28, f0_steps=60, f0_batch_size=16, f0_lr=2e-3, f0_lora=None, steps=30,
    batch_size=8, dm_batch_size=8, lr=1e-3, warmup_steps=3, dm_size=96, num_samples=96,
    max_new_tokens=22, batch_size_eval=64, outcome_features="f0", threads=None,
    lora_r=8, lora_alpha=16.0)
MODEL_QUICK: dict[str, Any] = dict(f0_steps=30, steps=6, num_samples=32, dm_size=32)
MODEL_ROWS, MODEL_QUICK_ROWS = 600, 160


def demo_config(out_dir: str | Path, *, quick: bool = False, model: str | None = None,
                **overrides: Any) -> RunConfig:
    if overrides.get("data"):
        raise ValueError("demo: --data is not used (the demo writes its own corpus.csv under "
                         "--output-dir); use `cpo-fast train --data ...` for your data.")
    values = {**DEMO_DEFAULTS, **(QUICK if quick else {})}
    if model:  # a pretrained model: f_0 = its LoRA SFT on the corpus
        values.update(MODEL_DEFAULTS, **(MODEL_QUICK if quick else {}), base_model=model)
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["output_dir"] = str(out_dir)
    values["data"] = str(Path(out_dir) / "corpus.csv")
    return RunConfig(**values).validate()


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, rows: int | None = None,
             methods: tuple[str, ...] = tuple(METHODS), confounding: float = 0.5, noise: float = 0.5,
             model: str | None = None, print_fn=print, **overrides: Any) -> dict[str, Any]:
    """Run the demo; return {"table": rows, "results": per model, "seconds": run time}."""
    t0 = time.perf_counter()
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: {bad} not in {tuple(METHODS)}.")
    out = Path(out_dir)
    cfg = demo_config(out, quick=quick, model=model, **overrides)
    preflight(cfg, "demo")
    if model:
        n = rows or (MODEL_QUICK_ROWS if quick else MODEL_ROWS)
    else:
        n = rows or (QUICK_ROWS if quick else DEMO_ROWS)
    corpus = make_corpus(n, confounding=confounding, noise=noise, seed=cfg.seed)
    text = corpus_csv(corpus)
    _check_reusable(out, cfg, text)  # before anything in ``out`` is written
    write_text(cfg.data, text)
    cfg.save(out / "config.json")
    print_fn(f"[demo] corpus: {n} rows -> {cfg.data} (oracle mean of the corpus "
             f"{oracle(corpus.texts).mean():.3f}, outcome mean {corpus.outcomes.mean():.3f})")

    prep = prepare(cfg, need_dm=any(METHODS[m].dm_rows for m in methods))
    print_fn(f"[demo] f_0 ready ({time.perf_counter() - t0:.0f}s); ghat out-of-fold R^2 = "
             f"{prep.outcome_fit.r2:.3f}")
    results, times = _train_and_evaluate(prep, cfg, methods, print_fn, judge=bool(model))
    seconds = time.perf_counter() - t0
    _plots(out, methods, results, guard=cfg.ess_guard)

    table = []
    for name, r in results.items():
        op = r.get("off_policy") or {}
        tr = r.get("train") or {}
        table.append({"model": name, "oracle": r.get("oracle"), "ghat": r.get("ghat"),
                      "distinct": r["distinct_fraction"], "off_policy": op,
                      "ghat_outside": (r.get("ghat_support") or {}).get("ood_share"),
                      "judge": r.get("vader"),
                      "collapsed": bool(tr.get("weights_collapsed")),
                      "min_ess_share": tr.get("min_ess_share"),
                      "min_dm_ess_share": tr.get("min_dm_ess_share")})
    write_json(out / "results.json", {"table": table, "seconds": seconds, "quick": quick,
                                      "model": model or "new (built here)", "rows": n,
                                      "ghat_r2": prep.outcome_fit.r2,
                                      "train_seconds": times,
                                      "outcome_model": prep.outcome_fit.summary(),
                                      "dm_support": prep.dm_support})
    print_fn(format_table(table, seconds, higher_is_better=cfg.higher_is_better))
    print_fn(f"[demo] outputs in {out}/ (results.json, eval/, plots/, <method>/metrics.jsonl)")
    return {"table": table, "results": results, "seconds": seconds}


def _check_reusable(out: Path, cfg: RunConfig, corpus_text: str) -> None:
    """Refuse, leaving every file as it is, an output directory whose stages were built
    for another demo (other settings, or another corpus: --rows, --confounding, --noise)."""
    check_cached_settings(cfg, RunLayout(out))
    old = Path(cfg.data)
    if old.is_file() and old.read_text(encoding="utf-8") != corpus_text:
        raise ValueError(f"--output-dir {out}: holds a demo built on another corpus (other "
                         "--rows, --confounding, --noise or --seed); use another --output-dir.")


def vader(texts: list[str]) -> list[float]:
    """VADER's compound sentiment in [-1, 1] of each text (an independent judge)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sia = SentimentIntensityAnalyzer()
    return [sia.polarity_scores(t)["compound"] for t in texts]


def _train_and_evaluate(prep, cfg: RunConfig, methods, print_fn, judge: bool = False):
    """f_0, then each method trained from it; every model's generations scored (eval/)."""
    lay, scorers = prep.layout, {"oracle": oracle}
    if judge and importlib.util.find_spec("vaderSentiment") is not None:
        scorers["vader"] = vader
    results: dict[str, dict] = {}
    times: dict[str, float] = {}
    res = evaluate_model(prep, prep.load_f0(), name="f_0", scorers=scorers)
    write_eval(res, lay.eval("f_0"))
    results["f_0"] = res
    for m in methods:
        t1 = time.perf_counter()
        mcfg = dataclasses.replace(cfg, method=m)
        policy, summary = train_policy(prep, mcfg, out_dir=lay.method(m))
        times[m] = time.perf_counter() - t1
        res = evaluate_model(prep, policy, name=m, scorers=scorers)
        res["train"] = summary
        write_eval(res, lay.eval(m))
        results[METHODS[m].label] = res
        del policy
        flag = (f"; weights collapsed at step {summary['collapse_step']}"
                if summary.get("weights_collapsed") else "")
        print_fn(f"[demo] {METHODS[m].label:8s} oracle {format_row(res, 'oracle')}  "
                 f"({times[m]:.0f}s train{flag})")
    return results, times


def _plots(out: Path, methods, results, guard: float = 0.0) -> None:
    runs = {METHODS[m].label: out / m / "metrics.jsonl" for m in methods}
    training_curves(runs, out / "plots" / "training.png", guard=guard)
    weight_histogram({k: v for k, v in runs.items() if k in ("CPO", "DR-CPO", "OO-RLHF")},
                     out / "plots" / "weights.png")
    outcome_bars(results, "oracle", out / "plots" / "oracle.png",
                 title="oracle g* of generations: f_0 (before) vs trained (after)")
    outcome_bars(results, "ghat", out / "plots" / "ghat.png")


def format_table(table: list[dict], seconds: float, *, higher_is_better: bool = True) -> str:
    f0 = next((r for r in table if r["model"] == "f_0"), None)
    judged = any(r.get("judge") for r in table)
    lines = [f"{'model':9s} {'oracle E[g*] of generations (95% CI)':38s} {'vs f_0':>8s}"
             f" {'ghat (95% CI)':>27s} {'outside':>7s} {'distinct':>8s} {'off-policy DR':>13s}"
             + (f" {'VADER judge (95% CI)':>28s}" if judged else "")]
    lines.append("-" * len(lines[0]))
    for r in table:
        o, g = r["oracle"], r["ghat"]
        delta = "" if f0 is None or r is f0 else f"{o['mean'] - f0['oracle']['mean']:+.3f}"
        delta += "!" if r.get("collapsed") else ""
        out = "-" if r.get("ghat_outside") is None else f"{r['ghat_outside']:.0%}"
        gs = "-" if g is None else f"{g['mean']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}]"
        lines.append(f"{r['model']:9s} {o['mean']:.3f} [{o['lo']:.3f}, {o['hi']:.3f}]"
                     f"{'':18s} {delta:>8s} {gs:>27s} {out:>7s} {r['distinct']:8.2f}"
                     f" {_dr_cell(r.get('off_policy') or {}):>13s}" + _judge_cell(r, judged))
    lines.append(f"({'higher' if higher_is_better else 'lower'} is better; run time "
                 f"{seconds:.0f}s; outside: share of generations outside ghat's support; "
                 "off-policy DR: self-normalized DR estimate of V on the held-out rows)")
    if any(r.get("collapsed") for r in table):
        lines.append("!: the importance weights collapsed during training (the ESS guard "
                     "fired): that gain is not trustworthy")
    if any((r.get("off_policy") or {}).get("reliable") is False for r in table):
        lines.append("unreliable: the held-out rows' importance weights collapsed (ESS below "
                     "10% of the rows): that estimate is noise")
    return "\n".join(lines)


def _judge_cell(r: dict, judged: bool) -> str:
    j = r.get("judge")
    if not judged:
        return ""
    cell = "-" if not j else f"{j['mean']:+.3f} [{j['lo']:+.3f}, {j['hi']:+.3f}]"
    return f" {cell:>28s}"


def _dr_cell(op: dict) -> str:
    est = op.get("dr_snips") or op.get("snips")
    if est is None:
        return "-"
    return "unreliable" if op.get("reliable") is False else f"{est['estimate']:.3f}"
