"""End-to-end benchmark: a full training step of HF models, per-token log-probs by path.

One training step (forward, backward, AdamW step) of a tiny Llama- or Qwen2-config model
(built from its config, never downloaded; 2 layers, d=256 on the CPU) with a large
vocabulary, LoRA (peft; head and embeddings frozen) or full fine-tuning (head trained). The
loss is the negative mean log-prob of the labelled tokens (the first quarter of each row is
a prompt, labelled -100); the paths differ only in how the per-token log-probs are computed
(cpo_fast.bench.e2e.PATHS):

  eager           (a) model(...).logits -> .float().log_softmax(-1).gather(-1, y)
  trl-selective   (b) model(...).logits -> trl.trainer.utils.selective_log_softmax
  trl-fused-head  (b) trl add_fused_lm_head(model) (before peft), model(..., labels,
                      fused_lm_head=True).log_probs
  compile         (c) model(...).logits -> torch.compile(log_softmax + gather) (only the
                      log-prob function is compiled, not the model)
  liger, cce      (d) backbone hidden states into Liger's fused linear cross-entropy / Cut
                      Cross-Entropy (Triton, GPU only: 'n/a' rows on the CPU)
  cpo_fast        (e) cpo_fast.causal_lm_token_logprobs(model, ids, labels): the backbone's
                      hidden states into linear_token_logprobs (logits never built)

Per (family, V, finetune, path): tokens/s (B*T tokens per step; median with p20/p80 of the
timed steps after warm-up), the step's peak extra memory (peak RSS growth on the CPU, the
allocator peak on CUDA, each case in a fresh process), and the largest batch (sequences of
--search-seq tokens) whose step fits --budget-mib of peak extra memory, measured by a
search in which every probe is its own fresh process (docs/benchmarks.md, "bench_e2e").

Usage: python benchmarks/bench_e2e.py            # CPU default (<= 20 min on 2 cores)
       python benchmarks/bench_e2e.py --quick    # smoke test, < 60 s
       python benchmarks/bench_e2e.py --gpu      # bf16, design shapes (default on CUDA)
       python benchmarks/bench_e2e.py --render results/<device>-e2e.json
Writes results/<device>-e2e[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from cpo_fast.bench import harness
from cpo_fast.bench.e2e import PATHS
from cpo_fast.bench.environment import environment
from cpo_fast.bench.isolation import run_isolated
from cpo_fast.bench.measure import MiB

RESULTS = Path(__file__).resolve().parent / "results"

# Default configurations: (family, V) with each family's own vocabularies (Llama 2: 32000,
# Llama 3: 128256, Qwen2: 151936); --grid full runs every family with every V.
CPU = {"configs": [["llama", 32000], ["llama", 128256], ["qwen2", 151936]], "hidden": 256,
       "layers": 2, "batch": 4, "seq": 64, "dtype": "fp32", "warmup": 1, "reps": 3,
       "search_seq": 64, "budget_mib": 512, "cap_factor": 4, "eager_cap": 64}
QUICK = {"configs": [["llama", 4096]], "hidden": 64, "layers": 1, "batch": 2, "seq": 32,
         "dtype": "fp32", "warmup": 1, "reps": 2, "search_seq": 32, "budget_mib": 64,
         "cap_factor": 2, "eager_cap": 2}
GPU = {"configs": [["llama", 32000], ["llama", 128256], ["qwen2", 151936]], "hidden": 2048,
       "layers": 2, "batch": 8, "seq": 2048, "dtype": "bf16", "warmup": 2, "reps": 5,
       "search_seq": 2048, "budget_mib": 40 * 1024, "cap_factor": 4, "eager_cap": 256}
FAMILIES, VOCABS = ("llama", "qwen2"), (32000, 128256, 151936)
FINETUNE = ("lora", "full")
TARGETS = {"speedup": 1.3, "mem": 1 / 3, "batch": 2.0}


# ---- the largest batch under a budget -----------------------------------------------------

def search_max_batch(case: dict, budget: int, cap: int, timeout: float | None, *,
                     known: tuple[int, int] | None = None, cap_first: bool = True,
                     model_only: bool = False) -> dict:
    """Largest batch (sequences) whose training step's peak extra memory fits ``budget``.

    Every probe is a fresh process (cpo_fast.bench.cases.probe_case) running one step at
    that batch. The peak grows linearly with the batch (a fixed part: weight gradients, optimizer
    temporaries; a part per sequence: activations, logits), so the probes are guided by a
    line through two measured points, ``known`` (the timed step, same sequence length) and
    a probe at batch 1, and the answer is then bracketed by probes: b fits, b + 1 does not
    (measured). ``cap_first``: when the line (or, without two points, nothing) says the cap
    fits, probe ``cap`` next; when it fits the answer is '>= cap' (a measured lower bound).
    ``model_only``: stop after the two points and report the line's
    prediction, labelled modelled (used for torch.compile, whose every probe recompiles).
    """
    probes: list[list] = []
    points: dict[int, int] = {}
    if known and known[1] is not None:
        points[known[0]] = known[1]

    def fits(b: int) -> bool | None:
        r = run_isolated("probe_case", {**case, "batch": b, "budget_bytes": budget},
                               timeout=timeout)
        ok = r.get("fits") if r.get("status") == "ok" else (False if r["status"] == "oom" else None)
        probes.append([b, r.get("peak_extra_bytes"), ok if ok is not None else r["status"]])
        if r.get("peak_extra_bytes") is not None:
            points[b] = r["peak_extra_bytes"]
        return ok

    def out(b, note, capped=False):
        return {"max_batch": b, "max_batch_note": note, "max_batch_capped": capped,
                "probes": probes}

    lo, hi = 0, cap + 1  # lo fits (0: nothing yet), hi does not fit
    ok = fits(1)
    if ok is None:
        return out(None, f"search failed: {probes[-1][2]}")
    if not ok:
        return out(0, "measured (batch 1 does not fit)")
    lo = 1
    guess = None
    if len(points) >= 2:
        (b1, p1), (b2, p2) = sorted(points.items())[:1] + sorted(points.items())[-1:]
        slope = (p2 - p1) / (b2 - b1)
        guess = cap if slope <= 0 else int((budget - (p1 - slope * b1)) // slope)
        if model_only:
            return out(max(0, min(guess, cap)), "modelled (line through 2 measured points)",
                       guess >= cap)
    if cap_first and (guess is None or guess >= cap) and cap > 1:
        ok = fits(cap)
        if ok is None:
            return out(None, f"search failed: {probes[-1][2]}")
        if ok:
            return out(cap, f">= {cap} (fits at the search cap)", True)
        hi = cap
        if len(points) >= 2 and guess is None:
            (b1, p1), (b2, p2) = sorted(points.items())[:1] + sorted(points.items())[-1:]
            slope = (p2 - p1) / (b2 - b1)
            guess = cap if slope <= 0 else int((budget - (p1 - slope * b1)) // slope)
    tries = 0
    while hi - lo > 1:
        if guess is not None and lo < guess < hi and tries < 2:
            b = guess
        elif hi <= cap:
            b = (lo + hi) // 2
        else:
            b = min(lo * 2, cap)
        tries += 1
        ok = fits(b)
        if ok is None:
            return out(None, f"search failed: {probes[-1][2]}")
        if ok:
            lo, guess = b, b + 1
        else:
            hi, guess = b, b - 1
        if lo == cap:
            return out(cap, f">= {cap} (fits at the search cap)", True)
    return out(lo, "measured")


# ---- the run ------------------------------------------------------------------------------

def grid(shape: dict, args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.configs:
        return [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs]
    if args.grid == "full":
        return [(f, v) for f in FAMILIES for v in VOCABS]
    return [tuple(c) for c in shape["configs"]]


TIMING_KEYS = ("median_ms", "p20_ms", "p80_ms", "min_ms", "iters", "times_ms", "tokens_per_s",
               "tokens_per_s_p20", "tokens_per_s_p80", "warmup_s")


def run(args: argparse.Namespace, shape: dict, device: str) -> list[dict]:
    """Per (family, V, finetune): memory and the largest batch per path, each case and probe
    in a fresh process; then the timing of every path, interleaved in one process."""
    rows = []
    paths = [p for p in PATHS if not args.paths or p in args.paths]
    budget = int(shape["budget_mib"] * MiB)
    for family, vocab in grid(shape, args):
        for ft in FINETUNE:
            base = {"device": device, "dtype": shape["dtype"], "family": family, "vocab": vocab,
                    "hidden": shape["hidden"], "layers": shape["layers"], "finetune": ft}
            eager_max, group = None, []
            for path in sorted(paths, key=lambda p: p != "eager"):  # eager first: it sets the cap
                t0 = time.perf_counter()
                case = {**base, "path": path, "batch": shape["batch"], "seq": shape["seq"],
                        "warmup": shape["warmup"] + (1 if path == "compile" else 0), "reps": 1}
                if path == "compile" and (args.no_compile or args.quick):
                    why = "--no-compile" if args.no_compile else ("--quick (compiling takes "
                                                                  "30-60 s on the CPU)")
                    group.append({**case, "status": f"skipped: {why}"})
                    continue
                row = run_isolated("e2e_case", case, timeout=args.case_timeout)
                for k in TIMING_KEYS:  # the isolated step measures memory; timing comes below
                    row.pop(k, None)
                if row["status"] == "ok" and not args.no_search:
                    cap = (shape["eager_cap"] if path == "eager" or not eager_max
                           else max(2, math.ceil(shape["cap_factor"] * eager_max)))
                    pcase = {**base, "path": path, "seq": shape["search_seq"], "warmup": 1}
                    known = ((shape["batch"], row.get("peak_extra_bytes"))
                             if shape["search_seq"] == shape["seq"] else None)
                    row.update(search_max_batch(
                        pcase, budget, cap, args.case_timeout, known=known,
                        cap_first=path != "eager",
                        model_only=path == "compile" and not args.search_compile))
                    if path == "eager":
                        eager_max = row.get("max_batch")
                row.pop("traceback", None)
                row["case_s"] = time.perf_counter() - t0
                group.append(row)
            t0 = time.perf_counter()
            timed = [r["path"] for r in group if r["status"] == "ok"]
            if timed:
                tcase = {**base, "paths": timed, "batch": shape["batch"], "seq": shape["seq"],
                         "warmup": shape["warmup"], "reps": shape["reps"]}
                res = run_isolated("interleaved_case", tcase,
                                         timeout=args.case_timeout * max(1, len(timed)))
                for r in group:
                    if r["path"] in timed:
                        t = (res.get("timings") or {}).get(r["path"])
                        if t is None:
                            r["status"] = f"timing {res['status']}"
                        elif t.get("status") != "ok":
                            r["status"] = f"timing {t['status']}"
                        else:
                            r.update({k: v for k, v in t.items() if k != "status"})
            timing_s = time.perf_counter() - t0
            for r in group:
                r["timing_s"] = timing_s
                print(f"{family:6s} V={vocab:<7d} {ft:5s} {r['path']:15s} {r['status'][:60]:12s} "
                      f"{_tps(r):>22s}  peak {harness.fmt_mib(r.get('peak_extra_bytes')):>7s}"
                      f" MiB  max batch {_batch(r)}  ({r.get('case_s', 0):.0f} s)", flush=True)
            rows += group
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, < 60 s")
    ap.add_argument("--gpu", action="store_true",
                    help="bf16, design shapes (d=2048, 8 x 2048 tokens); default on CUDA")
    ap.add_argument("--cpu", action="store_true", help="force the CPU settings on a CUDA box")
    ap.add_argument("--grid", choices=["default", "full"], default="default",
                    help="default: llama x {32000, 128256}, qwen2 x 151936; full: every "
                         "family x every V (twice the time)")
    ap.add_argument("--configs", nargs="+", metavar="FAMILY:V", default=None,
                    help="run these (family, V) only, e.g. llama:32000 qwen2:151936")
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=None,
                    help="run only these paths (eager is needed for the ratios)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per timed step")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (timed steps)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--budget-mib", type=float, default=None,
                    help="memory budget of the largest-batch search (peak extra MiB of a step)")
    ap.add_argument("--search-seq", type=int, default=None, help="tokens per sequence (search)")
    ap.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--search-compile", action="store_true",
                    help="search the compile path's largest batch with probes too (each "
                         "recompiles); by default it is modelled from two measured points")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    ap.add_argument("--case-timeout", type=float, default=600,
                    help="seconds before a case or probe is killed")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", metavar="JSON", help="re-render the report of a results JSON")
    args = ap.parse_args()
    if args.render:
        harness.rerender(args.render, summarize, render, args.out)
        return

    import torch

    device = "cuda" if (torch.cuda.is_available() and not args.cpu) or args.gpu else "cpu"
    shape = dict(QUICK if args.quick else GPU if device == "cuda" else CPU)
    if args.quick and device == "cuda":
        shape["dtype"] = "bf16"
    for k in ("batch", "seq", "reps", "budget_mib", "search_seq"):
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    env = environment(device, versions=("liger-kernel", "cut-cross-entropy"))
    t0 = time.perf_counter()
    rows = run(args, shape, device)
    wall = time.perf_counter() - t0
    settings = {**shape, "configs": [list(c) for c in grid(shape, args)], "quick": args.quick,
                "grid": args.grid, "search": not args.no_search, "compile": not args.no_compile,
                "device": device, "wall_s": wall,
                "cpo_fast_entry": ("causal_lm_token_logprobs"
                                   if hasattr(__import__("cpo_fast"), "causal_lm_token_logprobs")
                                   else "linear_token_logprobs")}
    record = {"environment": env, "rows": rows, "settings": settings}
    summary = summarize(record)
    if args.no_write:
        print(render({**record, "summary": summary, "schema": harness.SCHEMA, "benchmark": "e2e",
                      "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "floors": {}, "environment": {**env, "loadavg_after": None}}))
        return
    paths = harness.write_results("e2e", env, settings=settings, floors={}, rows=rows,
                                  summary=summary, markdown=render, out_dir=args.out or RESULTS,
                                  quick=args.quick)
    print()
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]} in {wall:.0f} s")


# ---- summary and report -------------------------------------------------------------------

def _key(r: dict) -> str:
    return f"{r['family']}/{r['vocab']}/{r['finetune']}"


def _find(rows: list[dict], key: str, path: str) -> dict:
    return next((r for r in rows if _key(r) == key and r["path"] == path), {})


def summarize(record: dict) -> dict:
    """Per (family, V, finetune): every path against eager; the targets of cpo_fast."""
    rows, out = record["rows"], {}
    for key in dict.fromkeys(_key(r) for r in rows):
        eager, trl = _find(rows, key, "eager"), _find(rows, key, "trl-fused-head")
        per = {}
        for r in (r for r in rows if _key(r) == key):
            per[r["path"]] = {"speedup_vs_eager": _ratio(eager.get("median_ms"), r.get("median_ms")),
                              "mem_vs_eager": _ratio(r.get("peak_extra_bytes"),
                                                     eager.get("peak_extra_bytes")),
                              "batch_vs_eager": _ratio(r.get("max_batch"), eager.get("max_batch"))}
        ours = _find(rows, key, "cpo_fast")
        o = per.get("cpo_fast", {})
        sp, mem, bt = o.get("speedup_vs_eager"), o.get("mem_vs_eager"), o.get("batch_vs_eager")
        vs_trl_speed = _ratio(trl.get("median_ms"), ours.get("median_ms"))
        vs_trl_mem = _ratio(ours.get("peak_extra_bytes"), trl.get("peak_extra_bytes"))
        out[key] = {"paths": per, "targets": {
            "speedup": {"value": sp, "met": None if sp is None else sp >= TARGETS["speedup"]},
            "mem": {"value": mem, "met": None if mem is None else mem <= TARGETS["mem"] + 1e-3},
            "batch": {"value": None if eager.get("max_batch_capped") else bt,
                      "met": None if bt is None or eager.get("max_batch_capped")
                      else bt >= TARGETS["batch"],
                      "lower_bound": bool(ours.get("max_batch_capped"))},
            "vs_trl_fused": {"speedup": vs_trl_speed, "mem": vs_trl_mem,
                             "met": None if vs_trl_speed is None or vs_trl_mem is None
                             else vs_trl_speed > 1 and vs_trl_mem < 1}}}
    return out


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _tps(r: dict) -> str:
    if "tokens_per_s" not in r:
        return r.get("status", "n/a") if r.get("status") != "ok" else "-"
    return f"{r['tokens_per_s']:.0f} [{r['tokens_per_s_p20']:.0f}, {r['tokens_per_s_p80']:.0f}]"


def _batch(r: dict) -> str:
    if r.get("max_batch") is None:
        return "-" if "max_batch_note" not in r else r["max_batch_note"]
    if str(r.get("max_batch_note", "")).startswith("modelled"):
        return f"{r['max_batch']} (modelled)"
    return f">= {r['max_batch']}" if r.get("max_batch_capped") else str(r["max_batch"])


def _x(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _met(t: dict) -> str:
    return "-" if t.get("met") is None else ("met" if t["met"] else "NOT met")


def _loss_note(rows: list[dict]) -> str:
    """Whether the loss column agrees, said from the record itself."""
    first = [r for r in rows if "loss" in r and (r.get("loss_step") == 1 or r["path"] != "compile")]
    late = [r for r in rows if "loss" in r and r not in first]
    by_cfg: dict = {}
    for r in first:
        by_cfg.setdefault(_key(r), []).append(r["loss"])
    spread = max((max(v) - min(v) for v in by_cfg.values()), default=0.0)
    note = (f"Loss column: every path computes the same loss on the same batch; the first "
            f"step's losses of one configuration agree within {spread:.1e} (a check that the "
            "paths compute the same thing, not only a timing).")
    if late:
        note += (" The compile rows of this record give the loss of their second warm-up "
                 "step, after one optimizer update, hence their small difference (fixed "
                 "since: rows now carry the first step's loss, `loss_step` 1).")
    return note


def render(record: dict) -> str:
    st, rows, summ = record["settings"], record["rows"], record["summary"]
    env = record["environment"]
    lines = [f"# End-to-end training step ({env['device']})", "",
             *harness.environment_lines(record),
             f"- transformers {env.get('transformers')}, peft {env.get('peft')}, trl "
             f"{env.get('trl')}, liger-kernel {env.get('liger-kernel')}, cut-cross-entropy "
             f"{env.get('cut-cross-entropy')}",
             f"- model: HF Llama / Qwen2 config, {st['layers']} layers, d={st['hidden']}, untied "
             f"head, {st['dtype']}; LoRA = peft r=16 on every projection (head and embeddings "
             "frozen), full = everything trained; AdamW",
             f"- timed step: batch {st['batch']} x {st['seq']} tokens, forward + backward + "
             f"optimizer step, {st['warmup']} warm-up step(s) (compile: one more) then "
             f"{st['reps']} timed; tokens/s = B*T / step time, median [p20, p80]; the paths "
             "of one (family, V, finetune) are timed in one process, interleaved (one step "
             "of each per round, order rotated), so that a change of load hits all alike",
             "- peak MiB: peak extra memory of the first timed step beyond everything that "
             "existed before it (weights, optimizer state), each case in a fresh process "
             "(CPU: peak RSS growth; CUDA: max_memory_allocated)",
             f"- max batch: largest number of {st['search_seq']}-token sequences whose step "
             f"fits {st['budget_mib']:.0f} MiB of peak extra memory, measured (each probe a "
             f"fresh process); other paths are searched up to {st['cap_factor']}x eager's "
             "result, '>= n' = fits at that cap (a lower bound, not extrapolated)",
             f"- cpo_fast path through `cpo_fast.{st.get('cpo_fast_entry')}`; compile = "
             "torch.compile of the log_softmax + gather function only (not the model)",
             f"- whole run: {st.get('wall_s', 0):.0f} s", ""]
    head = ["family", "V", "finetune", "path", "tokens/s [p20, p80]", "vs eager", "peak MiB",
            "mem vs eager", "max batch", "batch vs eager", "loss"]
    table = []
    for r in rows:
        p = summ.get(_key(r), {}).get("paths", {}).get(r["path"], {})
        table.append([r["family"], r["vocab"], r["finetune"], r["path"], _tps(r),
                      _x(p.get("speedup_vs_eager")), harness.fmt_mib(r.get("peak_extra_bytes")),
                      _x(p.get("mem_vs_eager")), _batch(r),
                      ("≥ " if r.get("max_batch_capped") and r["path"] != "eager" else "")
                      + _x(p.get("batch_vs_eager"), 1)
                      if p.get("batch_vs_eager") is not None else "-",
                      f"{r['loss']:.4f}" if "loss" in r else "-"])
    lines += ["## Every path", "",
              harness.fmt_table(head, table, "lrllrrrrrrr"), "",
              _loss_note(rows), "",
              "## Targets (cpo_fast against eager (a) at the same batch, and against TRL's "
              "fused head)", ""]
    tt = []
    for key, s in summ.items():
        t = s["targets"]
        f, v, ft = key.split("/")
        bt = t["batch"]
        tt.append([f, v, ft,
                   f"{_x(t['speedup']['value'])} {_met(t['speedup'])}",
                   f"{_x(t['mem']['value'], 3)} {_met(t['mem'])}",
                   f"{'≥ ' if bt.get('lower_bound') else ''}{_x(bt['value'], 1)} {_met(bt)}",
                   f"{_x(t['vs_trl_fused']['speedup'])} faster, {_x(t['vs_trl_fused']['mem'], 3)} "
                   f"memory: {_met(t['vs_trl_fused'])}"])
    lines += [harness.fmt_table(["family", "V", "finetune", f"tokens/s >= {TARGETS['speedup']}x",
                                 "peak memory <= 1/3", f"max batch >= {TARGETS['batch']:.0f}x",
                                 "ahead of TRL fused head (tokens/s and memory)"], tt,
                                "lrlllll"), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
