"""Fused-linear path: fwd+bwd time and peak memory against PyTorch eager, torch.compile,
Liger-Kernel and Cut Cross-Entropy, with the FLOP floor.

    python benchmarks/bench_linear.py                     # GPU: the design shapes
    python benchmarks/bench_linear.py --N 16384 --V 128256 --d 4096   # one shape
    python benchmarks/bench_linear.py --cpu               # CPU: tiny shapes, exercises the script
    python benchmarks/bench_linear.py --cpu --smallest    # the smoke test's setting

Objective, the same for every variant: ``loss = sum_t G_t * logp_t`` with random G (the
shape of a CPO / DR-CPO gradient: any per-token weight), gradients of hidden [N, d] and
weight [V, d] taken with torch.autograd.grad. Variants:
  - ours:     cpo_fast.linear_token_logprobs (Triton on CUDA; on CPU the Triton
              interpreter, the C++ core if built, and the PyTorch reference)
  - ours-rows1024: the same with the memory-lean backward (1024 rows per pass)
  - eager:    (h @ W.T).float().log_softmax(-1).gather(labels)
  - compile:  torch.compile of eager
  - liger:    Liger-Kernel's fused linear cross entropy, reduction="none" (per-token -logp)
  - cce:      cut_cross_entropy.linear_cross_entropy(..., reduction="none"), its default
              gradient filter (filter_eps="high")
Peers not installed are reported as skipped. Each case catches OOM and moves on.

FLOP floor: 8 N d V (forward 2, backward recompute 2, grad_hidden 2, grad_weight 2) over
the matmul rate measured in the same run (bf16 8192^3 on CUDA; fp32 1024^3 on CPU);
"floor %" is floor time / median time. Memory: peak bytes allocated during fwd+bwd
beyond the inputs, and the same minus the two gradients ("scratch"), which the design
bounds by 1% of the bf16 N x V logits at N=16384, V=128256, d=4096.
Timing, memory, floor and the results record come from cpo_fast.bench (docs/benchmarks.md);
results: results/<device>-linear[-quick].{json,md} (--smallest counts as quick).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode (automatic without CUDA)")
    p.add_argument("--smallest", action="store_true", help="one tiny shape, one iteration")
    p.add_argument("--N", type=int, nargs="*", help="token counts (default: the design shapes)")
    p.add_argument("--V", type=int, nargs="*", help="vocabulary sizes")
    p.add_argument("--d", type=int, nargs="*", help="hidden widths")
    p.add_argument("--variants", nargs="*", help="subset of variants to run")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])

import torch  # noqa: E402

CUDA = torch.cuda.is_available() and not ARGS.cpu
if not CUDA and "triton" not in sys.modules:
    # The Triton variant runs on CPU tensors only under the interpreter, set before import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cpo_fast  # noqa: E402
from cpo_fast._backend import cpu_extension_available, triton_interpreting  # noqa: E402
from cpo_fast.bench import harness  # noqa: E402
from cpo_fast.bench.environment import environment  # noqa: E402
from cpo_fast.bench.harness import fmt_mib, fmt_ms, fmt_table  # noqa: E402
from cpo_fast.bench.measure import measure, peak_extra_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

GPU_N, GPU_V, GPU_D = (4096, 16384, 65536), (32000, 128256, 151936, 262144), (2048, 4096)
CPU_N, CPU_V, CPU_D = (64, 128), (1001, 2053), (64,)
SMALLEST = ((16,), (257,), (32,))
Skip = str  # a variant is a callable, (callable, env vars to set around it), or a skip reason


def _logp_eager(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (h @ w.T).float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _liger() -> Callable | Skip:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return "skipped: liger-kernel not installed"
    return lambda h, w, y: -liger_fused_linear_cross_entropy(h, w, y, reduction="none")


def _cce() -> Callable | Skip:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return "skipped: cut-cross-entropy not installed"
    return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none")


def variants(cuda: bool) -> dict[str, Callable | tuple[Callable, dict] | Skip]:
    """name -> per-token logp function (h, W, labels) -> [N] float, or a skip reason."""
    out: dict[str, Callable | Skip] = {}
    if cuda:
        out["ours"] = lambda h, w, y: cpo_fast.linear_token_logprobs(
            h, w, y, backend="triton", validate=False)
        # Memory-lean backward: 1024 rows per pass (CPO_FAST_LINEAR_ROW_GROUP), see the
        # kernel's docstring; read at backward time, hence set around the whole step.
        out["ours-rows1024"] = (out["ours"], {"CPO_FAST_LINEAR_ROW_GROUP": "1024"})
        out["eager"] = _logp_eager
        out["compile"] = torch.compile(_logp_eager, dynamic=False)
        out["liger"] = _liger()
        out["cce"] = _cce()
        return out
    out["ours-triton-interp"] = (
        (lambda h, w, y: cpo_fast.linear_token_logprobs(h, w, y, backend="triton"))
        if triton_interpreting() else "skipped: TRITON_INTERPRET!=1 when triton was imported")
    out["ours-cpu"] = (
        (lambda h, w, y: cpo_fast.linear_token_logprobs(h, w, y, backend="cpu"))
        if cpu_extension_available() else "skipped: C++ extension cpo_fast._C not built")
    out["reference"] = lambda h, w, y: cpo_fast.linear_token_logprobs(
        h, w, y, backend="reference")
    for peer in ("eager", "compile", "liger", "cce"):
        out[peer] = "skipped: GPU-only peer (CPU mode runs our backends only)"
    return out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_case(fn: Callable | tuple[Callable, dict], N: int, V: int, d: int, dtype: torch.dtype,
             device: str, warmup: int, iters: int) -> dict:
    fn, env = fn if isinstance(fn, tuple) else (fn, {})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run_case(fn, N, V, d, dtype, device, warmup, iters)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_case(fn: Callable, N: int, V: int, d: int, dtype: torch.dtype, device: str,
              warmup: int, iters: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(N, d, generator=g, device=device) / d**0.25).to(dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g, device=device) / d**0.25).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g, device=device)
    G = torch.randn(N, generator=g, device=device)

    def step() -> None:
        logp = fn(h, w, y)
        torch.autograd.grad((logp.float() * G).sum(), (h, w))

    peak = peak_extra_memory(step, device)  # first call: also the JIT / compile warm-up
    row = measure(step, device, warmup=max(warmup - 1, 0), iters=iters)
    grads = (N * d + V * d) * h.element_size()
    return {**row, "peak_extra_bytes": peak,
            "scratch_bytes": None if peak is None else peak - grads}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv) if argv is not None else ARGS
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smallest:
        Ns, Vs, Ds = SMALLEST
    else:
        Ns, Vs, Ds = (GPU_N, GPU_V, GPU_D) if cuda else (CPU_N, CPU_V, CPU_D)
    Ns, Vs, Ds = args.N or Ns, args.V or Vs, args.d or Ds
    small = args.smallest
    warmup = args.warmup if args.warmup is not None else (0 if small else (3 if cuda else 1))
    iters = args.iters if args.iters is not None else (1 if small else (5 if cuda else 2))

    env = environment(device)
    floors = harness.matmul_rate(device)
    rate = floors["matmul_gflops"] * 1e9
    print(f"# fused-linear fwd+bwd on {env['device']} ({dtype}); matmul {floors['matmul_shape']}: "
          f"{_flops(rate)}")
    fns = variants(cuda)
    if args.variants:
        fns = {k: v for k, v in fns.items() if k in args.variants}
    rows: list[dict] = []
    for d in Ds:
        for V in Vs:
            for N in Ns:
                for name, fn in fns.items():
                    rows.append(_row(name, fn, N, V, d, dtype, device, warmup, iters, rate))
                    _print_row(rows[-1])
    settings = {"dtype": str(dtype).removeprefix("torch."), "N": list(Ns), "V": list(Vs),
                "d": list(Ds), "warmup": warmup, "iters": iters, "quick": small}
    jpath, mpath = harness.write_results("linear", env, settings=settings, floors=floors,
                                         rows=rows, markdown=_markdown, out_dir=args.out or RESULTS,
                                         quick=small)
    print(f"wrote {jpath} and {mpath}")
    return {"record": json.loads(jpath.read_text()), "json": str(jpath), "markdown": str(mpath)}


def _row(name: str, fn, N: int, V: int, d: int, dtype: torch.dtype, device: str, warmup: int,
         iters: int, rate: float) -> dict:
    """One variant at one shape: timing and memory, or why it did not run."""
    floor_ms = 8 * N * d * V / rate * 1e3
    row = {"variant": name, "N": N, "V": V, "d": d, "floor_ms": floor_ms,
           "logits_bf16_bytes": N * V * 2}
    if isinstance(fn, str):
        return {**row, "status": fn}
    try:
        row.update(run_case(fn, N, V, d, dtype, device, warmup, iters), status="ok")
        row["fraction_of_floor"] = floor_ms / row["median_ms"]
    except Exception as e:  # noqa: BLE001 - one failure must not end the run
        row["status"] = "oom" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def _flops(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def _cells(r: dict) -> list[object]:
    ok = r["status"] == "ok"
    scratch = r.get("scratch_bytes")
    pct = "-" if not ok or scratch is None else f"{100 * max(scratch, 0) / r['logits_bf16_bytes']:.2f}"
    return [r["N"], r["V"], r["d"], r["variant"], fmt_ms(r, 2), f"{r['floor_ms']:.3f}",
            f"{100 * r['fraction_of_floor']:.1f}" if ok else "-",
            fmt_mib(r.get("peak_extra_bytes")) if ok else "-", fmt_mib(scratch) if ok else "-", pct]


HEADERS = ["N", "V", "d", "variant", "fwd+bwd ms [p20, p80]", "floor ms", "floor %",
           "peak MiB", "scratch MiB", "scratch % of bf16 logits"]


def _print_row(r: dict) -> None:
    print("  ".join(f"{h}={c}" for h, c in zip(HEADERS, _cells(r), strict=True)), flush=True)


def _markdown(record: dict) -> str:
    fl = record["floors"]
    head = ("# Fused-linear path, fwd+bwd of sum_t G_t logp_t\n\n"
            + "\n".join(harness.environment_lines(record)) + "\n"
            f"- dtype {record['settings']['dtype']}; floor = 8 N d V / matmul rate "
            f"({fl['matmul_shape']}, fastest of {fl['matmul_timing']['iters']}: "
            f"{_flops(fl['matmul_gflops'] * 1e9)}); 'scratch' = peak extra memory during "
            "fwd+bwd minus the two gradients (the design's target: < 1% of the bf16 logits)\n\n")
    return head + fmt_table(HEADERS, [_cells(r) for r in record["rows"]]) + "\n"

if __name__ == "__main__":
    main()
