#!/usr/bin/env bash
# One-call GPU check: install the checkout, run the native numerics tests (bf16 tl.dot
# included, which the Triton interpreter gets wrong), then the logits and fused-linear tables
# against eager / torch.compile / TRL / Liger-Kernel / Cut Cross-Entropy and the e2e step,
# writing benchmarks/results/<gpu>-{logits,linear,e2e}.{md,json}. Sized for < 8 minutes on
# one H100 (each step has its own time limit, below). Exit status: 0 all passed; 1 a
# numerics mismatch or failed test (printed as NUMERICS MISMATCH); 2 no usable CUDA device
# or install failure; 3 a benchmark step failed or ran out of time (the tables written
# before it stay).
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [--wheels DIR] [--out DIR] [--skip-e2e]
#   --dry-run     print the steps and check the scripts they call exist; run nothing
#   --wheels DIR  install the wheels in DIR first, offline (peers the image lacks: trl,
#                 liger-kernel, cut-cross-entropy; see docs/benchmarks.md)
#   --out DIR     results folder (default: benchmarks/results)
#   --skip-e2e    leave out the end-to-end step (the slowest; about 90 s)
# Env: PYTHON (default python3, the interpreter that holds a CUDA torch).
#
# Written without a GPU at hand: checked with bash -n, shellcheck and --dry-run only.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="$ROOT/benchmarks/results"
WHEELS=""
DRY=0
E2E=1
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        --skip-e2e) E2E=0 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Design shapes, sized for the 8-minute budget on an H100 (bf16): the logits path at a
# small, a Llama-3 and a Gemma-size vocabulary; the fused linear at d=4096, V=128256.
LOGITS_SHAPES=(4096x32000 16384x128256 16384x262144)
LINEAR_N=(4096 16384)
LINEAR_V=(128256)
LINEAR_D=(4096)
T_TESTS=240   # seconds per step
T_LOGITS=120
T_LINEAR=150
T_E2E=120

step() { printf '\n==== %s ====\n' "$*"; }
run() {  # run LIMIT_S CMD...: print, and execute unless --dry-run
    local limit="$1"; shift
    echo "+ timeout ${limit}s $*"
    if [ "$DRY" = 1 ]; then return 0; fi
    timeout --signal=INT --kill-after=15 "$limit" "$@"
}
fail() { echo; echo "!!!! $1 !!!!" >&2; exit "$2"; }

cd "$ROOT"
for f in benchmarks/bench_logits.py benchmarks/bench_linear.py benchmarks/bench_e2e.py \
         tests/ops/test_token_logprobs.py tests/ops/test_linear_token_logprobs.py tests/test_transform.py; do
    [ -f "$f" ] || fail "missing $f: run from a full checkout" 2
done

step "environment"
if [ "$DRY" = 0 ]; then
    "$PY" - <<'EOF' || fail "no usable CUDA device for $PY (torch.cuda.is_available() is False)" 2
import sys, torch
ok = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if ok else "NO CUDA DEVICE")
sys.exit(0 if ok else 1)
EOF
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

