"""How much of an end-to-end step any log-prob path must spend: the bench_e2e step against
the same step without its loss layer.

For each (family, V, fine-tuning) of bench_e2e's default grid, timed interleaved in one
process (median [p20, p80] of --reps steps after two warm-ups):

  eager, cpo_fast  the bench_e2e training step with that log-prob path (cpo_fast.bench.e2e)
  backbone         the same model's step with no head and no loss layer: forward and
                   backward of the last hidden states' mean, AdamW over every trained
                   parameter (a trained head with a zero gradient, so its update is timed)
  head GEMMs       torch's matmuls every path does at the head: h W^T and dZ W, and with a
                   trained head dZ^T h ([N, d] x [V, d] x [N, V] in the model's dtype)

"bound" = eager / (backbone + head GEMMs): the speed-up over eager of a path whose loss
layer costs nothing beyond those GEMMs. A path can edge past it (cpo_fast's blocked GEMMs
keep their blocks in cache where the standalone [N, V] ones do not), so it is a yardstick
for how much is left to gain, not a strict floor.

Usage: python benchmarks/bench_e2e_bound.py            # CPU, about 2 minutes on 2 cores
       python benchmarks/bench_e2e_bound.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cpo_fast.bench import e2e, harness, measure
from cpo_fast.bench.environment import environment

RESULTS = Path(__file__).resolve().parent / "results"
CPU = dict(batch=4, seq=64, hidden=256, layers=2, reps=7,
           configs=[("llama", 32000), ("llama", 128256), ("qwen2", 151936)])
QUICK = dict(batch=2, seq=16, hidden=64, layers=1, reps=2, configs=[("llama", 512)])
PARTS = ("eager", "cpo_fast", "backbone", "gemms")


def backbone_step(model, ids, mask, finetune: str):
    """The training step without head or loss layer (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings().weight

    def step():
        base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state.mean().backward()
        if finetune == "full":
            head.grad = torch.zeros_like(head)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def head_gemms(tokens: int, hidden: int, vocab: int, finetune: str):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    dz = torch.randn(tokens, vocab, generator=g)

    def step():
        h @ w.T
        dz @ w
        if finetune == "full":
            dz.T @ h
    return step


def run_config(shape: dict, family: str, vocab: int, finetune: str) -> dict:
    ids, mask, labels = e2e.make_batch(shape["batch"], shape["seq"], vocab, "cpu")
    build = lambda path: e2e.build_model(family, vocab, shape["hidden"], shape["layers"],  # noqa: E731
                                         finetune, path, torch.float32, "cpu")
    steps = {path: e2e.train_step_fn(build(path), path, ids, mask, labels)
             for path in ("eager", "cpo_fast")}
    steps["backbone"] = backbone_step(build("eager"), ids, mask, finetune)
    steps["gemms"] = head_gemms(shape["batch"] * (shape["seq"] - 1), shape["hidden"], vocab,
                                finetune)
    for f in steps.values():
        f()
        f()
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    for _ in range(shape["reps"]):
        for p in PARTS:
            t = time.perf_counter()
            steps[p]()
            times[p].append((time.perf_counter() - t) * 1e3)
    row = {"family": family, "V": vocab, "finetune": finetune}
    return row | {p: measure.summarize(times[p]) for p in PARTS}


def summarize(record: dict) -> dict:
    """The record's summary: per row, cpo_fast and the bound against eager."""
    out = []
    for r in record["rows"]:
        ms = {p: r[p]["median_ms"] for p in PARTS}
        lower = ms["backbone"] + ms["gemms"]
        out.append({"family": r["family"], "V": r["V"], "finetune": r["finetune"],
                    "cpo_fast_vs_eager": ms["eager"] / ms["cpo_fast"],
                    "bound_vs_eager": ms["eager"] / lower,
                    "cpo_fast_of_bound": lower / ms["cpo_fast"]})
    return {"rows": out}


def render(record: dict) -> str:
    rows = []
    for r, s in zip(record["rows"], record["summary"]["rows"], strict=True):
        rows.append([r["family"], r["V"], r["finetune"]]
                    + [harness.fmt_ms(r[p], 0) for p in PARTS]
                    + [f"{s['cpo_fast_vs_eager']:.2f}x", f"{s['bound_vs_eager']:.2f}x",
                       f"{s['cpo_fast_of_bound']:.0%}"])
    st = record["settings"]
    head = ["family", "V", "finetune", "eager ms", "cpo_fast ms", "backbone + AdamW ms",
            "head GEMMs ms", "cpo_fast vs eager", "bound vs eager", "cpo_fast at bound"]
    return "\n".join([
        "# End-to-end step against its no-loss-layer bound", "",
        *harness.environment_lines(record),
        f"- step: {st['batch']} x {st['seq']} tokens, d={st['hidden']}, {st['layers']} layers, "
        f"fp32, {st['reps']} timed steps after 2 warm-ups, the four parts interleaved",
        "- bound = eager / (backbone + AdamW + head GEMMs); 'cpo_fast at bound' = that sum / "
        "cpo_fast's step (above 100%: cpo_fast's blocked GEMMs beat the standalone ones)", "",
        harness.fmt_table(head, rows, "lllrrrrrrr"), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: one tiny model")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per part")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    shape = dict(QUICK if args.quick else CPU)
    if args.reps is not None:
        shape["reps"] = args.reps
    env = environment("cpu")
    rows = [run_config(shape, fam, v, ft) for fam, v in shape["configs"]
            for ft in ("lora", "full")]
    settings = {k: v for k, v in shape.items() if k != "configs"} | {"quick": args.quick}
    summary = summarize({"rows": rows})
    if args.no_write:
        print(render({"environment": {**env, "loadavg_after": None}, "rows": rows,
                      "settings": settings, "summary": summary,
                      "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        return
    paths = harness.write_results("e2e-bound", env, settings=settings, floors={}, rows=rows,
                                  summary=summary, markdown=render,
                                  out_dir=args.out or RESULTS, quick=args.quick)
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
