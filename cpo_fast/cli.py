"""``cpo-fast``: the command line.

    cpo-fast demo [--quick] [--output-dir runs/demo]         the embedded demo, no downloads
    cpo-fast train --data FILE --outcome-column COL [--method dr_cpo] [--resume]
    cpo-fast precompute --data FILE ...                       f_0 (SFT) + reference cache
    cpo-fast fit-outcome --data FILE ...                      cross-fitted ghat, prints R^2
    cpo-fast generate --output-dir DIR [--model-dir DIR]      sample from a trained policy
    cpo-fast evaluate --output-dir DIR [--model-dir DIR]      generations + off-policy V

Every option of ``RunConfig`` (cpo_fast/pipeline/config.py) is a flag and a YAML key
(``--config run.yaml``; flags override it). Stages cache their results in
``--output-dir`` (tokenizer, f0/, cache/, dm_*.jsonl), so later commands reuse them.
Errors in the input (unknown column, bad method name, missing file) exit with status 2 and
one line saying what to change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cpo_fast.pipeline.config import METHODS, add_config_flags, config_from


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpo-fast", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the embedded demo (synthetic corpus, all five methods)",
                       description="The embedded demo. The defaults printed below are those of "
                       "`train`; the demo's own (smaller) settings are DEMO_DEFAULTS in "
                       "cpo_fast/pipeline/demo.py (also examples/demo.yaml); any flag overrides "
                       "them.")
    d.add_argument("--quick", action="store_true", help="smaller and faster (about 2 minutes)")
    d.add_argument("--rows", type=int, default=None, help="corpus rows (default 4000; quick 2000)")
    d.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    d.add_argument("--confounding", type=float, default=0.5, help="selection strength in [0, 1)")
    d.add_argument("--noise", type=float, default=0.5, help="outcome noise scale")
    add_config_flags(d)

    for name, help_ in (("train", "f_0, cache, ghat, DM set, then train the policy"),
                        ("precompute", "f_0 (SFT or --f0-model) and its reference log-probs"),
                        ("fit-outcome", "cross-fitted outcome model ghat on f_0's features"),
                        ("generate", "sample texts from a trained policy (or f_0)"),
                        ("evaluate", "score generations and estimate V off-policy")):
        s = sub.add_parser(name, help=help_)
        add_config_flags(s)
        if name == "train":
            s.add_argument("--resume", action="store_true",
                           help="continue from OUTPUT_DIR/METHOD/checkpoint exactly")
            s.add_argument("--no-eval", action="store_true", help="skip the evaluation")
        if name in ("generate", "evaluate"):
            s.add_argument("--model-dir", default=None,
                           help="trained policy (adapter or full model); default "
                                "OUTPUT_DIR/METHOD/model; 'f0' for f_0 itself")
        if name == "generate":
            s.add_argument("--out", default=None, help="JSONL of samples (default "
                                                       "OUTPUT_DIR/METHOD/samples.jsonl)")
    return p


def load_policy(prep, model_dir: str | Path):
    """A trained policy: a peft adapter on f_0, or a full model directory."""
    from cpo_fast.pipeline.train import load_causal_lm

    md = Path(model_dir)
    if (md / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(prep.f0_dir, prep.device), md)
    if (md / "config.json").is_file():
        return load_causal_lm(md, prep.device)
    raise FileNotFoundError(f"--model-dir {str(md)!r}: no adapter_config.json or config.json "
                            "there; train first (cpo-fast train) or point to a model directory.")


def _policy(prep, cfg, model_dir: str | None):
    if model_dir == "f0":
        return prep.load_f0(), "f_0"
    md = model_dir or str(Path(cfg.output_dir) / cfg.method / "model")
    return load_policy(prep, md), cfg.method


def cmd_demo(args) -> int:
    from cpo_fast.pipeline.config import FIELDS
    from cpo_fast.pipeline.demo import run_demo

    overrides = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    if args.config:
        from cpo_fast.pipeline.config import load_yaml

        overrides = {**load_yaml(args.config), **overrides}
    out = overrides.pop("output_dir", "runs/demo")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(out, quick=args.quick, rows=args.rows, methods=methods,
             confounding=args.confounding, noise=args.noise, **overrides)
    return 0


def cmd_train(args) -> int:
    from cpo_fast.pipeline.evaluate import evaluate_model, support_note, write_eval
    from cpo_fast.pipeline.plots import outcome_bars, training_curves, weight_histogram
    from cpo_fast.pipeline.train import prepare, train_policy

    cfg = config_from(args)
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    prep = prepare(cfg, resume=args.resume)
    cfg.save(out / "config.json")
    print(f"[train] {len(prep.train_table)} training rows, "
          f"{0 if prep.eval_table is None else len(prep.eval_table)} held out; ghat "
          f"out-of-fold R^2 = {prep.outcome_fit.r2:.3f}")
    policy, summary = train_policy(prep, cfg, resume=args.resume)
    print(f"[train] {cfg.method}: {summary['steps_done']}/{cfg.steps} steps, last loss "
          f"{summary.get('loss')}, ESS {summary.get('ess')}, DM ESS {summary.get('dm_ess')}  "
          f"({time.perf_counter() - t0:.0f}s)")
    if summary.get("weights_collapsed"):  # issue 11: the ESS guard fired
        print(f"[train] WARNING: the importance weights collapsed at step "
              f"{summary['collapse_step']} ({summary['collapse_term']}): a gain this run "
              "reports is not trustworthy (see docs/validity.md).")
    mdir = out / cfg.method
    training_curves({cfg.method: mdir / "metrics.jsonl"}, mdir / "plots" / "training.png",
                    guard=cfg.ess_guard)
    weight_histogram({cfg.method: mdir / "metrics.jsonl"}, mdir / "plots" / "weights.png")
    result = {"train": summary, "seconds": time.perf_counter() - t0}
    if summary["finished"] and not args.no_eval:
        before = evaluate_model(prep, prep.load_f0(), name="f_0")
        after = evaluate_model(prep, policy, name=cfg.method)
        write_eval(before, mdir / "eval" / "f_0.json")
        write_eval(after, mdir / "eval" / f"{cfg.method}.json")
        outcome_bars({"f_0": before, cfg.method: after}, "ghat", mdir / "plots" / "outcome.png")
        for r in (before, after):
            op = r.get("off_policy") or {}
            print(f"[eval] {r['name']:8s} generations: {_scores(r)} ({support_note(r)}); "
                  f"off-policy {json.dumps(_brief(op))}")
        result.update(f0={k: v for k, v in before.items() if k != "samples"},
                      policy={k: v for k, v in after.items() if k != "samples"})
    result["seconds"] = time.perf_counter() - t0
    (mdir / "results.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"[train] wrote {mdir}/ (model/, checkpoint/, metrics.jsonl, plots/, results.json)")
    return 0


def _scores(res: dict) -> str:
    """'ghat 3.1 [3.0, 3.2], oracle ...' for every scorer in an evaluate_model result."""
    from cpo_fast.pipeline.evaluate import format_row

    keys = [k for k, v in res.items() if isinstance(v, dict) and {"mean", "lo", "hi"} <= set(v)]
    return ", ".join(f"{k} {format_row(res, k)}" for k in keys)


def _brief(op: dict) -> dict:
    """The point estimates of an off_policy_estimates dict (intervals are in the JSON)."""
    out = {}
    for k, v in op.items():
        if isinstance(v, dict) and "estimate" in v:
            out[k] = round(float(v["estimate"]), 4)
        elif isinstance(v, int):
            out[k] = v
        elif isinstance(v, float):
            out[k] = round(v, 4)
    return out


def cmd_precompute(args) -> int:
    from cpo_fast.pipeline.train import prepare

    cfg = config_from(args)
    prep = prepare(cfg, until="precompute")
    lp = [float(r.sum()) for r in prep.train_ref]
    print(f"[precompute] f_0 at {prep.f0_dir}; {len(lp)} training rows cached under "
          f"{prep.out / 'cache'}; mean log P^R = {sum(lp) / max(1, len(lp)):.2f}")
    return 0


def cmd_fit_outcome(args) -> int:
    from cpo_fast.pipeline.train import prepare

    cfg = config_from(args)
    prep = prepare(cfg, until="outcome")
    f = prep.outcome_fit
    print(f"[fit-outcome] {f.kind}, {f.folds}-fold cross-fitted: out-of-fold R^2 = {f.r2:.4f}, "
          f"RMSE = {f.rmse:.4f} (written to {prep.out / 'outcome_model.json'})")
    return 0


def cmd_generate(args) -> int:
    from cpo_fast.pipeline.evaluate import generation_prompts
    from cpo_fast.pipeline.generate import generate_texts
    from cpo_fast.pipeline.train import predict_outcome, prepare

    cfg = config_from(args)
    prep = prepare(cfg, until="outcome")
    model, name = _policy(prep, cfg, args.model_dir)
    texts, prompts = generate_texts(model, prep.tokenizer, cfg.num_samples,
                                    prompt_ids=generation_prompts(prep), seed=cfg.seed + 2024,
                                    max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_k=cfg.top_k,
                                    batch_size=cfg.batch_size_eval, progress=cfg.progress)
    ghat = predict_outcome(prep, texts, prompts)
    path = Path(args.out or Path(cfg.output_dir) / name / "samples.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "ghat": float(ghat[i]),
                                **({"prompt": prompts[i]} if prompts else {})}) + "\n")
    print(f"[generate] {len(texts)} samples from {name} -> {path} (mean ghat "
          f"{float(ghat.mean()):.4f})")
    for t in texts[:5]:
        print("  ", t)
    return 0


def cmd_evaluate(args) -> int:
    from cpo_fast.pipeline.evaluate import evaluate_model, write_eval
    from cpo_fast.pipeline.train import prepare

    cfg = config_from(args)
    prep = prepare(cfg, until="outcome")
    model, name = _policy(prep, cfg, args.model_dir)
    res = evaluate_model(prep, model, name=name)
    path = Path(cfg.output_dir) / "eval" / f"{name}.json"
    write_eval(res, path)
    print(f"[evaluate] {name}: generations: {_scores(res)}; off-policy "
          f"{json.dumps(_brief(res.get('off_policy') or {}))} -> {path}")
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "precompute": cmd_precompute,
            "fit-outcome": cmd_fit_outcome, "generate": cmd_generate, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cpo-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
