"""``cpo-fast bench``: every op-level and end-to-end case on the user's shapes and device.

The flags are in cpo_fast.bench.arguments (what the CLI imports to build its parser); this
module, imported only when the command runs, runs the cases (cpo_fast.bench.cases), each in
a fresh process (cpo_fast.bench.isolation), and prints the record (cpo_fast.bench.report).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch

from cpo_fast.bench.cases import OP_VARIANTS
from cpo_fast.bench.environment import environment
from cpo_fast.bench.isolation import run_isolated
from cpo_fast.bench.report import render


def run_bench(args: argparse.Namespace, *, isolate: bool = True) -> dict:
    """Every op-level and end-to-end case of ``cpo-fast bench``; the record it prints."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:i], got {device!r}")
    if not args.no_e2e and args.hidden % 2:
        raise ValueError(f"--hidden must be even for the end-to-end model (got {args.hidden}); "
                         "or pass --no-e2e")
    has_trl = _has("trl")
    base = {"device": device, "dtype": args.dtype, "vocab": args.vocab, "hidden": args.hidden}
    ops = []
    for v in OP_VARIANTS:
        case = {**base, "kind": "op", "variant": v, "tokens": args.tokens,
                "frozen_head": args.frozen_head, "warmup": 1, "reps": args.reps}
        if v.startswith("trl") and not has_trl:
            ops.append({**case, "status": "skipped: trl not installed"})
            continue
        ops.append(run_isolated("op_case", case, isolate=isolate))
    e2e = []
    if not args.no_e2e:
        seq = min(args.seq, args.tokens)
        batch = max(1, args.tokens // seq)
        for path in ("eager", "trl-fused-head", "cpo_fast"):
            case = {**base, "kind": "e2e", "family": "llama", "layers": args.layers,
                    "finetune": "lora" if args.frozen_head else "full", "path": path,
                    "batch": batch, "seq": seq, "warmup": 1, "reps": args.reps}
            if path.startswith("trl") and not has_trl:
                e2e.append({**case, "status": "skipped: trl not installed"})
                continue
            e2e.append(run_isolated("e2e_case", {**case, "reps": 1}, isolate=isolate))
        # Memory above, one fresh process per path; timing here, the paths interleaved
        # in one process so that a change of load hits them alike (bench_e2e.py does the same).
        timed = [r["path"] for r in e2e if r["status"] == "ok"]
        if timed:
            res = run_isolated("interleaved_case", {**e2e[0], "paths": timed, "reps": args.reps},
                               isolate=isolate)
            for r in e2e:
                t = (res.get("timings") or {}).get(r["path"])
                if r["path"] in timed:
                    for k in ("median_ms", "p20_ms", "p80_ms", "min_ms", "iters", "times_ms",
                              "tokens_per_s", "tokens_per_s_p20", "tokens_per_s_p80"):
                        r.pop(k, None)
                    if t and t.get("status") == "ok":
                        r.update({k: v for k, v in t.items() if k != "status"}, reps=args.reps)
                    else:
                        r["status"] = f"timing {(t or res).get('status')}"
    for rows, key in ((ops, "eager"), (e2e, "eager")):
        ref = next((r for r in rows if r.get("variant", r.get("path")) == key
                    and "median_ms" in r), None)
        for r in rows:
            r.pop("traceback", None)
            if ref and "median_ms" in r:
                r["speedup_vs_eager"] = ref["median_ms"] / r["median_ms"]
                if r.get("peak_extra_bytes") is not None and ref.get("peak_extra_bytes"):
                    r["mem_vs_eager"] = r["peak_extra_bytes"] / ref["peak_extra_bytes"]
    return {"schema": "cpo_fast-bench-cli/1",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(device),
            "settings": {k: getattr(args, k) for k in ("vocab", "hidden", "tokens", "seq", "dtype",
                                                       "frozen_head", "layers", "reps")}
            | {"device": device},
            "op": ops, "e2e": e2e}


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def main(args: argparse.Namespace) -> int:
    record = run_bench(args)
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        print(render(record))
    sys.stdout.flush()
    return 0
