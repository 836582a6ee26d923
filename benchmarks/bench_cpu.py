"""CPU benchmark of the C++ core against PyTorch eager and torch.compile.

Measures, for each case, fwd+bwd wall time (median of --reps runs after warm-up) and peak
extra memory (the process's RSS high-water mark during one fwd+bwd minus its RSS before,
after resetting the mark through /proc/self/clear_refs; tracemalloc cannot see torch's
allocations). Each case runs in its own subprocess so that one case's freed memory or
compiled graphs do not colour the next.

Cases:
  logits path, N=2048, V=32000, fp32 and bf16:   cpo_fast.token_logprobs (backend="cpu")
      vs eager  logits.float().log_softmax(-1).gather(-1, y)   and its torch.compile
  fused linear, N=2048, d=1024, V=32000, fp32:   cpo_fast.linear_token_logprobs
      vs eager  (hidden @ weight.T).float().log_softmax(-1).gather(-1, y)
      twice: weight trained (recompute backward) and weight frozen (requires_grad=False,
      the LoRA case: the forward accumulates sum_v p_v W_v, the backward is O(N d))
  fused linear memory sweep (frozen weight, d=256, V in 16000/32000/64000): peak extra
      memory of the fused op against eager as V grows
  memory-bandwidth floor: a large torch copy, (bytes read + written) / time; the logits
      path moves 2 reads + 1 write of N x V x dtype bytes (forward read, backward read
      and write), so floor = 3 N V b / bandwidth.

Usage: python benchmarks/bench_cpu.py [--reps 5] [--quick] [--no-compile]
Writes benchmarks/results/cpu-<ncores>core.md and .json next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---- child side ---------------------------------------------------------------------------

def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def _peak_extra_mb(step) -> float:
    """RSS high-water mark during one call of step, minus the RSS just before (MiB)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kb()["VmRSS"]
    step()
    return (_status_kb()["VmHWM"] - before) / 1024.0


def _make_step(case: dict):
    import torch

    import cpo_fast

    torch.manual_seed(0)
    if case["op"] == "copy":
        n = case["bytes"] // 4
        src, dst = torch.ones(n), torch.zeros(n)
        return lambda: dst.copy_(src)

    dtype = getattr(torch, case["dtype"])
    N, V = case["N"], case["V"]
    labels = torch.randint(0, V, (N,))
    g = torch.randn(N)

    if case["op"] == "logits":
        x0 = (torch.randn(N, V) * 2).to(dtype)

        def eager_fn(x, y):
            return torch.log_softmax(x.float(), dim=-1).gather(-1, y[:, None]).squeeze(-1)

        if case["method"] == "ours-inplace":
            # The gradient is written over the logits buffer (inplace_backward=True), as when
            # the logits are an lm_head output nothing else reads. torch.autograd.grad hands
            # that buffer back as is (.grad on a leaf would clone it). The buffer then holds
            # gradients, which the next step reads as logits: fine for timing.
            buf = x0.clone()

            def step():
                x = buf.detach().requires_grad_(True)
                lp = cpo_fast.token_logprobs(x, labels, backend="cpu", inplace_backward=True)
                return torch.autograd.grad(lp, x, g)[0]

            return step
        if case["method"] == "ours":
            fn = lambda x, y: cpo_fast.token_logprobs(x, y, backend="cpu")
        elif case["method"] == "compile":
            fn = torch.compile(eager_fn, dynamic=False)
        else:
            fn = eager_fn

        def step():
            x = x0.detach().requires_grad_(True)
            fn(x, labels).backward(g)
            return x.grad

        return step

    if case["op"] == "linear":
        d = case["d"]
        h0 = torch.randn(N, d).to(dtype)
        w0 = (torch.randn(V, d) / d**0.5 * 2).to(dtype)
        train_w = case.get("train_weight", True)

        def eager_fn(h, w, y):
            z = (h @ w.T).float()
            return torch.log_softmax(z, dim=-1).gather(-1, y[:, None]).squeeze(-1)

        if case["method"] == "ours":
            fn = lambda h, w, y: cpo_fast.linear_token_logprobs(h, w, y, backend="cpu")
        else:
            fn = eager_fn

        def step():
            h = h0.detach().requires_grad_(True)
            w = w0.detach().requires_grad_(train_w)
            fn(h, w, labels).backward(g)
            return h.grad, w.grad

        return step

    raise ValueError(case["op"])


