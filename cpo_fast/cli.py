"""``cpo-fast``: the command line.

    cpo-fast demo [--quick] [--output-dir runs/demo]         the embedded demo, no downloads
    cpo-fast train --data FILE --outcome-column COL [--method dr_cpo] [--resume]
    cpo-fast precompute --data FILE ...                       f_0 (SFT) + reference cache
    cpo-fast fit-outcome --data FILE ...                      cross-fitted ghat, prints R^2
    cpo-fast generate --output-dir DIR [--model-dir DIR]      sample from a trained policy
    cpo-fast evaluate --output-dir DIR [--model-dir DIR]      generations + off-policy V
    cpo-fast bench --vocab V --hidden d --tokens N [--json]   op + end-to-end timings here

Every option of ``RunConfig`` (cpo_fast/pipeline/run/config.py) is a flag and a YAML key
(``--config run.yaml``; flags override it). Each command saves its settings in
``OUTPUT_DIR/config.json`` and later commands on the same ``--output-dir`` start from them,
so ``cpo-fast evaluate --output-dir DIR`` needs no other flag. Stages cache their results
in ``--output-dir`` (layout: cpo_fast/pipeline/run/layout.py, docs/pipeline.md), so later
commands reuse them. Errors in the input (unknown column, bad method name, missing file)
exit with status 2 and one line saying what to change; Ctrl-C during training saves a
checkpoint and prints the ``--resume`` command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from cpo_fast.bench import arguments as bench_arguments
from cpo_fast.bench.command import main as bench_main
from cpo_fast.objectives import METHODS
from cpo_fast.pipeline.report.demo import run_demo
from cpo_fast.pipeline.report.estimate import describe
from cpo_fast.pipeline.report.evaluate import (
    evaluate_model,
    format_row,
    generation_prompts,
    support_note,
    write_eval,
)
from cpo_fast.pipeline.report.plots import outcome_bars, training_curves, weight_histogram
from cpo_fast.pipeline.run.config import (
    FIELDS,
    RunConfig,
    add_config_flags,
    config_from,
    load_yaml,
    saved_settings,
)
from cpo_fast.pipeline.run.layout import RunLayout
from cpo_fast.pipeline.run.persist import update_json, write_text
from cpo_fast.pipeline.run.preflight import preflight
from cpo_fast.pipeline.run.signals import TrainingInterrupted
from cpo_fast.pipeline.stages.generate import generate_texts
from cpo_fast.pipeline.stages.policy import load_policy
from cpo_fast.pipeline.training.loop import train_policy
from cpo_fast.pipeline.training.prepare import predict_outcome, prepare


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpo-fast", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the embedded demo (synthetic corpus, all five methods)",
                       description="The embedded demo. The defaults printed below are those of "
                       "`train`; the demo's own (smaller) settings are DEMO_DEFAULTS in "
                       "cpo_fast/pipeline/report/demo.py (also examples/demo.yaml); any flag overrides "
                       "them.")
    d.add_argument("--quick", action="store_true", help="smaller and faster (about 2 minutes)")
    d.add_argument("--rows", type=int, default=None, help="corpus rows (default 4000; quick 2000)")
    d.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    d.add_argument("--confounding", type=float, default=0.5, help="selection strength in [0, 1)")
    d.add_argument("--noise", type=float, default=0.5, help="outcome noise scale")
    d.add_argument("--model", default=None,
                   help="a pretrained model to start from: smollm2-135m (packaged, offline) or "
                        "a HF model directory; judged by VADER too (default: a new small model)")
    add_config_flags(d)

    for name, help_ in (("train", "f_0, cache, ghat, DM set, then train the policy"),
                        ("precompute", "f_0 (SFT or --f0-model) and its reference log-probs"),
                        ("fit-outcome", "cross-fitted outcome model ghat on f_0's features"),
                        ("generate", "sample texts from a trained policy (or f_0)"),
                        ("evaluate", "score generations and estimate V off-policy")):
        s = sub.add_parser(name, help=help_)
        add_config_flags(s)
        if name in ("train", "precompute", "fit-outcome"):
            s.add_argument("--resume", action="store_true",
                           help="continue an interrupted run exactly from its checkpoint "
                                "(OUTPUT_DIR/f0/ and, for train, OUTPUT_DIR/METHOD/)")
        if name == "train":
            s.add_argument("--no-eval", action="store_true", help="skip the evaluation")
        if name in ("generate", "evaluate"):
            s.add_argument("--model-dir", default=None,
                           help="trained policy (adapter or full model); default "
                                "OUTPUT_DIR/METHOD/model; 'f0' for f_0 itself")
        if name == "generate":
            s.add_argument("--out", default=None, help="JSONL of samples (default "
                                                       "OUTPUT_DIR/samples/NAME.jsonl)")

    b = sub.add_parser("bench", help="op-level and end-to-end comparison on your shapes and device",
                       description=bench_arguments.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_arguments.add_arguments(b)
    return p


def _policy_dir(cfg, model_dir: str | None) -> str:
    """The policy a generate / evaluate command reads; checked before any stage runs."""
    if model_dir == "f0":
        return model_dir
    md = model_dir or str(RunLayout(cfg.output_dir).method(cfg.method) / "model")
    if Path(md).is_dir():
        return md
    if model_dir:
        raise ValueError(f"--model-dir: {md} is not a model directory.")
    raise ValueError(f"--method {cfg.method} (no trained model in {md}; train it first, or pass "
                     "--model-dir DIR, or --model-dir f0 for f_0 itself).")


def _policy(prep, cfg, model_dir: str):
    """f_0, or a trained policy: a peft adapter on f_0 or a full model directory."""
    if model_dir == "f0":
        return prep.load_f0(), "f_0"
    return load_policy(prep.f0_dir, model_dir, prep.device), cfg.method


def _explicit(args) -> set[str]:
    """Config fields this invocation sets itself (flags or --config)."""
    keys = {k for k, v in vars(args).items() if k in FIELDS and v is not None}
    if getattr(args, "config", None):
        keys |= set(load_yaml(args.config))
    return keys


def run_config(args) -> RunConfig:
    """This command's settings: those saved in --output-dir by earlier commands (the run's
    one source of truth: OUTPUT_DIR/config.json, then OUTPUT_DIR/<method>/config.json),
    overridden by --config and by flags. So `generate --output-dir DIR` needs nothing else."""
    probe = config_from(args)
    lay = RunLayout(probe.output_dir)
    top = saved_settings(lay.config)
    method = probe.method if "method" in _explicit(args) else top.get("method", probe.method)
    base = {**top, **saved_settings(lay.method(method) / "config.json"), "method": method}
    cfg = config_from(args, base=base)
    preflight(cfg, args.command)
    return cfg


def cmd_demo(args) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    if args.config:
        overrides = {**load_yaml(args.config), **overrides}
    out = overrides.pop("output_dir", _demo_dir(args))
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(out, quick=args.quick, rows=args.rows, methods=methods,
             confounding=args.confounding, noise=args.noise, model=args.model, **overrides)
    return 0


def cmd_train(args) -> int:
    cfg = run_config(args)
    t0 = time.perf_counter()
    prep = prepare(cfg, resume=args.resume)
    mdir = prep.layout.method(cfg.method)
    cfg.save(mdir / "config.json")
    print(f"[train] {len(prep.train_table)} training rows, "
          f"{0 if prep.eval_table is None else len(prep.eval_table)} held out; ghat "
          f"out-of-fold R^2 = {prep.outcome_fit.r2:.3f}")
    policy, summary = train_policy(prep, cfg, resume=args.resume)
    if not prep.is_main:  # torchrun / accelerate: rank 0 alone reports, evaluates and writes
        return 0
    print(f"[train] {cfg.method}: {summary['steps_done']}/{cfg.steps} steps, last loss "
          f"{_fmt(summary.get('loss'))}, ESS {_fmt(summary.get('ess'))}, "
          f"DM ESS {_fmt(summary.get('dm_ess'))}  ({time.perf_counter() - t0:.0f}s)")
    if summary.get("weights_collapsed"):  # the ESS guard fired (docs/validity.md)
        print(f"[train] WARNING: the importance weights collapsed at step "
              f"{summary['collapse_step']} ({summary['collapse_term']}): a gain this run "
              "reports is not trustworthy (see docs/validity.md).")
    training_curves({cfg.method: mdir / "metrics.jsonl"}, mdir / "plots" / "training.png",
                    guard=cfg.ess_guard)
    weight_histogram({cfg.method: mdir / "metrics.jsonl"}, mdir / "plots" / "weights.png")
    result: dict = {"train": summary}
    if summary["finished"] and not args.no_eval:
        result.update(_evaluate_pair(prep, policy, cfg))
    result["seconds"] = time.perf_counter() - t0
    update_json(mdir / "results.json", result)
    evaluated = summary["finished"] and not args.no_eval
    print(f"[train] wrote {mdir}/ (model/, checkpoint/, metrics.jsonl, plots/, results.json)"
          + (f" and {prep.layout.root / 'eval'}/" if evaluated else ""))
    return 0


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _evaluate_pair(prep, policy, cfg) -> dict:
    """f_0 and the trained policy: generations scored, off-policy estimates (eval/)."""
    lay, mdir = prep.layout, prep.layout.method(cfg.method)
    before = evaluate_model(prep, prep.load_f0(), name="f_0")
    after = evaluate_model(prep, policy, name=cfg.method)
    write_eval(before, lay.eval("f_0"))
    write_eval(after, lay.eval(cfg.method))
    outcome_bars({"f_0": before, cfg.method: after}, "ghat", mdir / "plots" / "outcome.png")
    for r in (before, after):
        op = r.get("off_policy") or {}
        print(f"[eval] {r['name']:8s} generations: {_scores(r)} ({support_note(r)}); "
              f"off-policy {json.dumps(describe(op))}")
    return {"f0": {k: v for k, v in before.items() if k != "samples"},
            "policy": {k: v for k, v in after.items() if k != "samples"},
            "evaluated_step": cfg.steps}


def _scores(res: dict) -> str:
    """'ghat 3.1 [3.0, 3.2], oracle ...' for every scorer in an evaluate_model result."""
    keys = [k for k, v in res.items() if isinstance(v, dict) and {"mean", "lo", "hi"} <= set(v)]
    return ", ".join(f"{k} {format_row(res, k)}" for k in keys)


def cmd_precompute(args) -> int:
    prep = prepare(run_config(args), until="precompute", resume=args.resume)
    lp = [float(r.sum()) for r in prep.train_ref]
    print(f"[precompute] f_0 at {prep.f0_dir}; {len(lp)} training rows cached under "
          f"{prep.layout.cache}; mean log P^R = {sum(lp) / max(1, len(lp)):.2f}")
    return 0


def cmd_fit_outcome(args) -> int:
    prep = prepare(run_config(args), until="outcome", resume=args.resume)
    f = prep.outcome_fit
    print(f"[fit-outcome] {f.kind}, {f.folds}-fold cross-fitted: out-of-fold R^2 = {f.r2:.4f}, "
          f"RMSE = {f.rmse:.4f} (written to {prep.layout.outcome_model})")
    return 0


def cmd_generate(args) -> int:
    cfg = run_config(args)
    model_dir = _policy_dir(cfg, args.model_dir)
    prep = prepare(cfg, until="outcome", save_config=False)
    model, name = _policy(prep, cfg, model_dir)
    texts, prompts = generate_texts(model, prep.tokenizer, cfg.num_samples,
                                    prompt_ids=generation_prompts(prep), seed=cfg.seed + 2024,
                                    max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_k=cfg.top_k,
                                    batch_size=cfg.batch_size_eval, progress=cfg.progress)
    ghat = predict_outcome(prep, texts, prompts)
    path = Path(args.out) if args.out else prep.layout.samples(name)
    write_text(path, "".join(json.dumps({"text": t, "ghat": float(ghat[i]),
                                         **({"prompt": prompts[i]} if prompts else {})}) + "\n"
                             for i, t in enumerate(texts)))
    print(f"[generate] {len(texts)} samples from {name} -> {path} (mean ghat "
          f"{float(ghat.mean()):.4f})")
    for t in texts[:5]:
        print("  ", printable(t))
    return 0


def printable(text: str) -> str:
    """A generation as one terminal-safe line: control and other non-printable characters
    (escape sequences a model can emit) are shown escaped, never sent to the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def cmd_evaluate(args) -> int:
    cfg = run_config(args)
    model_dir = _policy_dir(cfg, args.model_dir)
    prep = prepare(cfg, until="outcome", save_config=False)
    model, name = _policy(prep, cfg, model_dir)
    res = evaluate_model(prep, model, name=name)
    path = prep.layout.eval(name)
    write_eval(res, path)
    print(f"[evaluate] {name}: generations: {_scores(res)}; off-policy "
          f"{json.dumps(describe(res.get('off_policy') or {}))} -> {path}")
    return 0


