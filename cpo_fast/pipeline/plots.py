"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- ``training_curves``: loss and ESS per step for one or more runs (metrics.jsonl files);
- ``weight_histogram``: the log importance weights of the last logged batch of each run;
- ``outcome_bars``: each model's mean outcome with its 95% interval (f_0 = "before").
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def training_curves(runs: dict[str, str | Path], path: str | Path) -> Path:
    """Loss (left) and ESS / batch rows (right) against the step, one line per run."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, mpath) in enumerate(runs.items()):
        rows = read_metrics(mpath)
        if not rows:
            continue
        color = f"C{i}"  # one colour per run in both panels
        steps = [r["step"] for r in rows]
        a1.plot(steps, [r["loss"] for r in rows], label=name, color=color)
        ess = [(r["step"], r["ess"] / max(1, r.get("batch_rows") or 1)) for r in rows
               if r.get("ess") is not None]
        if ess:
            a2.plot(*zip(*ess, strict=True), label=name, color=color)
    a1.set(xlabel="step", ylabel="loss", title="training loss")
    a2.set(xlabel="step", ylabel="ESS / rows", title="effective sample size (share of batch)",
           ylim=(0, 1.05))
    for a in (a1, a2):
        if a.lines:
            a.legend(fontsize=8)
        a.grid(alpha=0.3)
    return _save(fig, path)


def weight_histogram(runs: dict[str, str | Path], path: str | Path) -> Path:
    """log W of the last logged batch of each weighted run, centred on its mean."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, mpath) in enumerate(runs.items()):
        rows = [r for r in read_metrics(mpath) if r.get("log_weights")]
        if rows:
            lw = rows[-1]["log_weights"]
            m = sum(lw) / len(lw)
            ax.hist([x - m for x in lw], bins=20, alpha=0.5, color=f"C{i}",
                    label=f"{name} (step {rows[-1]['step']})")
    ax.set(xlabel="log W - mean (last batch)", ylabel="rows", title="importance weights")
    if ax.patches:
        ax.legend(fontsize=8)
    return _save(fig, path)


def outcome_bars(results: dict[str, dict], key: str, path: str | Path,
                 title: str | None = None) -> Path:
    """Mean of ``results[name][key]`` with its [lo, hi] interval, one bar per model."""
    names = [n for n in results if results[n].get(key)]
    means = [results[n][key]["mean"] for n in names]
    err = [[m - results[n][key]["lo"] for n, m in zip(names, means, strict=True)],
           [results[n][key]["hi"] - m for n, m in zip(names, means, strict=True)]]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    colors = ["0.6" if n == "f_0" else "C0" for n in names]
    ax.bar(names, means, yerr=err, capsize=4, color=colors)
    if "f_0" in results and results["f_0"].get(key):
        ax.axhline(results["f_0"][key]["mean"], color="0.3", ls="--", lw=1)
    if means:
        lo = min(results[n][key]["lo"] for n in names)
        hi = max(results[n][key]["hi"] for n in names)
        pad = 0.15 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set(ylabel=f"mean {key} of generations (95% CI)",
           title=title or f"outcome before (f_0) and after training: {key}")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