def child(case: dict) -> dict:
    import torch

    step = _make_step(case)
    for _ in range(case.get("warmup", 1)):
        step()
    res: dict = {"case": case}
    res["peak_extra_mb"] = _peak_extra_mb(step)
    times = []
    for _ in range(case.get("reps", 0)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if times:
        res["times_s"] = times
        res["median_s"] = statistics.median(times)
        res["min_s"] = min(times)
    res["threads"] = torch.get_num_threads()
    if case["op"] == "copy" and times:
        res["bandwidth_gbs"] = 2 * case["bytes"] / res["min_s"] / 1e9  # read + write
    return res


# ---- parent side --------------------------------------------------------------------------

def run_case(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def thp_mode() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "n/a"


def fmt_ms(r: dict) -> str:
    return f"{r['median_s'] * 1e3:9.1f}" if "median_s" in r else "      n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per logits case")
    ap.add_argument("--linear-reps", type=int, default=2, help="timed runs per linear case")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--render", metavar="JSON", help="re-render the report from a results JSON")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        saved["meta"].setdefault("sweep_v", [16000, 32000, 64000])
        text, summary = render(saved["meta"], saved["results"])
        write(args, saved["meta"], summary, saved["results"], text)
        return

    import torch

    from cpo_fast import _C

    N, V, d = (256, 4000, 256) if args.quick else (2048, 32000, 1024)
    load_before = os.getloadavg()
    results: dict = {"logits": {}, "linear": {}, "sweep": {}}

    bw = run_case({"op": "copy", "method": "copy", "dtype": "float32", "N": 0, "V": 0,
                   "bytes": 512 << 20, "reps": 5, "warmup": 2})
    results["copy"] = bw
    for dtype in ("float32", "bfloat16"):
        methods = ["ours", "ours-inplace", "eager"] + ([] if args.no_compile else ["compile"])
        for m in methods:
            case = {"op": "logits", "method": m, "dtype": dtype, "N": N, "V": V,
                    "reps": args.reps, "warmup": 2 if m == "compile" else 1}
            results["logits"][f"{dtype}/{m}"] = run_case(case)
            print(f"logits {dtype:8s} {m:8s} {fmt_ms(results['logits'][f'{dtype}/{m}'])} ms",
                  flush=True)
    results["linear_frozen"] = {}
    for key, train_w in (("linear", True), ("linear_frozen", False)):
        for m in ("ours", "eager"):
            case = {"op": "linear", "method": m, "dtype": "float32", "N": N, "V": V, "d": d,
                    "reps": args.linear_reps, "warmup": 1, "train_weight": train_w}
            results[key][m] = run_case(case)
            print(f"{key:13s} float32 {m:8s} {fmt_ms(results[key][m])} ms", flush=True)
    sweep_v = (2000, 4000, 8000) if args.quick else (16000, 32000, 64000)
    for v in sweep_v:
        for m in ("ours", "eager"):
            case = {"op": "linear", "method": m, "dtype": "float32", "N": N, "V": v,
                    "d": 256, "reps": 0, "warmup": 1, "train_weight": False}
            results["sweep"][f"{v}/{m}"] = run_case(case)
    load_after = os.getloadavg()

    # ---- report ----
    ncores = os.cpu_count() or 1
    bw_gbs = bw.get("bandwidth_gbs", float("nan"))
    meta = {
        "cpu_model": cpu_model(), "cores": ncores, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "isa": _C.isa(),
        "thp": thp_mode(), "loadavg_before": load_before, "loadavg_after": load_after,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "shapes": {"N": N, "V": V, "d": d},
        "copy_bandwidth_gbs": bw_gbs,
    }
    meta["sweep_v"] = list(sweep_v)
    text, summary = render(meta, results)
    write(args, meta, summary, results, text)


def write(args, meta: dict, summary: dict, results: dict, text: str) -> None:
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{meta['cores']}core" + ("-quick" if args.quick else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "results": results}, indent=1))
    print(f"wrote {out / stem}.md and .json")


def render(meta: dict, results: dict) -> tuple[str, dict]:
    """The markdown report and the summary numbers, from the raw results."""
    N, V, d = meta["shapes"]["N"], meta["shapes"]["V"], meta["shapes"]["d"]
    ncores, bw_gbs, sweep_v = meta["cores"], meta["copy_bandwidth_gbs"], meta["sweep_v"]
    load_before, load_after = meta["loadavg_before"], meta["loadavg_after"]
    lines = [
        f"# CPU benchmark ({ncores} cores)",
        "",
        f"- CPU: {meta['cpu_model']}, {ncores} cores, torch {meta['torch']} "
        f"({meta['torch_threads']} threads), kernel build: {meta['isa']}, THP: {meta['thp']}",
        f"- load average before / after: {tuple(round(x, 2) for x in load_before)} / "
        f"{tuple(round(x, 2) for x in load_after)} (the machine is shared: a load above the "
        "core count means other processes competed for the CPU during the run)",
        f"- memory bandwidth (torch copy of 512 MiB, read + write): {bw_gbs:.1f} GB/s",
        "- time: median fwd+bwd wall time; memory: peak RSS growth during one fwd+bwd "
        "(the returned gradient included)",
        "- ours = cpo_fast.token_logprobs(backend='cpu'); ours-inplace = the same with "
        "inplace_backward=True (gradient written over the logits); eager / compile = "
        "logits.float().log_softmax(-1).gather(-1, y) and its torch.compile",
        "",
        f"## Logits path, N={N}, V={V}",
        "",
        "| dtype | method | fwd+bwd ms | speedup vs eager | peak extra MiB | mem vs eager "
        "| bandwidth floor ms | fraction of floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict = {}
    for dtype in ("float32", "bfloat16"):
        eb = 4 if dtype == "float32" else 2
        floor_ms = 3 * N * V * eb / (bw_gbs * 1e9) * 1e3
        eager = results["logits"].get(f"{dtype}/eager", {})
        for m in ("ours", "ours-inplace", "eager", "compile"):
            r = results["logits"].get(f"{dtype}/{m}")
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {dtype} | {m} | error: {r['error']} | | | | | |")
                continue
            sp = eager["median_s"] / r["median_s"]
            mr = r["peak_extra_mb"] / max(eager["peak_extra_mb"], 1e-9)
            frac = floor_ms / (r["median_s"] * 1e3)
            lines.append(
                f"| {dtype} | {m} | {r['median_s'] * 1e3:.1f} | {sp:.2f}x | "
                f"{r['peak_extra_mb']:.0f} | {mr:.2f} | {floor_ms:.1f} | {frac:.0%} |")
            summary[f"logits/{dtype}/{m}"] = {"speedup_vs_eager": sp, "mem_vs_eager": mr,
                                              "fraction_of_bw_floor": frac}
    for key, title, flops in (
        ("linear", "weight trained",
         "FLOPs: fused 8NdV (forward, backward recompute, grad_hidden, grad_weight) vs eager "
         "6NdV; the fused op trades the recompute for never holding N x V logits."),
        ("linear_frozen", "weight frozen (LoRA case)",
         "FLOPs: fused 4NdV (logits, and sum_v p_v W_v accumulated in the forward; the "
         "backward is O(N d), no recompute) vs eager 4NdV (logits, grad_hidden)."),
    ):
        if key not in results:  # results saved before this case existed
            continue
        lo, le = results[key]["ours"], results[key]["eager"]
        lines += [
            "",
            f"## Fused linear, N={N}, d={d}, V={V}, float32 ({title})",
            "",
            "| method | fwd+bwd ms | speedup vs eager | peak extra MiB | mem vs eager |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in (("ours (fused, blocks)", lo), ("eager mm + log_softmax", le)):
            if "error" in r or "error" in le:
                lines.append(f"| {name} | error: {r.get('error', le.get('error'))} | | | |")
                continue
            sp = le["median_s"] / r["median_s"]
            mr = r["peak_extra_mb"] / le["peak_extra_mb"]
            lines.append(f"| {name} | {r['median_s'] * 1e3:.0f} | {sp:.2f}x | "
                         f"{r['peak_extra_mb']:.0f} | {mr:.2f} |")
        if "median_s" in lo and "median_s" in le:
            summary[f"{key}/speedup_vs_eager"] = le["median_s"] / lo["median_s"]
            summary[f"{key}/mem_vs_eager"] = lo["peak_extra_mb"] / le["peak_extra_mb"]
        lines += ["", flops]
    lines += [
        "",
        f"## Fused linear peak extra memory as V grows (N={N}, d=256, frozen weight)",
        "",
        "| V | ours MiB | eager MiB |",
        "|---:|---:|---:|",
    ]
    for v in sweep_v:
        o, e = results["sweep"][f"{v}/ours"], results["sweep"][f"{v}/eager"]
        lines.append(f"| {v} | {o.get('peak_extra_mb', float('nan')):.0f} | "
                     f"{e.get('peak_extra_mb', float('nan')):.0f} |")
    lines += ["", "## Targets (issue 3)", ""]
    fp = summary.get("logits/float32/ours", {})
    lines.append(
        f"- logits path fp32 >= 2.5x eager (design.md: 3x): "
        f"{fp.get('speedup_vs_eager', float('nan')):.2f}x, "
        f"{'met' if fp.get('speedup_vs_eager', 0) >= 3 else 'NOT met'}; peak extra memory "
        f"<= 1/3 of eager: {fp.get('mem_vs_eager', float('nan')):.3f}, "
        f"{'met' if fp.get('mem_vs_eager', 9) <= 1 / 3 + 1e-3 else 'NOT met'}")
    sw = [results["sweep"].get(f"{v}/ours", {}).get("peak_extra_mb", float("nan"))
          for v in sweep_v]
    sw = ", ".join(f"{x:.0f}" for x in sw)
    lines.append(f"- fused linear peak extra memory independent of V: {sw} MiB for V = "
                 f"{list(sweep_v)} (eager grows linearly)")
    sp = summary.get("linear/speedup_vs_eager", float("nan"))
    lines.append(
        f"- fused linear no slower than eager, weight trained: {sp:.2f}x, "
        f"{'met' if sp >= 1 else 'NOT met'} (compute bound: 8NdV against 6NdV FLOPs, so "
        "about 0.75x is the ceiling of a recompute design when the GEMMs dominate; not "
        "addressed here)")
    if "linear_frozen/speedup_vs_eager" in summary:
        sp = summary["linear_frozen/speedup_vs_eager"]
        mr = summary["linear_frozen/mem_vs_eager"]
        lines.append(
            f"- fused linear no slower than eager, weight frozen (LoRA): {sp:.2f}x, "
            f"{'met' if sp >= 1 else 'NOT met'}, at {mr:.2f}x eager's peak extra memory "
            "(4NdV FLOPs on both sides; ours never holds the N x V logits)")
    return "\n".join(lines) + "\n", summary


if __name__ == "__main__":
    main()
