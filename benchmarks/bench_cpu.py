"""CPU benchmark of the C++ core against PyTorch eager and torch.compile.

Measures, for each case, fwd+bwd wall time (median and p20/p80 of --reps runs after
warm-up) and peak extra memory (the process's RSS high-water mark during one fwd+bwd minus
its RSS before; see cpo_fast.bench.measure.peak_extra_memory). Each case runs in its own subprocess so
that one case's freed memory or compiled graphs do not colour the next.

Cases:
  logits path, N=2048, V=32000 and V=128256, fp32 and bf16: cpo_fast.token_logprobs
      (backend="cpu") vs eager  logits.float().log_softmax(-1).gather(-1, y)  and its
      torch.compile (V=32000 only). Variants: ours (gradient buffer from the reuse pool, the
      default), ours-kernel (the C++ kernels alone, no autograd or allocation),
      ours-noreuse (CPO_FAST_CPU_GRAD_POOL=0: a fresh mapping every step),
      ours-inplace (gradient over the logits), ours-thp and eager-thp (THP_MEM_ALLOC_ENABLE=1,
      PyTorch's huge-page allocator). Each row has the cold time (the first fwd+bwd of a
      fresh process) beside the warm median.
  fused linear, N=2048, d=1024, V=32000, fp32:   cpo_fast.linear_token_logprobs
      vs eager  (hidden @ weight.T).float().log_softmax(-1).gather(-1, y)
      twice: weight trained (recompute backward) and weight frozen (requires_grad=False,
      the LoRA case: the forward accumulates sum_v p_v W_v, the backward is O(N d))
  fused linear memory sweep (frozen weight, d=256, V in 16000/32000/64000): peak extra
      memory of the fused op against eager as V grows
  bandwidth floor: a 512 MiB torch copy, (bytes read + written) / fastest time; the
      logits path moves 2 reads + 1 write of N x V x dtype bytes, so floor = 3 N V b / bw.

Usage: python benchmarks/bench_cpu.py [--reps 5] [--linear-reps 2] [--quick] [--no-compile]
       python benchmarks/bench_cpu.py --render results/<device>-cpu.json   # report only
Writes results/<device>-cpu[-quick].{json,md} (docs/benchmarks.md: results schema).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cpo_fast.bench import harness
from cpo_fast.bench.environment import environment
from cpo_fast.bench.measure import measure, peak_extra_memory

RESULTS = Path(__file__).resolve().parent / "results"

FULL = {"N": 2048, "V": 32000, "logits_v": [32000, 128256], "d": 1024,
        "sweep_v": [16000, 32000, 64000], "known": {"N": 1024, "d": 512, "V": 32000}}
QUICK = {"N": 256, "V": 4000, "logits_v": [4000], "d": 256, "sweep_v": [2000, 4000, 8000],
         "known": {"N": 128, "d": 64, "V": 2000}}
LOGITS_VARIANTS = ("ours", "ours-kernel", "ours-noreuse", "ours-inplace", "ours-thp", "eager",
                   "eager-thp", "compile")
# Environment of a variant's child process (the user-settable knobs being measured).
VARIANT_ENV = {"ours-noreuse": {"CPO_FAST_CPU_GRAD_POOL": "0"},
               "ours-thp": {"THP_MEM_ALLOC_ENABLE": "1"},
               "eager-thp": {"THP_MEM_ALLOC_ENABLE": "1"}}


# ---- child side: one case per process -------------------------------------------------------

def _logits_step(case: dict):
    import torch

    import cpo_fast

    dtype, (N, V) = getattr(torch, case["dtype"]), (case["N"], case["V"])
    labels, g = torch.randint(0, V, (N,)), torch.randn(N)
    x0 = (torch.randn(N, V) * 2).to(dtype)

    def eager(x, y):
        return torch.log_softmax(x.float(), dim=-1).gather(-1, y[:, None]).squeeze(-1)

    if case["variant"] == "ours-kernel":
        # The C++ forward and backward alone, into an output buffer whose pages are present:
        # what the kernels cost without autograd, checks or allocation.
        from cpo_fast.cpu import token_logprobs as cpu_tok

        x3, out3 = x0.view(1, N, V), torch.zeros_like(x0).view(1, N, V)

        def step():
            lp, _, lse = cpu_tok.token_logprobs_forward(x3, labels, -100, False)
            cpu_tok.token_logprobs_backward(x3, labels, lse, None, g, None, -100, out3)
            return lp

        return step
    if case["variant"] == "ours-inplace":
        # The gradient is written over the logits buffer, as when the logits are an lm_head
        # output nothing else reads; torch.autograd.grad hands that buffer back as is (.grad
        # on a leaf would clone it). The buffer then holds gradients, which the next step
        # reads as logits: fine for timing.
        buf = x0.clone()

        def step():
            x = buf.detach().requires_grad_(True)
            lp = cpo_fast.token_logprobs(x, labels, backend="cpu", inplace_backward=True)
            return torch.autograd.grad(lp, x, g)[0]

        return step
    ours = lambda x, y: cpo_fast.token_logprobs(x, y, backend="cpu")
    variant = case["variant"]
    fn = (torch.compile(eager, dynamic=False) if variant == "compile"
          else ours if variant.startswith("ours") else eager)

    def step():
        x = x0.detach().requires_grad_(True)
        fn(x, labels).backward(g)
        return x.grad

    return step


def _linear_step(case: dict):
    import torch

    import cpo_fast

    dtype, (N, V, d) = getattr(torch, case["dtype"]), (case["N"], case["V"], case["d"])
    labels, g = torch.randint(0, V, (N,)), torch.randn(N)
    h0 = torch.randn(N, d).to(dtype)
    w0 = (torch.randn(V, d) / d**0.5 * 2).to(dtype)

    def eager(h, w, y):
        return torch.log_softmax((h @ w.T).float(), dim=-1).gather(-1, y[:, None]).squeeze(-1)

    # ours-known: the coefficients announced up front, so the gradients form in the forward
    coef = g if case["variant"] == "ours-known" else None
    fn = ((lambda h, w, y: cpo_fast.linear_token_logprobs(h, w, y, backend="cpu", grad_coef=coef))
          if case["variant"].startswith("ours") else eager)

    def step():
        h = h0.detach().requires_grad_(True)
        w = w0.detach().requires_grad_(case["train_weight"])
        fn(h, w, labels).backward(g)
        return h.grad, w.grad

    return step


def child(case: dict) -> dict:
    """Run one case in this process: warm up, measure memory once, then time."""
    import torch

    torch.manual_seed(0)
    if case["case"] == "copy":
        return {**case, "status": "ok", **harness.copy_bandwidth("cpu", case["bytes"])}
    step = (_logits_step if case["case"] == "logits" else _linear_step)(case)
    t0 = time.perf_counter()
    step()  # cold: the first call of a fresh process (first-touch faults, lazy set-up)
    cold_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(case["warmup"] - 1):
        step()
    row = {**case, "status": "ok", "cold_ms": cold_ms,
           "peak_extra_bytes": peak_extra_memory(step, "cpu")}
    if case["reps"]:
        row.update(measure(step, "cpu", warmup=0, iters=case["reps"]))
    return row


def run_case(case: dict) -> dict:
    env = {**os.environ, **VARIANT_ENV.get(case.get("variant", ""), {})}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {**case, "status": "error: " + " ".join(proc.stderr.strip().splitlines()[-1:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- parent side ---------------------------------------------------------------------------

def cases(args: argparse.Namespace, shape: dict) -> list[dict]:
    """Every case of the run, in run order (the copy first: it sets the floor)."""
    N, V, d = shape["N"], shape["V"], shape["d"]
    out: list[dict] = [{"case": "copy", "variant": "copy", "bytes": 512 << 20}]
    for lv in [] if getattr(args, "skip_logits", False) else shape.get("logits_v", [V]):
        for dtype in ("float32", "bfloat16"):
            for m in LOGITS_VARIANTS:
                if m == "compile" and (args.no_compile or lv != shape.get("logits_v", [V])[0]):
                    continue
                out.append({"case": "logits", "variant": m, "dtype": dtype, "N": N, "V": lv,
                            "reps": args.reps, "warmup": 2 if m == "compile" else 1})
    if getattr(args, "logits_only", False):
        return out
    kn = shape.get("known", {"N": N, "d": d, "V": V})
    for m in ("ours-known", "ours", "eager"):
        out.append({"case": "linear_known", "variant": m, "dtype": "float32", **kn,
                    "reps": args.linear_reps, "warmup": 1, "train_weight": True})
    if getattr(args, "known_only", False):
        return out
    for case, train_w in (("linear", True), ("linear_frozen", False)):
        for m in ("ours", "eager"):
            out.append({"case": case, "variant": m, "dtype": "float32", "N": N, "V": V, "d": d,
                        "reps": args.linear_reps, "warmup": 1, "train_weight": train_w})
    for v in shape["sweep_v"]:
        for m in ("ours", "eager"):
            out.append({"case": "linear_sweep", "variant": m, "dtype": "float32", "N": N, "V": v,
                        "d": 256, "reps": 0, "warmup": 1, "train_weight": False})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per logits case")
    ap.add_argument("--linear-reps", type=int, default=2, help="timed runs per linear case")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--logits-only", action="store_true",
                    help="only the copy floor and the logits-path cases")
    ap.add_argument("--skip-logits", action="store_true", help="leave the logits cases out")
    ap.add_argument("--logits-v", type=int, nargs="+", default=None,
                    help="vocabulary sizes of the logits cases (default: 32000 128256)")
    ap.add_argument("--known-only", action="store_true",
                    help="stop after the known-coefficient fused-linear cases")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    ap.add_argument("--render", metavar="JSON", help="re-render the report of a results JSON")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.render:
        harness.rerender(args.render, summarize, render, args.out)
        return

    shape = QUICK if args.quick else FULL
    if args.logits_v:
        shape = {**shape, "logits_v": args.logits_v}
    env = environment("cpu")
    rows = []
    for case in cases(args, shape):
        rows.append(run_case(case))
        r = rows[-1]
        print(f"{r['case']:13s} {r.get('dtype', ''):8s} {r['variant']:12s} "
              f"{harness.fmt_ms(r) if case['case'] != 'copy' else r.get('status')}", flush=True)
    copy = rows.pop(0)
    floors = {k: copy.get(k) for k in ("copy_bandwidth_gbs", "copy_bytes", "copy_timing")}
    record = {"environment": env, "rows": rows, "floors": floors}
    summary = summarize(record)
    settings = {**shape, "reps": args.reps, "linear_reps": args.linear_reps,
                "quick": args.quick, "compile": not args.no_compile}
    paths = harness.write_results("cpu", env, settings=settings, floors=floors, rows=rows,
                                  summary=summary, markdown=render, out_dir=args.out or RESULTS,
                                  quick=args.quick)
    print()
    print(paths[1].read_text())
    print("wrote", *paths)


# ---- report --------------------------------------------------------------------------------

def _find(rows: list[dict], case: str, variant: str, **kw) -> dict:
    for r in rows:
        if r["case"] == case and r["variant"] == variant and all(r.get(k) == v for k, v in kw.items()):
            return r
    return {"status": "not run"}


def _key(r: dict, rows: list[dict]) -> str:
    """Summary key ``case/dtype/variant``; logits rows add ``/V=...`` when the run has more
    than one logits vocabulary size."""
    base = f"{r['case']}/{r['dtype']}/{r['variant']}"
    multi = len({x.get("V") for x in rows if x["case"] == "logits"}) > 1
    return base + f"/V={r['V']}" if r["case"] == "logits" and multi else base


def _bytes_per_elem(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def summarize(record: dict) -> dict:
    """Speed-up and memory against eager, fraction of the bandwidth floor, per case."""
    rows, bw = record["rows"], record["floors"].get("copy_bandwidth_gbs") or float("nan")
    out: dict = {}
    for r in rows:
        if "median_ms" not in r or r["case"] == "linear_sweep":
            continue
        eager = _find(rows, r["case"], "eager", dtype=r["dtype"], V=r["V"])
        if "median_ms" not in eager:
            continue
        key = _key(r, rows)
        s = {"speedup_vs_eager": eager["median_ms"] / r["median_ms"],
             "mem_vs_eager": (r["peak_extra_bytes"] or 0) / max(eager["peak_extra_bytes"] or 1, 1)}
        if r["case"] == "logits":
            floor_ms = 3 * r["N"] * r["V"] * _bytes_per_elem(r["dtype"]) / (bw * 1e9) * 1e3
            s.update(floor_ms=floor_ms, fraction_of_floor=floor_ms / r["median_ms"])
        out[key] = s
    return out


def render(record: dict) -> str:
    """The markdown report, rendered from the record alone."""
    st, fl, rows, summ = record["settings"], record["floors"], record["rows"], record["summary"]
    N, V, d = st["N"], st["V"], st["d"]
    lines = [f"# CPU benchmark ({record['environment']['cores']} cores)", "",
             *harness.environment_lines(record),
             f"- bandwidth floor: torch copy of {fl['copy_bytes'] >> 20} MiB, read + write, "
             f"fastest of {fl['copy_timing']['iters']}: {fl['copy_bandwidth_gbs']:.1f} GB/s",
             "- ours = cpo_fast.token_logprobs(backend='cpu') (gradient buffer from the reuse "
             "pool); ours-kernel = the C++ forward + backward alone into a present buffer; "
             "ours-noreuse = CPO_FAST_CPU_GRAD_POOL=0 (a fresh mapping each step); "
             "ours-inplace = inplace_backward=True (gradient written over the logits); "
             "-thp = THP_MEM_ALLOC_ENABLE=1 (PyTorch's huge-page allocator); eager / compile = "
             "logits.float().log_softmax(-1).gather(-1, y) and its torch.compile",
             "- warm = median of the timed steps; cold = the first fwd+bwd of a fresh process; "
             "peak extra = RSS high-water of one step minus RSS before it (memory the pool "
             "keeps between steps is in 'before')", ""]
    for lv in st.get("logits_v", [V]):
        table = []
        for r in (r for r in rows if r["case"] == "logits" and r.get("V") == lv):
            s = summ.get(_key(r, rows), {})
            cold = r.get("cold_ms")
            table.append([r["dtype"], r["variant"], harness.fmt_ms(r),
                          "-" if cold is None else f"{cold:.0f}",
                          _x(s.get("speedup_vs_eager")),
                          harness.fmt_mib(r.get("peak_extra_bytes")),
                          _f(s.get("mem_vs_eager")), _f(s.get("floor_ms"), 1),
                          _pct(s.get("fraction_of_floor"))])
        lines += [f"## Logits path, N={N}, V={lv}", "", harness.fmt_table(
            ["dtype", "variant", "warm fwd+bwd ms [p20, p80]", "cold ms", "speedup vs eager",
             "peak extra MiB", "mem vs eager", "bandwidth floor ms", "fraction of floor"],
            table, "llrrrrrrr"), ""]
    known = [r for r in rows if r["case"] == "linear_known"]
    if known:
        kn = known[0]
        table = [[r["variant"], harness.fmt_ms(r, 0), "-" if r.get("cold_ms") is None
                  else f"{r['cold_ms']:.0f}", _x(summ.get(_key(r, rows), {}).get("speedup_vs_eager")),
                  harness.fmt_mib(r.get("peak_extra_bytes")),
                  _f(summ.get(_key(r, rows), {}).get("mem_vs_eager"))] for r in known]
        lines += [f"## Fused linear, trained head, coefficients known (N={kn['N']}, d={kn['d']}, "
                  f"V={kn['V']}, float32)", "", harness.fmt_table(
                      ["variant", "fwd+bwd ms [p20, p80]", "cold ms", "speedup vs eager",
                       "peak extra MiB", "mem vs eager"], table, "lrrrrr"), "",
                  "ours-known = cpo_fast.linear_token_logprobs(..., grad_coef=G) (6NdV, "
                  "gradients formed in the forward pass, returned by the backward); ours = the recompute op "
                  "(8NdV); eager = (h @ W.T).float().log_softmax(-1).gather(...) (6NdV).", ""]
    if not any(r["case"] in ("linear", "linear_frozen") for r in rows):
        return "\n".join(lines) + "\n"
    lines.pop()
    for case, title, flops in (
        ("linear", "weight trained",
         "FLOPs: fused 8NdV (forward, backward recompute, grad_hidden, grad_weight) vs eager "
         "6NdV; the fused op trades the recompute for never holding N x V logits."),
        ("linear_frozen", "weight frozen (LoRA case)",
         "FLOPs: fused 4NdV (logits, and sum_v p_v W_v accumulated in the forward; the "
         "backward is O(N d), no recompute) vs eager 4NdV (logits, grad_hidden)."),
    ):
        table = []
        for variant, name in (("ours", "ours (fused, blocks)"), ("eager", "eager mm + log_softmax")):
            r = _find(rows, case, variant)
            s = summ.get(f"{case}/float32/{variant}", {})
            table.append([name, harness.fmt_ms(r, 0), _x(s.get("speedup_vs_eager")),
                          harness.fmt_mib(r.get("peak_extra_bytes")), _f(s.get("mem_vs_eager"))])
        lines += ["", f"## Fused linear, N={N}, d={d}, V={V}, float32 ({title})", "",
                  harness.fmt_table(["variant", "fwd+bwd ms [p20, p80]", "speedup vs eager",
                                     "peak extra MiB", "mem vs eager"], table, "lrrrr"),
                  "", flops]
    sweep = [[v, harness.fmt_mib(_find(rows, "linear_sweep", "ours", V=v).get("peak_extra_bytes")),
              harness.fmt_mib(_find(rows, "linear_sweep", "eager", V=v).get("peak_extra_bytes"))]
             for v in st["sweep_v"]]
    lines += ["", f"## Fused linear peak extra memory as V grows (N={N}, d=256, frozen weight)", "",
              harness.fmt_table(["V", "ours MiB", "eager MiB"], sweep, "rrr"), "",
              "## Targets (docs/benchmarks.md)", "", *_targets(summ, sweep, st["sweep_v"])]
    return "\n".join(lines) + "\n"


def _targets(summ: dict, sweep: list[list], sweep_v: list[int]) -> list[str]:
    met = lambda ok: "met" if ok else "NOT met"
    fp = summ.get("logits/float32/ours") or next(
        (v for k, v in summ.items() if k.startswith("logits/float32/ours/")), {})
    sp, mr = fp.get("speedup_vs_eager", float("nan")), fp.get("mem_vs_eager", float("nan"))
    floor = [f"{' '.join(k.split('/')[1::2])}: {v['fraction_of_floor']:.0%}"
             for k, v in summ.items()
             if k.startswith("logits/") and k.split("/")[2] == "ours" and "fraction_of_floor" in v]
    lin = summ.get("linear/float32/ours", {}).get("speedup_vs_eager", float("nan"))
    out = [f"- logits path >= 85% of the copy-bandwidth floor (warm, default allocator): "
           f"{'; '.join(floor) or '-'}",
           f"- logits path fp32 >= 3x eager: {sp:.2f}x, {met(sp >= 3)}; peak extra memory "
           f"<= 1/3 of eager: {mr:.3f}, {met(mr <= 1 / 3 + 1e-3)}",
           f"- fused linear peak extra memory independent of V: "
           f"{', '.join(str(r[1]) for r in sweep)} MiB for V = {sweep_v} (eager grows linearly)",
           f"- fused linear no slower than eager, weight trained: {lin:.2f}x, {met(lin >= 1)} "
           "(compute bound: 8NdV against 6NdV FLOPs, so about 0.75x is the ceiling of a "
           "recompute design when the GEMMs dominate)"]
    fr = summ.get("linear_frozen/float32/ours")
    if fr:
        out.append(f"- fused linear no slower than eager, weight frozen (LoRA): "
                   f"{fr['speedup_vs_eager']:.2f}x, {met(fr['speedup_vs_eager'] >= 1)}, at "
                   f"{fr['mem_vs_eager']:.2f}x eager's peak extra memory (4NdV FLOPs on both "
                   "sides; ours never holds the N x V logits)")
    return out


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


if __name__ == "__main__":
    main()
