"""Static GPU evidence without a GPU: compile every Triton kernel for sm_80 / sm_90a and report.

Each kernel is reached through its real launcher (``cpo_fast.kernels.*`` on meta tensors at
the design shapes; peers through their own Python entry points), whose launches are
recorded and compiled ahead of time (cpo_fast/bench/aot.py). Per kernel, arch, dtype and
config it reports registers, spill bytes, shared memory, warps, occupancy, tensor-core
instructions, asynchronous copies, and a roofline *model* of an H100 call. Nothing is
timed: every time here is a model.

    python benchmarks/gpu_static.py              # full report -> benchmarks/results/gpu-static.{md,json}
    python benchmarks/gpu_static.py --gate       # CI gate: defaults + sampled flags, exit 1 on failure

Run it with TRITON_INTERPRET unset. The build cache goes to a fresh temporary directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cpo_fast.bench import aot

RESULTS = Path(__file__).resolve().parent / "results"
# The benchmark shapes (docs/benchmarks.md) for the model: one call of each op at this size.
SHAPE = dict(N=16384, V=128256, d=4096)
H100 = dict(bw=3.35e12, bf16=989e12, fp32=67e12)  # datasheet (SXM): HBM3 B/s, dense FLOP/s
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


# ----------------------------------------------------------------------------- our cases
def _our_cases(torch) -> list[tuple[str, dict, Callable[[], None]]]:
    """(tag, meta, launcher call) for every dtype, d/V bucket and flag combination.

    ``tf=`` in a tag is the head transform the launcher gets: none without it (HAS_TRANSFORM
    off: the untransformed build, tags as in earlier reports), ``tf=scale`` temperature and
    logit_scale only (HAS_TRANSFORM on), ``tf=1`` a softcap as well (HAS_SOFTCAP on)."""
    from cpo_fast._transform import HeadTransform
    from cpo_fast.kernels import linear_token_logprobs as LK
    from cpo_fast.kernels import token_logprobs as TK

    # tag suffix -> transform; no suffix without one, so those tags match earlier reports
    tfs = {"": None, " tf=scale": HeadTransform(0.7, None, 1.3),
           " tf=1": HeadTransform(0.7, 30.0, 1.3)}

    dts = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    meta = lambda *s, dt=torch.float32: torch.empty(*s, device="meta", dtype=dt)
    N, V = SHAPE["N"], SHAPE["V"]
    lab, f = meta(N, dt=torch.int64), meta(N)
    out = []
    for name, dt in dts.items():
        for d in (2048, 4096):  # the dispatcher's d buckets: <= 2048, > 2048
            h, w, b = meta(N, d, dt=dt), meta(V, d, dt=dt), meta(V, dt=dt)
            for bias in (False, True):
                for tk, tf in tfs.items():
                    out.append((f"linear.fwd {name} d={d} bias={int(bias)}{tk}",
                                dict(dtype=name, d=d),
                                lambda h=h, w=w, b=b if bias else None, tf=tf:
                                LK.linear_token_logprobs_forward(h, w, b, lab, -100, True,
                                                                 transform=tf)))
                for ent in (False, True):
                    for skip in (0.0, 1e-4):
                        for tk, tf in tfs.items():
                            out.append((f"linear.bwd {name} d={d} bias={int(bias)} ent={int(ent)} "
                                        f"skip={int(skip > 0)}{tk}", dict(dtype=name, d=d),
                                        lambda h=h, w=w, b=b if bias else None, ent=ent, skip=skip,
                                        f=f, tf=tf:
                                        LK.linear_token_logprobs_backward(
                                            h, w, b, lab, f, f if ent else None, f,
                                            f if ent else None, -100, True, True, b is not None,
                                            skip, transform=tf)))
        # logits path: design V (block 4096) and smaller V buckets; V = 50257 gives
        # unaligned row strides (a shifted HF view of GPT-2's vocabulary).
        for v in (V, 50257, 1000):
            lg = meta(4, N // 4, v, dt=dt)
            shifted = meta(4, N // 4 + 1, v, dt=dt)[:, :-1]
            for ent in (False, True):
                for tag, x in (("contig", lg), ("shifted", shifted)):
                    for tk, tf in tfs.items():
                        out.append((f"logits.fwd {name} V={v} ent={int(ent)} {tag}{tk}",
                                    dict(dtype=name, V=v),
                                    lambda x=x, ent=ent, tf=tf:
                                    TK.token_logprobs_forward(x, lab, -100, ent, transform=tf)))
                        out.append((f"logits.bwd {name} V={v} ent={int(ent)} {tag}{tk}",
                                    dict(dtype=name, V=v),
                                    lambda x=x, ent=ent, tf=tf:
                                    TK.token_logprobs_backward(x, lab, f, f if ent else None, f,
                                                               f if ent else None, -100, x,
                                                               transform=tf)))
    return out


def _is_default(tag: str) -> bool:
    """Defaults: design-shape configs with every flag off or every flag on (the extremes),
    each without a head transform (no ``tf=``) and, all on, with a softcap (``tf=1``); on the
    logits path with or without the entropy, and the softcap build with it. Head transforms
    without a softcap (``tf=scale``) are sampled, not defaults."""
    kv = dict(p.split("=") for p in tag.split() if "=" in p)
    tf = kv.get("tf", "0")
    if tag.startswith("logits"):
        return (kv["V"] == str(SHAPE["V"]) and "contig" in tag
                and (tf == "0" or (tf == "1" and kv["ent"] == "1")))
    flags = {kv[k] for k in ("bias", "ent", "skip") if k in kv}
    return len(flags) == 1 and tf in ("0", *flags)


# ----------------------------------------------------------------------------- peers
def _peer_cases(torch) -> list[tuple[str, dict, Callable[[], None]]]:
    """Peers' public entry points on small CPU tensors at the design vocabulary (their
    launchers call .item() or check the device, which meta tensors cannot serve)."""
    out = []
    n, d, V = 64, 256, SHAPE["V"]
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        mk = lambda *s, dt=dt, rg=False: torch.randn(*s, dtype=dt).requires_grad_(rg)
        lab = torch.randint(0, V, (n,))
        out.append((f"trl.chunked_logprob {name}", dict(dtype=name), lambda mk=mk, lab=lab:
                    _trl_chunked(mk(n, d, rg=True), mk(V, d, rg=True), lab)))
        out.append((f"trl.logprob_entropy {name}", dict(dtype=name), lambda mk=mk, lab=lab:
                    _trl_lpe(mk(1, n, V, rg=True), lab.view(1, n))))
        out.append((f"liger.fused_linear_ce {name}", dict(dtype=name), lambda mk=mk, lab=lab:
                    _liger_flce(mk(n, d, rg=True), mk(V, d, rg=True), lab)))
        out.append((f"liger.grpo {name}", dict(dtype=name), lambda mk=mk:
                    _liger_grpo(mk(2, n + 1, V, rg=True), torch.randint(0, V, (2, n)))))
        out.append((f"cce.linear_ce {name}", dict(dtype=name), lambda mk=mk, lab=lab:
                    _cce(mk(n, d, rg=True), mk(V, d, rg=True), lab)))
    return out


def _trl_chunked(h, w, lab):
    from trl.kernels import chunked_logprob as m

    m._use_triton = lambda device: True  # the launcher gates Triton on device.type == "cuda"
    # Its backward imports trl.trainer.utils (pandas, ...) for one no-op context outside
    # distributed runs; stand that in so the backward kernel is reached without TRL's deps.
    if "trl.trainer.utils" not in sys.modules:
        import contextlib
        import types

        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *a, **k: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
    lp = m.ChunkedLogProbFunction.apply(h, w, None, lab, 1.0, 4096)[0]
    lp.float().sum().backward()


def _trl_lpe(logits, lab):
    from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

    lp, ent = selective_log_softmax_and_entropy(logits, lab)
    (lp.sum() + ent.sum()).backward()


def _liger_flce(h, w, lab):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    LigerFusedLinearCrossEntropyFunction.apply(h, w, lab)[0].backward()


def _liger_grpo(logits, ids):
    import torch
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    fused_selective_log_softmax(logits, ids)
    B = logits.shape[0]
    adv, mask = torch.ones(B), torch.ones(ids.shape, dtype=torch.int32)
    old, ref = torch.zeros(ids.shape), torch.zeros(ids.shape)
    loss = triton_grpo_loss(logits, old, ref, ids, adv, mask)
    (loss[0] if isinstance(loss, tuple) else loss).float().sum().backward()


def _cce(h, w, lab):
    from cut_cross_entropy import linear_cross_entropy

    linear_cross_entropy(h, w, lab, reduction="none", impl="cce").float().sum().backward()


# ----------------------------------------------------------------------------- build
_LAUNCHES: list = []


def _build_one(job: tuple[int, int]) -> tuple[int, int, dict | None, str | None, float]:
    i, cc = job
    t0 = time.time()
    res, err = aot.run_quietly(lambda: aot.build(_LAUNCHES[i], cc))
    return i, cc, res, err, time.time() - t0


def collect(cases, torch) -> list[dict]:
    """Run each case under capture; one row per distinct launch (first tag wins)."""
    rows, seen = [], {}
    for tag, meta, fn in cases:
        with aot.capture() as found:
            _, err = aot.run_quietly(fn)
        if err and not found:
            rows.append(dict(tag=tag, **meta, capture_error=err))
            continue
        for launch in found:
            k = launch.key()
            if k in seen:
                continue
            seen[k] = launch
            launch.tag = tag
            rows.append(dict(tag=tag, **meta, kernel=launch.name, launch=launch,
                             consts=launch.constants(), capture_error=err if err else None))
    return rows


def build_all(rows: list[dict], archs: list[int], jobs: int) -> None:
    global _LAUNCHES
    _LAUNCHES = [r.get("launch") for r in rows]
    work = [(i, cc) for i, r in enumerate(rows) if "launch" in r for cc in archs]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs) as pool:
        for i, cc, res, err, secs in pool.imap_unordered(_build_one, work):
            rows[i].setdefault("builds", {})[cc] = dict(res or {}, error=err, seconds=round(secs, 2))


# ----------------------------------------------------------------------------- model
# Per kernel: (bytes, FLOPs, basis) of one op call at SHAPE, e = element size. Logits-path
# kernels (ours and the hybrids' fold kernels) move N x V elements; fused matmul kernels
# read h and W once (compulsory traffic) and do their share of the 8 N d V.
def _model_terms(kernel: str, N: int, V: int, d: int, e: int) -> tuple[int, int, str] | None:
    nv, hw, ndv = N * V * e, (N + V) * d * e, N * d * V
    table = {
        "_token_logprobs_fwd_kernel": (nv, 0, "read N V"),
        "_token_logprobs_bwd_kernel": (2 * nv, 0, "read + write N V"),
        "_linear_token_logprobs_fwd_kernel": (hw, 2 * ndv, "2NdV; h, W once"),
        "_linear_token_logprobs_bwd_kernel": (hw + nv, 2 * ndv, "2NdV recompute; write dz N V"),
        "_forward_kernel": (nv, 0, "read N V (logits tile from the GEMM)"),
        "_backward_kernel": (2 * nv, 0, "read + write N V"),
        "liger_cross_entropy_kernel": (2 * nv, 0, "read + in-place grad N V"),
        "_selective_log_softmax_kernel": (nv, 0, "read N V"),
        "_grpo_loss_fwd_kernel": (nv, 0, "read N V"),
        "_grpo_loss_bwd_kernel": (2 * nv, 0, "read + write N V"),
        "_cce_lse_forward_kernel": (hw, 2 * ndv, "2NdV; h, W once"),
        "_cce_backward_kernel": (2 * hw, 6 * ndv, "6NdV dense (filtering skips some); h, W"),
        "_indexed_neg_dot_forward_kernel": (2 * N * d * e, 2 * N * d, "N dot products"),
    }
    return table.get(kernel)


def roofline(row: dict) -> dict:
    """Bytes and FLOPs of one op call at SHAPE and the H100 time they imply (a model)."""
    e = ESIZE.get(row.get("dtype"), 2)
    terms = _model_terms(row.get("kernel", ""), SHAPE["N"], row.get("V", SHAPE["V"]),
                         row.get("d", SHAPE["d"]), e)
    if terms is None:
        return {}
    byt, flop, what = terms
    peak = H100["fp32"] if row.get("dtype") == "fp32" else H100["bf16"]
    t = max(byt / H100["bw"], flop / peak)
    return dict(model_bytes=byt, model_flops=flop, model_ms=round(t * 1e3, 2), model_basis=what)


def op_models() -> list[tuple[str, float, str]]:
    """Whole fused-linear op, bf16, at SHAPE: fwd + bwd roofline per design (a model)."""
    N, V, d = SHAPE["N"], SHAPE["V"], SHAPE["d"]
    gemm = 2 * N * d * V / H100["bf16"]
    nv = N * V * 2 / H100["bw"]
    return [
        ("floor: 8 N d V at the bf16 rate", 4 * gemm, "the FLOP floor of docs/benchmarks.md"),
        ("cpo_fast (a) fused fwd + hybrid bwd", gemm + (gemm + nv) + 2 * gemm + 2 * nv,
         "fwd 2NdV; bwd dz tile 2NdV + write dz, 2 GEMMs read dz"),
        ("(b) hybrid fwd (GEMM + fold) + same bwd", (gemm + 2 * nv) + (gemm + nv) + 2 * gemm + 2 * nv,
         "fwd adds a write + read of N V (TRL, Liger style)"),
        ("CCE fused fwd + fused bwd (dense)", gemm + 3 * gemm, "no N V traffic; bwd atomics not modelled"),
    ]


def tile_intensity(row: dict) -> float | None:
    """FLOPs per byte a matmul tile loads (bf16: BN BV / (BN + BV)); higher reuses more."""
    c = row.get("consts", {})
    if "BLOCK_N" not in c or "BLOCK_D" not in c:
        return None
    e = ESIZE.get(row.get("dtype"), 2)
    bn, bv = c["BLOCK_N"], c["BLOCK_V"]
    return round(2 * bn * bv / ((bn + bv) * e), 1)


# ----------------------------------------------------------------------------- gate
def failures(rows: list[dict], archs: list[int]) -> list[str]:
    """Compile errors anywhere, spills at defaults, shared memory over the arch limit,
    the interpreter's dot upcast in a GPU build."""
    bad = []
    for r in rows:
        if r.get("capture_error") and "launch" not in r:
            bad.append(f"{r['tag']}: launcher failed: {r['capture_error']}")
            continue
        if "launch" not in r:
            continue
        if r["consts"].get("UPCAST_DOT"):
            bad.append(f"{r['tag']}: UPCAST_DOT=True in a GPU build")
        for cc in archs:
            b = r.get("builds", {}).get(cc, {})
            if b.get("error"):
                bad.append(f"{r['tag']} sm_{cc}: {b['error']}")
                continue
            if r["default"] and (b["spill_store"] or b["spill_load"]):
                bad.append(f"{r['tag']} sm_{cc}: spills {b['spill_store']} B at a default config")
            if b["smem"] > aot.ARCH[cc]["smem_block"]:
                bad.append(f"{r['tag']} sm_{cc}: shared memory {b['smem']} B over the limit")
    return bad


