"""Fused-linear path: fwd+bwd time and peak memory against PyTorch eager, torch.compile,
Liger-Kernel and Cut Cross-Entropy, with the FLOP floor.

    python benchmarks/bench_linear.py                     # GPU: design.md's shapes
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
the bf16 matmul rate measured in the same run (8192^3 on CUDA; fp32 1024^3 on CPU);
"floor%" is floor time / measured time. Memory: peak bytes allocated during fwd+bwd
beyond the inputs, and the same minus the two gradients ("extra"), which the design
bounds by 1% of the bf16 N x V logits at N=16384, V=128256, d=4096.
Results: benchmarks/results/<device>-linear.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode (automatic without CUDA)")
    p.add_argument("--smallest", action="store_true", help="one tiny shape, one iteration")
    p.add_argument("--N", type=int, nargs="*", help="token counts (default: design.md)")
    p.add_argument("--V", type=int, nargs="*", help="vocabulary sizes")
    p.add_argument("--d", type=int, nargs="*", help="hidden widths")
    p.add_argument("--variants", nargs="*", help="subset of variants to run")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="results folder")
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])

import torch  # noqa: E402

CUDA = torch.cuda.is_available() and not ARGS.cpu
if not CUDA and "triton" not in sys.modules:
    # The Triton variant runs on CPU tensors only under the interpreter, set before import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import environment, fmt_table, peak_extra_memory, time_fn  # noqa: E402

import cpo_fast  # noqa: E402
from cpo_fast._backend import cpu_extension_available, triton_interpreting  # noqa: E402

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


def matmul_rate(device: str) -> tuple[float, str]:
    """Measured dense matmul FLOP/s: bf16 8192^3 on CUDA, fp32 1024^3 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / (ms / 1e3), f"{str(dtype).removeprefix('torch.')} {n}^3"


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
    ms = time_fn(step, device, warmup=max(warmup - 1, 0), iters=iters)
    grads = (N * d + V * d) * h.element_size()
    return {"ms": ms, "peak_bytes": peak,
            "extra_bytes": None if peak is None else peak - grads}


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
    rate, rate_what = matmul_rate(device)
    env.update(matmul_flops=rate, matmul_measured=rate_what, dtype=str(dtype))
    print(f"# fused-linear fwd+bwd on {env['device']} ({dtype}); matmul {rate_what}: "
          f"{_flops(rate)}")
    fns = variants(cuda)
    if args.variants:
        fns = {k: v for k, v in fns.items() if k in args.variants}
    rows: list[dict] = []
    for d in Ds:
        for V in Vs:
            for N in Ns:
                floor_ms = 8 * N * d * V / rate * 1e3
                logits_bytes = N * V * 2
                for name, fn in fns.items():
                    row = {"variant": name, "N": N, "V": V, "d": d, "floor_ms": floor_ms,
                           "logits_bf16_bytes": logits_bytes}
                    if isinstance(fn, str):
                        row["status"] = fn
                    else:
                        try:
                            row.update(run_case(fn, N, V, d, dtype, device, warmup, iters))
                            row["status"] = "ok"
                            row["floor_frac"] = floor_ms / row["ms"]
                        except Exception as e:  # noqa: BLE001 - one failure must not end the run
                            why = f"error: {type(e).__name__}: {str(e)[:200]}"
                            row["status"] = "oom" if _is_oom(e) else why
                        finally:
                            gc.collect()
                            if cuda:
                                torch.cuda.empty_cache()
                    rows.append(row)
                    _print_row(row)
    markdown = _markdown(env, rows)
    if args.out is not None:
        old, _common.RESULTS = _common.RESULTS, args.out
    try:
        jpath, mpath = _common.write_results("linear", env, rows, markdown)
    finally:
        if args.out is not None:
            _common.RESULTS = old
    print(f"wrote {jpath} and {mpath}")
    return {"environment": env, "rows": rows, "json": str(jpath), "markdown": str(mpath)}


def _flops(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{max(b, 0) / 2**20:.1f}"


def _cells(r: dict) -> list[object]:
    ok = r["status"] == "ok"
    extra = r.get("extra_bytes")
    pct = "-" if not ok or extra is None else f"{100 * max(extra, 0) / r['logits_bf16_bytes']:.2f}"
    return [r["N"], r["V"], r["d"], r["variant"],
            f"{r['ms']:.2f}" if ok else r["status"], f"{r['floor_ms']:.3f}",
            f"{100 * r['floor_frac']:.1f}" if ok else "-",
            _mb(r.get("peak_bytes")) if ok else "-", _mb(extra) if ok else "-", pct]


HEADERS = ["N", "V", "d", "variant", "fwd+bwd ms", "floor ms", "floor %", "peak MiB",
           "extra MiB", "extra % of logits"]


def _print_row(r: dict) -> None:
    print("  ".join(f"{h}={c}" for h, c in zip(HEADERS, _cells(r), strict=True)), flush=True)


def _markdown(env: dict, rows: list[dict]) -> str:
    head = (f"# Fused-linear path, fwd+bwd of sum_t G_t logp_t\n\n"
            f"Device: {env['device']}; torch {env['torch']}, triton {env.get('triton')}; "
            f"dtype {env['dtype']}; matmul rate {_flops(env['matmul_flops'])} "
            f"({env['matmul_measured']}). Floor = 8 N d V / matmul rate. "
            "'extra' = peak allocation during fwd+bwd minus the two gradients "
            "(the design's target: < 1% of the bf16 logits).\n\n")
    return head + fmt_table(HEADERS, [_cells(r) for r in rows]) + "\n"


if __name__ == "__main__":
    main()
