"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- ``training_curves``: loss, ESS and max weight share per step for one or more runs
  (metrics.jsonl files), the DM set's beside the outcome rows' (dashed);
- ``weight_histogram``: the log importance weights of the last logged batch of each run;
- ``outcome_bars``: each model's mean outcome with its 95% interval (f_0 = "before").
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def _share(rows: list[dict], key: str, rows_key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key] / max(1, r.get(rows_key) or r.get("batch_rows") or 1))
            for r in rows if r.get(key) is not None]


def training_curves(runs: dict[str, str | Path], path: str | Path, *,
                    guard: float | None = None) -> Path:
    """Loss, ESS / batch rows and max weight share against the step, one colour per run:
    solid lines for the outcome rows, dashed for the DM set (DR-CPO; OO-RLHF's only set).
    ``guard``: draw the ESS guard's threshold."""
    fig, (a1, a2, a3) = subplots(1, 3, figsize=(15, 4))
    for i, (name, mpath) in enumerate(runs.items()):
        rows = read_metrics(mpath)
        if not rows:
            continue
        color = f"C{i}"  # one colour per run in every panel
        a1.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, color=color)
        dm_only = all(r.get("dm_ess") == r.get("ess") for r in rows) and rows[0].get("dm_ess")
        ess = _share(rows, "ess", "dm_batch_rows" if dm_only else "batch_rows")
        if ess:
            a2.plot(*zip(*ess, strict=True), label=name, color=color,
                    ls="--" if dm_only else "-")
        dm = [] if dm_only else _share(rows, "dm_ess", "dm_batch_rows")
        if dm:
            a2.plot(*zip(*dm, strict=True), label=f"{name} (DM set)", color=color, ls="--")
        mws = [(r["step"], r["max_weight_share"]) for r in rows
               if r.get("max_weight_share") is not None]
        if mws:
            a3.plot(*zip(*mws, strict=True), label=name, color=color,
                    ls="--" if dm_only else "-")
        dmw = [] if dm_only else [(r["step"], r["dm_max_weight_share"]) for r in rows
                                  if r.get("dm_max_weight_share") is not None]
        if dmw:
            a3.plot(*zip(*dmw, strict=True), label=f"{name} (DM set)", color=color, ls="--")
    if guard:
        a2.axhline(guard, color="0.3", ls=":", lw=1, label=f"ESS guard {guard:g}")
    a1.set(xlabel="step", ylabel="loss", title="training loss")
    a2.set(xlabel="step", ylabel="ESS / rows", title="effective sample size (share of batch)",
           ylim=(0, 1.05))
    a3.set(xlabel="step", ylabel="max W / sum W", title="max weight share", ylim=(0, 1.05))
    for a in (a1, a2, a3):
        if a.lines:
            a.legend(fontsize=7)
        a.grid(alpha=0.3)
    return save(fig, path)


def weight_histogram(runs: dict[str, str | Path], path: str | Path) -> Path:
    """log W of the last logged batch of each weighted run, centred on its mean."""
    fig, ax = subplots(figsize=(6, 4))
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
    return save(fig, path)


def outcome_bars(results: dict[str, dict], key: str, path: str | Path,
                 title: str | None = None) -> Path:
    """Mean of ``results[name][key]`` with its [lo, hi] interval, one bar per model."""
    names = [n for n in results if results[n].get(key)]
    means = [results[n][key]["mean"] for n in names]
    err = [[m - results[n][key]["lo"] for n, m in zip(names, means, strict=True)],
           [results[n][key]["hi"] - m for n, m in zip(names, means, strict=True)]]
    fig, ax = subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
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
    return save(fig, path)


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the Agg backend. matplotlib is imported at the first
    plot, not with this module: it would add 0.6 s to every ``cpo-fast`` command."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parents created) and release it."""
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