# ----------------------------------------------------------------------------- report
def _cfg(r: dict) -> str:
    c = r.get("consts", {})
    keys = [k for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "BLOCK_SIZE", "BLOCK_B", "BLOCK_M") if k in c]
    tiles = "x".join(str(c[k]) for k in keys) or "-"
    flags = ",".join(k for k, v in c.items() if v is True)
    return f"{tiles} {flags}".strip()


def markdown(rows: list[dict], archs: list[int], meta: dict) -> str:
    out = ["# GPU static report (compiled ahead of time, no GPU)", "",
           f"Triton {meta['triton']}, torch {meta['torch']}; built {meta['n_builds']} kernels for "
           f"{', '.join(aot.ARCH[a]['name'] for a in archs)} in {meta['seconds']:.0f} s "
           f"({meta['jobs']} processes). Generated by `benchmarks/gpu_static.py`.", "",
           "Registers, spills (ptxas -v) and shared memory (Triton's metadata) are compiler output. "
           "Occupancy is a **model** from registers and shared memory (65536 registers, 64 warps, "
           "164 KB (sm_80) / 228 KB (sm_90a) shared memory per SM). `mma`/`wgmma` count tensor-core "
           "instructions, `cp.async`/`TMA` asynchronous copies in the PTX (present only where the "
           "main loop is software-pipelined). **model ms** is a roofline model of one op call at "
           f"N={SHAPE['N']}, V={SHAPE['V']}, d={SHAPE['d']} (or the case's d / V) on an H100 SXM "
           "at datasheet rates "
           "(3.35 TB/s; 989 TFLOP/s bf16/fp16 dense, 67 TFLOP/s fp32): max(bytes/BW, FLOPs/peak). "
           "It is not a measurement. `tile FLOP/B`: FLOPs per byte a matmul tile loads.", ""]
    out += ["## Modelled whole-op time (fused-linear, bf16, H100 datasheet; a model)", "",
            "| design | model ms (fwd+bwd) | basis |", "|---|---|---|"]
    out += [f"| {name} | {t * 1e3:.1f} | {basis} |" for name, t, basis in op_models()]
    out.append("")
    out += budgets(rows, archs)
    hdr = ("| case | kernel | arch | config | warps/stages | regs | spill B | smem KB | CTAs/SM "
           "(warps) | mma | wgmma/tcgen05 | cp.async | TMA | tile FLOP/B | model ms |")
    for group, title in (("ours", "## cpo_fast kernels"), ("peer", "## Peers' kernels (same harness)")):
        out += [title, "", hdr, "|" + "---|" * 15]
        shown = set()
        for r in rows:
            if r["group"] != group:
                continue
            if "launch" not in r:
                out.append(f"| {r['tag']} | - | - | not captured: {r['capture_error']} |" + " |" * 11)
                continue
            m = r.get("model", {})
            for cc in archs:
                b = r.get("builds", {}).get(cc, {})
                name = aot.ARCH[cc]["name"]
                if b.get("error"):
                    out.append(f"| {r['tag']} | {r['kernel']} | {name} | {_cfg(r)} | "
                               f"compile error: {b['error']} |" + " |" * 10)
                    continue
                line = (
                    f"| {r['tag']}{' (default)' if r.get('default') else ''} | {r['kernel']} | {name} "
                    f"| {_cfg(r)} | {b['warps']}/{b['stages']} | {b['regs']} | "
                    f"{b['spill_store']}/{b['spill_load']} | {b['smem'] / 1024:.1f} | "
                    f"{b['ctas_per_sm']} ({b['warps_per_sm']}) | {b['mma']} | {b['wgmma'] + b['tcgen05']} | "
                    f"{b['cp_async']} | {b['tma']} | {tile_intensity(r) or '-'} | "
                    f"{m.get('model_ms', '-')} |")
                if line not in shown:  # peers launch one kernel per chunk: show each build once
                    shown.add(line)
                    out.append(line)
        out.append("")
    notes = sorted({f"- {r['tag']}: {r['capture_error']}" for r in rows if r.get("capture_error")})
    if notes:
        out += ["Launcher errors after the launches shown (their later kernels are missing):", ""]
        out += notes + [""]
    if meta.get("failures") is not None:
        out += ["## Gate", "", f"{len(meta['failures'])} failures."] + [f"- {f}" for f in meta["failures"]]
    return "\n".join(out) + "\n"


