"""Fused logits path: fwd+bwd time and peak memory against PyTorch eager and torch.compile.

    python benchmarks/bench_logits.py            # GPU: design.md's shapes; CPU: small ones
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
of that floor each variant reaches. Results go to benchmarks/results/<device>-logits.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    copy_bandwidth,
    environment,
    fmt_table,
    peak_extra_memory,
    time_fn,
    write_results,
)

import cpo_fast  # noqa: E402

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


def run_case(fn, N: int, V: int, dtype: torch.dtype, device: str, iters: int) -> tuple[float, int | None]:
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

    ms = time_fn(step, device, warmup=2, iters=iters)
    mem = peak_extra_memory(step, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return ms, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="one small shape")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="variants to run")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    shapes = [(256, 4096)] if args.quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    iters = args.iters or (10 if device == "cuda" else 3)
    env = environment(device)
    bw = copy_bandwidth(device, (1 << 30) if device == "cuda" else (256 << 20))
    env["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    print(f"measured copy bandwidth (read+write): {bw / 1e9:.1f} GB/s; dtype {dtype}")
    vs = variants(device)
    if args.only:
        vs = {k: v for k, v in vs.items() if k in args.only}
    rows, table = [], []
    esize = torch.finfo(dtype).bits // 8
    for N, V in shapes:
        floor_ms = 3 * N * V * esize / bw * 1e3
        for name, fn in vs.items():
            try:
                ms, mem = run_case(fn, N, V, dtype, device, iters)
            except torch.OutOfMemoryError:
                ms, mem = None, None
                if device == "cuda":
                    torch.cuda.empty_cache()
            frac = floor_ms / ms if ms else None
            rows.append(dict(N=N, V=V, dtype=str(dtype), variant=name, ms=ms, peak_extra_bytes=mem,
                             floor_ms=floor_ms, fraction_of_floor=frac))
            table.append([N, V, name, f"{ms:.3f}" if ms else "OOM", f"{floor_ms:.3f}",
                          f"{frac:.0%}" if frac else "-",
                          f"{mem / 2**20:.1f}" if mem is not None else "-",
                          f"{mem / (N * V * esize):.2f}" if mem is not None else "-"])
            print(fmt_table(["N", "V", "variant", "fwd+bwd ms", "floor ms", "of floor",
                             "peak extra MiB", "x logits size"], table[-1:]).splitlines()[-1], flush=True)
    headers = ["N", "V", "variant", "fwd+bwd ms", "floor ms", "of floor", "peak extra MiB",
               "x logits size"]
    md = (f"# Logits path, {env['device']}\n\n"
          f"torch {env['torch']}, triton {env['triton']}, dtype {dtype}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write), threads {env['threads']}, "
          f"load average {env['loadavg'][0]:.2f}.\n\n"
          "Floor = (2 reads + 1 write of N x V) / copy bandwidth. Peak extra = peak memory of "
          "one fwd+bwd beyond the inputs (CUDA allocator peak, or peak RSS on the CPU).\n\n"
          + fmt_table(headers, table) + "\n")
    print()
    print(md)
    if not args.no_write:
        for p in write_results("logits", env, rows, md):
            print("wrote", p)


if __name__ == "__main__":
    main()
