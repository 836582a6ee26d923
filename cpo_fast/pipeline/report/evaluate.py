"""Evaluate a model: what its generations score, and off-policy estimates of V.

Two views of V(theta) = E_{X ~ P^f_theta}[g(X)] (docs/math.md section 1):
- *on-policy*: sample texts from the model, score them with the outcome model ghat and
  with any given scorer (the demo's oracle g*), report means with bootstrap 95% intervals;
  next to ghat's score, the share of generations outside ghat's support and the share
  whose raw prediction left the training outcome range (``ghat_support``, support.py):
  a high share means ghat's score of those texts is an extrapolation, not a measurement;
- *off-policy*: on held-out rows, the importance weights w_i = P^f(x_i) / P^R(x_i) give
  the IPW, self-normalized and doubly robust estimates (``estimate.off_policy_estimates``),
  with ghat's mean over the model's own samples as the DR's direct-method term.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpo_fast.models import collate, token_batch
from cpo_fast.objectives import sequence_logprobs
from cpo_fast.pipeline.report.estimate import bootstrap_ci, off_policy_estimates
from cpo_fast.pipeline.run.scorers import Scorer, load_scorer, run_scorer
from cpo_fast.pipeline.stages.data import OutcomeTable, encode
from cpo_fast.pipeline.stages.generate import generate_texts
from cpo_fast.pipeline.stages.support import support_report
from cpo_fast.pipeline.training.prepare import texts_features


@torch.no_grad()
def sequence_logprobs_of(model, encoded, *, pad_id: int, batch_size: int = 64,
                         backend: str | None = None, length_normalize: bool = False) -> np.ndarray:
    """s_i of every encoded row under ``model`` (fused-linear op, no grad)."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = np.zeros(len(encoded), np.float64)
    for s in range(0, len(encoded), batch_size):
        idx = list(range(s, min(s + batch_size, len(encoded))))
        b = {k: v.to(dev) for k, v in collate(encoded, idx, pad_id).items()}
        tb = token_batch(model, b, backend=backend)
        v = sequence_logprobs(tb.logp.float(), tb.mask, length_normalize=length_normalize)
        out[s:s + len(idx)] = v.double().cpu().numpy()
    model.train(was)
    return out


def generation_prompts(prep) -> list[list[int]] | None:
    """Prompt token ids (with BOS) of the held-out rows, or None for unconditioned data."""
    if prep.train_table.prompts is None or not prep.cfg.gen_from_prompts:
        return None
    enc = prep.eval_enc if prep.eval_enc is not None else prep.train_enc
    return [ids[:s] for ids, s in zip(enc.input_ids, enc.score_start, strict=True)]


def evaluate_model(prep, model, *, name: str, scorers: dict[str, Scorer] | None = None,
                   seed: int | None = None, off_policy: bool = True) -> dict[str, Any]:
    """Generate ``cfg.num_samples`` texts from ``model`` and score them; off-policy estimates
    on the held-out rows. Returns a JSON-able dict (samples included)."""
    cfg = prep.cfg
    seed = cfg.seed + 2024 if seed is None else seed
    texts, prompts = generate_texts(
        model, prep.tokenizer, cfg.num_samples, prompt_ids=generation_prompts(prep), seed=seed,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        batch_size=cfg.batch_size_eval, progress=cfg.progress, desc=f"generate ({name})")
    res: dict[str, Any] = {"name": name, "num_samples": len(texts)}
    ci = lambda v: dict(zip(("mean", "lo", "hi"),
                            map(float, bootstrap_ci(np.asarray(v, np.float64),
                                                    n_boot=cfg.bootstrap, seed=seed)), strict=True))
    scores: dict[str, np.ndarray] = {}
    outside = None
    if prep.outcome_fit is not None:
        scores["ghat"], outside, res["ghat_support"] = ghat_with_support(prep, texts, prompts)
    scorers = dict(scorers or {})
    if cfg.scorer:
        sname, fn = load_scorer(cfg.scorer)
        scorers.setdefault(sname, fn)
    for sname, fn in scorers.items():
        scores[sname] = run_scorer(sname, fn, texts)
    for sname, v in scores.items():
        res[sname] = ci(v)
    res["mean_tokens"] = float(np.mean([len(prep.tokenizer.encode(t, add_special_tokens=False))
                                        for t in texts])) if texts else 0.0
    res["distinct_fraction"] = len(set(texts)) / max(1, len(texts))
    if off_policy and prep.eval_enc is not None and prep.eval_ref is not None:
        s = sequence_logprobs_of(model, prep.eval_enc, pad_id=prep.pad_id,
                                 batch_size=cfg.batch_size_eval, backend=cfg.backend,
                                 length_normalize=cfg.length_normalize)
        if prep.eval_table.log_propensity is not None:
            ref = np.asarray(prep.eval_table.log_propensity, np.float64)
        else:
            enc = prep.eval_enc
            ref = np.array([np.asarray(r, np.float64).sum() for r in prep.eval_ref])
            if cfg.length_normalize:
                ref /= np.maximum(1, [len(ids) - s0 for ids, s0 in
                                      zip(enc.input_ids, enc.score_start, strict=True)])
        ghat_pol = scores.get("ghat")  # per-sample: its bootstrap covers the DM term too
        est = off_policy_estimates(s - ref, np.asarray(prep.eval_table.outcomes, np.float64),
                                   prep.ghat_eval, ghat_pol, n_boot=cfg.bootstrap, seed=seed)
        res["off_policy"] = _jsonable(est)
    res["samples"] = [{"text": t, **({"prompt": prompts[i]} if prompts else {}),
                       **{k: float(v[i]) for k, v in scores.items()},
                       **({"ghat_outside": bool(outside[i])} if outside is not None else {})}
                      for i, t in enumerate(texts)]
    return res


def ghat_with_support(prep, texts: list[str], prompts: list[str] | None = None):
    """(ghat's clipped predictions, the out-of-support flags or None, the support report)
    for ``texts``, from one pass of f_0's features."""
    table = OutcomeTable(texts=[t if t.strip() else " " for t in texts], prompts=prompts)
    feats = texts_features(prep, encode(table, prep.tokenizer, prep.cfg.max_tokens, "truncate"))
    fit = prep.outcome_fit
    return (np.asarray(fit.predict(feats), np.float64), fit.outside_support(feats),
            support_report(fit, feats))


def support_note(res: dict[str, Any]) -> str:
    """'12% outside ghat's support, 3% clipped' for a result of ``evaluate_model``."""
    sup = res.get("ghat_support") or {}
    parts = []
    if "ood_share" in sup:
        parts.append(f"{sup['ood_share']:.0%} outside ghat's support")
    if "clipped_share" in sup:
        parts.append(f"{sup['clipped_share']:.0%} clipped to the outcome range")
    return ", ".join(parts)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def write_eval(res: dict[str, Any], path: str | Path) -> None:
    """results JSON (without samples) and the samples as JSONL next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".samples.jsonl").open("w") as f:
        for s in res.get("samples", []):
            f.write(json.dumps(s) + "\n")
    path.write_text(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=2))


def format_row(res: dict[str, Any], key: str) -> str:
    v = res.get(key)
    return "-" if v is None else f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