step "install"
if [ -n "$WHEELS" ]; then
    # Offline: the wheels go to their own folder, put first on the path.
    run 300 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cpo_gpu_site \
        "$WHEELS"/*.whl || fail "installing the wheels in $WHEELS failed" 2
    export PYTHONPATH="/tmp/cpo_gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Editable, no dependencies (the image has torch, triton, transformers); the C++ CPU core
# is optional and may fail to build without breaking the GPU paths. If pip cannot install
# at all, the checkout itself goes on the path (cpo_fast/kernels is a symlink inside it).
if ! run 300 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"; then
    echo "pip install failed; using the checkout through PYTHONPATH"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
unset TRITON_INTERPRET  # native kernels: the interpreter would replace what we check
export HYPOTHESIS_PROFILE=ci PYTHONUNBUFFERED=1
for peer in trl liger_kernel cut_cross_entropy; do
    if [ "$DRY" = 0 ] && ! "$PY" -c "import $peer" 2>/dev/null; then
        echo "NOTE: peer '$peer' is not installed: its rows will say 'skipped' (--wheels DIR)"
    fi
done

step "numerics: bf16 tl.dot, fused linear against the float64 reference"
run 120 "$PY" - <<'EOF' || fail "NUMERICS MISMATCH (bf16 fused linear on the GPU)" 1
import torch
import cpo_fast

torch.manual_seed(0)
dev, worst = "cuda", []
for N, d, V in ((64, 256, 1000), (300, 512, 32000), (129, 1024, 4097)):
    h = torch.randn(N, d, device=dev).bfloat16()
    w = (torch.randn(V, d, device=dev) / d**0.5 * 2).bfloat16()
    y = torch.randint(0, V, (N,), device=dev)
    G = torch.randn(N, device=dev)
    out = {}
    for backend, dt in (("triton", torch.bfloat16), ("reference", torch.float64)):
        hh = h.detach().to(dt).clone().requires_grad_(True)
        ww = w.detach().to(dt).clone().requires_grad_(True)
        lp = cpo_fast.linear_token_logprobs(hh, ww, y, backend=backend)
        (lp.double() * G.double()).sum().backward()
        out[backend] = (lp.detach().double(), hh.grad.double(), ww.grad.double())
    for name, a, b in zip(("logp", "grad_hidden", "grad_weight"), out["triton"],
                          out["reference"]):
        scale = float(b.abs().max()) + 1e-30
        err = float((a - b).abs().max()) / scale
        worst.append((err, name, N, d, V))
        # bf16 inputs, fp32 accumulation: logp to ~1e-5 of its scale; gradients are
        # stored in bf16 (relative rounding 2^-9) and sum N or V bf16 products.
        tol = 1e-4 if name == "logp" else 2e-2
        assert err <= tol, f"{name} N={N} d={d} V={V}: max error {err:.2e} of scale > {tol}"
print("bf16 fused linear matches the float64 reference; worst relative errors:",
      ", ".join(f"{n} {e:.1e}" for e, n, *_ in sorted(worst)[-3:]))
EOF

step "numerics: native test files (hypothesis, ci profile)"
run "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -x \
    tests/ops/test_token_logprobs.py tests/ops/test_linear_token_logprobs.py tests/test_transform.py \
    || fail "NUMERICS MISMATCH or failing GPU test (see the pytest output above)" 1

status=0
step "logits table (bench_logits.py)"
run "$T_LOGITS" "$PY" benchmarks/bench_logits.py --shapes "${LOGITS_SHAPES[@]}" --iters 5 \
    --out "$OUT_DIR" || { echo "logits table failed or ran out of time"; status=3; }

step "fused-linear table (bench_linear.py)"
run "$T_LINEAR" "$PY" benchmarks/bench_linear.py --N "${LINEAR_N[@]}" --V "${LINEAR_V[@]}" \
    --d "${LINEAR_D[@]}" --iters 5 --warmup 2 --out "$OUT_DIR" \
    || { echo "fused-linear table failed or ran out of time"; status=3; }

if [ "$E2E" = 1 ]; then
    step "end-to-end step (bench_e2e.py)"
    run "$T_E2E" "$PY" benchmarks/bench_e2e.py --gpu --no-search --reps 3 --out "$OUT_DIR" \
        || { echo "e2e step failed or ran out of time"; status=3; }
fi

step "done"
if [ "$DRY" = 0 ]; then ls -l "$OUT_DIR" | grep -i -E "nvidia|h100|h200|a100" || true; fi
if [ "$DRY" = 1 ]; then
    echo "dry run: nothing was run"
elif [ "$status" = 0 ]; then
    echo "GPU check passed: numerics match, tables written to $OUT_DIR"
fi
exit "$status"