def cmd_bench(args) -> int:
    return bench_main(args)


COMMANDS = {"bench": cmd_bench, "demo": cmd_demo, "train": cmd_train, "precompute": cmd_precompute,
            "fit-outcome": cmd_fit_outcome, "generate": cmd_generate, "evaluate": cmd_evaluate}


def _output_dir(args) -> Path | None:
    """The output directory this command will write (best effort, before any work)."""
    if args.command == "bench":  # writes nothing
        return None
    try:
        out = getattr(args, "output_dir", None)
        if out is None and getattr(args, "config", None):
            out = load_yaml(args.config).get("output_dir")
    except (OSError, ValueError):
        return None
    return Path(out or (_demo_dir(args) if args.command == "demo" else FIELDS["output_dir"].default))


def _demo_dir(args) -> str:
    """The demo's default output directory: the quick and the full demo each have their own,
    so running one after the other reuses nothing built with the other's settings."""
    return "runs/demo-quick" if args.quick else "runs/demo"


def _remove_if_empty(path: Path) -> None:
    """Delete ``path`` when it holds no file at all (only empty directories, if any)."""
    if not path.is_dir() or any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        return
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    path.rmdir()


def _resume_hint(args, cfg_out: Path | None) -> str:
    if args.command in ("demo", "generate", "evaluate"):  # no --resume: finished stages are reused
        return f"the same cpo-fast {args.command} command"
    cmd = args.command
    method = f" --method {args.method}" if getattr(args, "method", None) else ""
    return f"cpo-fast {cmd} --output-dir {shlex.quote(str(cfg_out))}{method} --resume"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # outside the training loop SIGTERM stops like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit status: 0 done; 2 bad input (one line says what to change);
    1 a file could not be written; 128 + signal number when interrupted (130 for Ctrl-C)."""
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the caller's warning settings afterwards
        warnings.showwarning = _one_line_warning
        # our dependencies' deprecation notices about each other: nothing a user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
        return _run(args)


def _run(args) -> int:
    out = _output_dir(args)
    existed = out is not None and out.exists()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as e:
        print(f"cpo-fast {args.command}: {e}.\nContinue with: {_resume_hint(args, out)}",
              file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"cpo-fast {args.command}: interrupted; the last checkpoint (if any) is intact. "
              f"Continue with: {_resume_hint(args, out)}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cpo-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cpo-fast {args.command}: error: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if out is not None and not existed:
            _remove_if_empty(out)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line naming their kind (no echoed source line: users read the CLI's
    output, not our code)."""
    print(f"cpo-fast: {category.__name__}: {message}", file=file or sys.stderr)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
