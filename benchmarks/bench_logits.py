"""Fused logits path: fwd+bwd time and peak memory against PyTorch eager and torch.compile.

    python benchmarks/bench_logits.py            # GPU: the design shapes; CPU: small ones
    python benchmarks/bench_logits.py --quick    # one small shape (smoke test)

For each shape (N tokens x V vocabulary, bf16 on the GPU / fp32 on the CPU) it times
forward + backward of ``sum_t G_t * logp_t`` (gradient taken with torch.autograd.grad so
no .grad accumulation copy is counted) for:
  - ours:          cpo_fast.token_logprobs (Triton on CUDA, the C++ core on CPU)
  - ours-inplace:  the same, gradient written over the logits buffer
  - eager:         logits.float().log_softmax(-1).gather(-1, labels)
  - compile:       torch.compile of eager
and reports the bandwidth floor: bytes = 2 reads + 1 write of N x V elements, over the
device-to-device copy bandwidth (read + write) measured in the same run, and the fraction
of that floor each variant reaches. Timing, memory, floor and the results record come from
cpo_fast.bench (docs/benchmarks.md); results: results/<device>-logits[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

import cpo_fast
from cpo_fast.bench import harness
from cpo_fast.bench.environment import environment
from cpo_fast.bench.harness import fmt_mib, fmt_ms, fmt_table
from cpo_fast.bench.measure import measure, peak_extra_memory

RESULTS = Path(__file__).resolve().parent / "results"

GPU_SHAPES = [(n, v) for n in (4096, 16384, 65536) for v in (32000, 128256, 151936, 262144)]
CPU_SHAPES = [(512, 32000), (2048, 32000)]


def eager(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def variants(device: str) -> dict:
    compiled = torch.compile(eager, dynamic=False)
    return {
        "ours": lambda z, y: cpo_fast.token_logprobs(z, y, validate=False),
        "ours-inplace": lambda z, y: cpo_fast.token_logprobs(z, y, validate=False, inplace_backward=True),
        "eager": eager,
        "compile": compiled,
    }


def run_case(fn, N: int, V: int, dtype: torch.dtype, device: str, iters: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(N, V, generator=g, device=device, dtype=torch.float32).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    G = torch.randn(N, device=device)

    def step():
        # A non-leaf copy stands in for the model's logits (the in-place variant writes over it).
        z = base.detach().requires_grad_(True)
        logits = z.view_as(z)
        (grad,) = torch.autograd.grad((fn(logits, labels) * G).sum(), logits)
        return grad

    row = measure(step, device, warmup=2, iters=iters)
    row["peak_extra_bytes"] = peak_extra_memory(step, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="one small shape")
    ap.add_argument("--shapes", nargs="+", metavar="NxV", default=None,
                    help="shapes to run instead of the defaults, e.g. 4096x32000 16384x128256")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="variants to run")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    args = ap.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    shapes = [(256, 4096)] if args.quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    if args.shapes:
        try:
            shapes = [(int(n), int(v)) for n, v in (s.lower().split("x") for s in args.shapes)]
        except ValueError:
            ap.error(f"--shapes takes NxV pairs such as 4096x32000, got {args.shapes}")
    iters = args.iters or (10 if device == "cuda" else 3)
    env = environment(device)
    floors = harness.copy_bandwidth(device, (1 << 30) if device == "cuda" else (256 << 20))
    bw = floors["copy_bandwidth_gbs"] * 1e9
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    print(f"measured copy bandwidth (read+write): {bw / 1e9:.1f} GB/s; dtype {dtype}")
    vs = variants(device)
    if args.only:
        vs = {k: v for k, v in vs.items() if k in args.only}
    rows = []
    esize = torch.finfo(dtype).bits // 8
    for N, V in shapes:
        floor_ms = 3 * N * V * esize / bw * 1e3
        for name, fn in vs.items():
            row = dict(N=N, V=V, dtype=str(dtype).removeprefix("torch."), variant=name,
                       floor_ms=floor_ms)
            try:
                row.update(run_case(fn, N, V, dtype, device, iters), status="ok")
                row["fraction_of_floor"] = floor_ms / row["median_ms"]
            except torch.OutOfMemoryError:
                row["status"] = "oom"
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(fmt_table(HEADERS, [_cells(row, esize)]).splitlines()[-1], flush=True)
    settings = {"dtype": str(dtype).removeprefix("torch."), "shapes": shapes, "iters": iters,
                "warmup": 2, "quick": args.quick}
    if args.no_write:
        print()
        print(fmt_table(HEADERS, [_cells(r, esize) for r in rows]))
        return
    for p in harness.write_results("logits", env, settings=settings, floors=floors, rows=rows,
                                   markdown=render, out_dir=args.out or RESULTS, quick=args.quick):
        print("wrote", p)


HEADERS = ["N", "V", "variant", "fwd+bwd ms [p20, p80]", "floor ms", "of floor",
           "peak extra MiB", "x logits size"]


def _cells(r: dict, esize: int) -> list[object]:
    mem = r.get("peak_extra_bytes")
    frac = r.get("fraction_of_floor")
    return [r["N"], r["V"], r["variant"], fmt_ms(r, 3), f"{r['floor_ms']:.3f}",
            f"{frac:.0%}" if frac else "-", fmt_mib(mem),
            f"{mem / (r['N'] * r['V'] * esize):.2f}" if mem is not None else "-"]


def render(record: dict) -> str:
    esize = torch.finfo(getattr(torch, record["settings"]["dtype"])).bits // 8
    fl = record["floors"]
    return (f"# Logits path, {record['environment']['device']}\n\n"
            + "\n".join(harness.environment_lines(record)) + "\n"
            f"- dtype {record['settings']['dtype']}; bandwidth floor = (2 reads + 1 write of "
            f"N x V) / copy bandwidth ({fl['copy_bytes'] >> 20} MiB copy, read + write, "
            f"fastest of {fl['copy_timing']['iters']}: {fl['copy_bandwidth_gbs']:.1f} GB/s)\n\n"
            + fmt_table(HEADERS, [_cells(r, esize) for r in record["rows"]]) + "\n")

if __name__ == "__main__":
    main()
