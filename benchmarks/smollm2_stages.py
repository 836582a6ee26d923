"""Each pipeline stage on the packaged SmolLM2-135M (cpo_fast.pretrained), timed on this machine.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/smollm2_stages.py [--rows 256] [--steps 3]

Stages, as `cpo-fast train --f0-model smollm2-135m` runs them on EmoBank texts
(../shared/data/emobank.csv; the script stops with a message when it is absent):
precompute (f_0's per-token log-probs, no grad), ghat features (f_0's hidden states of every
layer, mean-pooled), DM set generation (f_0's completions of truncated texts, KV cache),
a DR-CPO training step (LoRA, batch + DM batch rows, forward + backward + AdamW), and
evaluation generation (unconditioned samples). Generation and the forward passes are timed
in fp32 and under bf16 autocast. Tokens/s counts real (unpadded) tokens; for generation,
new tokens. Peak RSS is the process's maximum resident set. The table goes to stdout and
to benchmarks/results/smollm2-stages.md, with the extrapolation to a 2,000-row, 100-step
DR-CPO run with evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EMOBANK = ROOT.parent / "shared" / "data" / "emobank.csv"


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def _counting(fn, counted: list[int]):
    """``fn`` (sample_continuations) that also records how many tokens it sampled."""
    def wrapped(*a, **kw):
        out = fn(*a, **kw)
        counted.append(sum(map(len, out)))
        return out
    return wrapped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="rows for precompute / features")
    ap.add_argument("--dm", type=int, default=64, help="DM completions to sample")
    ap.add_argument("--samples", type=int, default=64, help="evaluation generations")
    ap.add_argument("--steps", type=int, default=3, help="training steps timed (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=32, help="rows (and DM rows) per step")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "smollm2-stages.md"))
    args = ap.parse_args(argv)
    if not EMOBANK.is_file():
        print(f"EmoBank not found at {EMOBANK}; nothing measured.")
        return 0
    from cpo_fast.pipeline.run.config import RunConfig
    from cpo_fast.pipeline.run.layout import RunLayout
    from cpo_fast.pipeline.stages import dm as dm_mod
    from cpo_fast.pipeline.stages.data import encode
    from cpo_fast.pipeline.stages.dm import f0_completions
    from cpo_fast.pipeline.stages.generate import generate_texts
    from cpo_fast.pipeline.stages.outcome import mean_pooled_features
    from cpo_fast.pipeline.stages.policy import load_causal_lm, make_policy
    from cpo_fast.pipeline.stages.precompute import precompute_ref_logprobs
    from cpo_fast.pipeline.training.prepare import get_tokenizer, load_split, model_source

    torch.manual_seed(0)
    load = os.getloadavg()
    cfg = RunConfig(data=str(EMOBANK), outcome_column="V", id_column="id",
                    f0_model="smollm2-135m", max_tokens=args.max_tokens,
                    max_rows=max(args.rows, 2 * args.batch) + 8, eval_fraction=0.0,
                    batch_size=args.batch, dm_batch_size=args.batch, steps=args.steps + 1,
                    warmup_steps=0, progress=False, save_every=0).validate()
    (model, t_load) = timed(load_causal_lm, model_source("smollm2-135m"), torch.device("cpu"))
    model.requires_grad_(False).eval()
    tok = get_tokenizer(cfg, [], RunLayout("/nonexistent"))
    table, _ = load_split(cfg)
    enc = encode(table, tok, cfg.max_tokens, "truncate")
    sub = type(enc)(enc.input_ids[:args.rows], enc.score_start[:args.rows])
    ntok = sum(len(r) for r in sub.input_ids)
    rows: list[tuple] = []  # stage, dtype, seconds, tok/s, note, load, tokens

    def add(stage, dt, secs, tokens, note=""):
        rows.append((stage, dt, secs, tokens / secs, note, os.getloadavg()[0], tokens))
        print(f"{stage:24s} {dt:5s} {secs:8.1f}s {tokens / secs:9.0f} tok/s  {note}  "
              f"(peak RSS {rss_gb():.2f} GB, load {os.getloadavg()[0]:.2f})", flush=True)

    def under(bf16: bool):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    tmp = Path(tempfile.mkdtemp(prefix="smollm2-stages-"))
    for bf16 in (False, True):
        dt = "bf16" if bf16 else "fp32"
        with under(bf16):
            _, s = timed(precompute_ref_logprobs, model, sub, batch_size=64,
                         cache_dir=tmp / dt)
        add("precompute", dt, s, ntok, f"{len(sub)} rows")
        with under(bf16):
            _, s = timed(mean_pooled_features, model, sub, batch_size=64, layers="all")
        add("ghat features", dt, s, ntok, f"{len(sub)} rows, 31 layers")
    real_sample = dm_mod.sample_continuations
    for bf16 in (False, True):
        dt = "bf16" if bf16 else "fp32"
        counted: list[int] = []
        dm_mod.sample_continuations = _counting(real_sample, counted)
        try:
            _, s = timed(f0_completions, model, tok, table, enc, size=args.dm,
                         prefix_fraction=0.3, max_tokens=cfg.max_tokens, seed=0,
                         batch_size=64, bf16=bf16)
        finally:
            dm_mod.sample_continuations = real_sample
        new = sum(counted)
        add("DM generation", dt, s, new, f"{args.dm} completions, batch 64")
        for bs in (64,):
            (texts, _), s = timed(generate_texts, model, tok, args.samples,
                                  max_new_tokens=args.max_new_tokens, seed=0, batch_size=bs,
                                  bf16=bf16)
            new = sum(len(tok.encode(t)) + 1 for t in texts)  # approx.: re-encoded + EOS
            add("eval generation", dt, s, new, f"{args.samples} samples, batch {bs}")
    # training: DR-CPO steps through the pipeline's own step function
    from cpo_fast.distributed import SINGLE
    from cpo_fast.pipeline.training.loop import TrainData, effective_gradient, step_micro_batches

    ref = precompute_ref_logprobs(model, sub, cache_dir=tmp / "fp32")
    y = np.asarray(table.outcomes[:len(sub)], np.float64)
    data = TrainData(enc=sub, rows=np.arange(len(sub)), ref=ref, outcomes=y,
                     ghat=np.full(len(sub), y.mean()), dm_enc=sub, dm_ref=ref,
                     dm_ghat=np.full(len(sub), y.mean()))
    for bf16 in (False, True):
        dt = "bf16" if bf16 else "fp32"
        pcfg = dataclasses.replace(cfg, method="dr_cpo", bf16=bf16)
        policy = make_policy(model, pcfg)
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        auto = dict(device_type="cpu", dtype=torch.bfloat16, enabled=bf16)
        secs, toks = 0.0, 0
        for step in range(args.steps + 1):
            micro = step_micro_batches(data, step, cfg=pcfg, world=SINGLE,
                                       pad_id=tok.pad_token_id, device=torch.device("cpu"))
            t = time.perf_counter()
            effective_gradient(policy, micro, pcfg, SINGLE, auto, step + 1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:  # the first step warms up (allocations, oneDNN kernels)
                secs += time.perf_counter() - t
                toks += sum(int(b["attention_mask"].sum()) + int(d["attention_mask"].sum())
                            for b, d in micro)
        add("training step (DR-CPO)", dt, secs / args.steps, toks / args.steps,
            f"LoRA r=8, {args.batch} + {args.batch} rows")
        del policy, opt
    write(args.out, rows, load, t_load, args, per_row=ntok / len(sub))
    return 0


def extrapolate(rows, args, per_row: float) -> list[str]:
    """Seconds of a 2,000-row, 100-step DR-CPO run with evaluation, from the measured rates:
    as `cpo-fast train` runs it (fp32 precompute and training, bf16 generation and ghat
    features), 8 + 8 rows per step, dm_size 512, 256 samples of 48 tokens per model."""
    def rate(stage, dt):
        return next(r[3] for r in rows if r[0] == stage and r[1] == dt)

    def per(stage, dt, unit):
        r = next(r for r in rows if r[0] == stage and r[1] == dt)
        return r[6] / unit

    step = next(r[2] for r in rows if r[0].startswith("training") and r[1] == "fp32")
    dm_new = per("DM generation", "bf16", args.dm)  # new tokens per completion
    gen_new = per("eval generation", "bf16", args.samples)
    n, dm, samples = 2000, 512, 256
    parts = {
        "precompute (train + eval + DM rows)": (n * per_row + dm * (per_row + dm_new))
        / rate("precompute", "fp32"),
        "ghat features (rows, DM set, generations)": (n * per_row + dm * (per_row + dm_new)
                                                      + 2 * samples * gen_new)
        / rate("ghat features", "bf16"),
        "DM set generation (512 completions)": dm * dm_new / rate("DM generation", "bf16"),
        "training (100 steps, 8 + 8 rows)": 100 * step,
        "evaluation generation (f_0 + policy, 256 each)": 2 * samples * gen_new
        / rate("eval generation", "bf16"),
    }
    out = ["", "Extrapolated to a 2,000-row, 100-step DR-CPO run with evaluation (the rates "
           "above, this load; model loading and ridge fits not counted):", "",
           "| stage | seconds |", "|---|---:|"]
    out += [f"| {k} | {v:.0f} |" for k, v in parts.items()]
    out.append(f"| **total** | **{sum(parts.values()):.0f}** ({sum(parts.values()) / 60:.1f} "
               "min) |")
    return out


def write(path: str, rows, load, t_load: float, args, per_row: float) -> None:
    lines = ["# Pipeline stages on SmolLM2-135M, 2-core CPU", "",
             f"`benchmarks/smollm2_stages.py --rows {args.rows} --dm {args.dm} --samples "
             f"{args.samples} --steps {args.steps} --batch {args.batch}`; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, load average at start "
             f"{load[0]:.2f} (shared machine: other jobs ran), OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}. Model load {t_load:.1f} s "
             "(from the converted cache). Peak RSS of the whole script "
             f"{rss_gb():.2f} GB.", "",
             "| stage | dtype | seconds | tokens/s | what | load |",
             "|---|---|---:|---:|---|---:|"]
    lines += [f"| {s} | {d} | {t:.1f} | {r:.0f} | {n} | {ld:.1f} |"
              for s, d, t, r, n, ld, _ in rows]
    lines += extrapolate(rows, args, per_row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