def budgets(rows: list[dict], archs: list[int]) -> list[str]:
    """Which tuning budget each default meets (docs/gpu.md): zero spills; the fused-linear main
    loop pipelined (async copies) and, in half dtypes, on tensor cores; the memory-bound logits
    kernels at >= 2 resident CTAs or >= 8 warps per SM. Worst case over a group's defaults."""
    out = ["## Budgets at the default configs", "",
           "Worst case over the default builds of each kernel, dtype and architecture "
           "(flags all off and all on, with and without a softcap). Budgets: docs/gpu.md.", "",
           "| kernel | dtype | arch | builds | max regs | spills | async copies | tensor cores "
           "| min CTAs/SM (warps) | budgets |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("group") == "ours" and r.get("default"):
            groups.setdefault((r["tag"].split()[0], r["dtype"]), []).append(r)
    for (kind, dtype), rs in sorted(groups.items()):
        for cc in archs:
            bs = [b for r in rs if (b := r.get("builds", {}).get(cc) or r.get("builds", {}).get(str(cc)))
                  and not b.get("error")]
            if not bs:
                continue
            spills = max(b["spill_store"] + b["spill_load"] for b in bs)
            asyncs = min(b["cp_async"] + b["tma"] for b in bs)
            tensor = min(b["mma"] + b["wgmma"] + b["tcgen05"] for b in bs)
            occ = min(bs, key=lambda b: (b["ctas_per_sm"], b["warps_per_sm"]))
            linear = kind.startswith("linear")
            checks = [("0 spills", spills == 0)]
            if linear:
                checks.append(("pipelined", asyncs > 0))
                if dtype != "fp32":
                    checks.append(("tensor cores", tensor > 0))
            else:
                checks.append(("occupancy", occ["ctas_per_sm"] >= 2 or occ["warps_per_sm"] >= 8))
            verdict = ", ".join(f"{n} {'met' if ok else 'NOT met'}" for n, ok in checks)
            out.append(f"| {kind} | {dtype} | {aot.ARCH[cc]['name']} | {len(bs)} | "
                       f"{max(b['regs'] for b in bs)} | {spills} | {asyncs if linear else '-'} | "
                       f"{tensor if linear else '-'} | {occ['ctas_per_sm']} ({occ['warps_per_sm']}) | "
                       f"{verdict} |")
    if any("fp32" in line and "linear" in line for line in out):
        out += ["", "fp32 fused-linear builds use `input_precision=\"ieee\"` (torch's default matmul "
                "precision): FMA loops, no tensor cores, by design."]
    return out + [""]


def compare(before: dict, rows: list[dict], archs: list[int]) -> list[str]:
    """Before/after lines for the default configs, from an earlier run's JSON (--compare)."""
    # by case: each of our cases launches one kernel (whose name may have changed since)
    now = {r["tag"]: r for r in rows if r["group"] == "ours"}
    out = [f"## Before and after ({before['meta'].get('label', 'earlier run')})", "",
           "| case | arch | before: config, regs, spill B | after: config, regs, spill B | model ms |",
           "|---|---|---|---|---|"]
    for b in before["rows"]:
        a = now.get(b["tag"])
        if not b.get("default") or a is None:
            continue
        for cc in archs:
            bb, ab = b.get("builds", {}).get(str(cc), {}), a.get("builds", {}).get(cc, {})
            cell = lambda r, x: (f"compile error: {x['error'][:60]}" if x.get("error") else
                                 f"{_cfg(r)} {x.get('warps')}w/{x.get('stages')}s, {x.get('regs')}, "
                                 f"{x.get('spill_store')}")
            out.append(f"| {b['tag']} | {aot.ARCH[cc]['name']} | {cell(b, bb)} | {cell(a, ab)} | "
                       f"{a.get('model', {}).get('model_ms', '-')} |")
    return out + [""]


def summarize(run: dict) -> list[str]:
    """A section for another gate run (--also): another Triton, or another architecture."""
    m = run["meta"]
    archs = ", ".join(aot.ARCH[int(a)]["name"] for a in m["archs"])
    out = [f"## {m.get('label') or 'Another gate run'}", "",
           f"Triton {m['triton']}, torch {m['torch']}, {archs}: {m['n_builds']} builds in "
           f"{m['seconds']:.0f} s, {len(m['failures'])} failures.", ""]
    out += [f"- {f[:200]}" for f in m["failures"]]
    worst = {}
    for r in run["rows"]:
        for cc, b in r.get("builds", {}).items():
            if r.get("default") and not b.get("error"):
                k = (r["kernel"], cc)
                regs, spill = worst.get(k, (0, 0))
                worst[k] = (max(regs, b["regs"]), max(spill, b["spill_store"]))
    out += ["", "| kernel | arch | most registers / most spill B at a default |", "|---|---|---|"]
    out += [f"| {k} | {aot.ARCH[int(cc)]['name']} | {r} / {sp} |"
            for (k, cc), (r, sp) in sorted(worst.items())]
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", action="store_true",
                    help="defaults + a sample of flag combos; exit 1 on failure")
    ap.add_argument("--sample", type=int, default=6, help="non-default cases per run under --gate")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CPO_FAST_GATE_SEED", "0")))
    ap.add_argument("--archs", default="80,90", help="compute capabilities, e.g. 80,90,100")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(RESULTS), help="directory for gpu-static.md/.json")
    ap.add_argument("--json", default=None, help="write the rows as JSON here (gate)")
    ap.add_argument("--label", default=None, help="a name for this run, kept in its JSON")
    ap.add_argument("--compare", action="append", default=[],
                    help="an earlier run's JSON: add a before/after table for its defaults")
    ap.add_argument("--also", action="append", default=[],
                    help="another run's JSON (other Triton / arch): add a summary section")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the compiler this script checks")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="cpo-fast-gpu-static-")  # no cache hits
    import torch
    import triton

    archs = [int(a) for a in args.archs.split(",")]
    t0 = time.time()
    cases = _our_cases(torch)
    if args.gate:
        rest = [c for c in cases if not _is_default(c[0])]
        keep = set(random.Random(args.seed).sample(range(len(rest)), min(args.sample, len(rest))))
        cases = [c for c in cases if _is_default(c[0])] + [c for i, c in enumerate(rest) if i in keep]
    rows = [dict(r, group="ours", default=_is_default(r["tag"])) for r in collect(cases, torch)]
    if not (args.gate or args.no_peers):
        rows += [dict(r, group="peer", default=False) for r in collect(_peer_cases(torch), torch)]
    build_all(rows, archs, args.jobs)
    for r in rows:
        r["model"] = roofline(r)
    bad = failures([r for r in rows if r["group"] == "ours"], archs)
    meta = dict(triton=triton.__version__, torch=torch.__version__, seconds=time.time() - t0,
                jobs=args.jobs, n_builds=sum(len(r.get("builds", {})) for r in rows), failures=bad,
                archs=archs, gate=args.gate, label=args.label)
    plain = [{k: v for k, v in r.items() if k != "launch"} for r in rows]
    doc = dict(meta=meta, rows=plain)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    if not args.gate:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu-static.json").write_text(json.dumps(doc, indent=1, default=str))
        extra = [line for path in args.compare
                 for line in compare(json.loads(Path(path).read_text()), rows, archs)]
        extra += [line for path in args.also for line in summarize(json.loads(Path(path).read_text()))]
        (out / "gpu-static.md").write_text(markdown(rows, archs, meta) + "\n".join(extra))
    print(f"{meta['n_builds']} builds in {meta['seconds']:.0f} s; {len(bad)} failures")
    for f in bad:
        print("FAIL", f)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
