"""The shared stages for a model and a dataset given as Python objects (not files): what
``cpo_fast.trl.DRCPOTrainer`` runs before training, with the CLI's own stage functions
(prepare.py) in the CLI's order. ``args`` is a ``DRCPOConfig`` (its field names are the
ones errors name)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpo_fast.objectives import method_of
from cpo_fast.pipeline.run.config import RunConfig, pinned_values
from cpo_fast.pipeline.run.runtime import is_main, main_first, pick_device, seed_everything
from cpo_fast.pipeline.stages.data import OutcomeTable, _as_float, _as_text, encode
from cpo_fast.pipeline.stages.modeling import model_fingerprint
from cpo_fast.pipeline.stages.policy import load_causal_lm, save_model
from cpo_fast.pipeline.stages.precompute import data_fingerprint
from cpo_fast.pipeline.stages.tokenizer import for_documents
from cpo_fast.pipeline.training.prepare import Prepared, build_dm, fit_f0, fit_outcome, ref_logprobs
from cpo_fast.pipeline.training.prepare import split_held_out as split_rows


def dataset_table(ds: Any, args: Any, name: str = "train_dataset") -> OutcomeTable:
    """A ``datasets.Dataset`` as the pipeline's validated OutcomeTable; errors name the
    argument, the row and the column (as the CLI's do for a file)."""
    cols = list(getattr(ds, "column_names", None) or [])
    if not cols or len(ds) == 0:
        raise ValueError(f"{name}: expected a non-empty datasets.Dataset with a text and an "
                         f"outcome column, got {type(ds).__name__}.")
    text, prompt = args.dataset_text_field, args.prompt_column
    if text not in cols and prompt is None and {"prompt", "completion"} <= set(cols):
        text, prompt = "completion", "prompt"  # TRL's prompt-completion format
    for what, col in (("dataset_text_field", text), ("outcome_column", args.outcome_column),
                      ("prompt_column", prompt), ("log_propensity_column", args.log_propensity_column)):
        if col is not None and col not in cols:
            raise ValueError(f"{name}: no column {col!r} (DRCPOConfig.{what}); its columns are "
                             f"{cols}. Rename the column or set DRCPOConfig({what}=...).")

    def numbers(col: str) -> np.ndarray:
        out = []
        for r, v in enumerate(ds[col], 1):
            if v is None or (isinstance(v, str) and not v.strip()):
                raise ValueError(f"{name}: row {r}, column {col!r}: missing value; outcomes "
                                 "must be numbers.")
            out.append(_as_float(v, r, col, name))
        return np.asarray(out, np.float64)

    texts = [_as_text(v, r, text, name) for r, v in enumerate(ds[text], 1)]
    empty = next((r for r, t in enumerate(texts, 1) if not t.strip()), None)
    if empty is not None:
        raise ValueError(f"{name}: row {empty}, column {text!r}: empty text.")
    lp = args.log_propensity_column
    return OutcomeTable(texts=texts, outcomes=numbers(args.outcome_column),
                        prompts=None if prompt is None else
                        [_as_text(v, r, prompt, name) for r, v in enumerate(ds[prompt], 1)],
                        log_propensity=None if lp is None else numbers(lp))


def split_held_out(table: OutcomeTable, fraction: float, seed: int):
    """(train, held-out) rows: the CLI's seeded split (prepare.load_split, without max_rows)."""
    return split_rows(table, fraction, np.random.default_rng(seed))


def _stage_key(f0_fp: str, encs: list, cfg: RunConfig) -> str:
    keys = {k: v for k, v in pinned_values(cfg, "prepare").items()
            if k not in ("data", "base_model", "f0_model", "tokenizer")}
    keys.update(dm=[cfg.dm_source, cfg.dm_size, cfg.dm_prefix_fraction, cfg.dm_path],
                outcome=[cfg.outcome_model, cfg.outcome_folds, cfg.outcome_features])
    h = hashlib.blake2b(digest_size=10)
    parts = [f0_fp, *(data_fingerprint(e) for e in encs if e is not None), json.dumps(keys, sort_keys=True)]
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def build_stages(model: Any, tokenizer: Any, train_t: OutcomeTable, eval_t: OutcomeTable | None,
                 cfg: RunConfig, stages: Path):
    """prepare._stages on a given model and dataset: f_0, the reference cache, ghat, the DM
    set (rank 0 builds, the other ranks reload what it wrote)."""
    if len(train_t) < 2:
        raise ValueError(f"train_dataset: {len(train_t)} rows after the held-out split; need >= 2.")
    if tokenizer is None:
        raise ValueError("DRCPOTrainer needs processing_class= (the model's tokenizer).")

    for_documents(tokenizer)  # as prepare.get_tokenizer: BOS/EOS at document boundaries, a pad
    tokenizer.model_max_length = int(1e9)  # encode() truncates to max_length itself
    for name in ("bos", "eos"):
        if getattr(tokenizer, f"{name}_token_id") is None:
            raise ValueError(f"processing_class has no {name} token; set tokenizer.{name}_token.")
    device = pick_device(cfg)
    seed_everything(cfg.seed)
    path = Path(model) if isinstance(model, (str, Path)) else None
    if path is not None:
        model = load_causal_lm(path, device)
    elif hasattr(model, "peft_config"):
        raise ValueError("model= is already a peft model; pass the base model and peft_config=.")
    model = model.to(device).eval().requires_grad_(False)
    with main_first("the DR-CPO stages (f_0, reference cache, ghat, DM set)"):
        train_enc = encode(train_t, tokenizer, cfg.max_tokens, cfg.on_too_long)
        eval_enc = None if eval_t is None else encode(eval_t, tokenizer, cfg.max_tokens, cfg.on_too_long)
        root = stages / _stage_key(model_fingerprint(model), [train_enc, eval_enc], cfg)
        cfg.output_dir = str(root)
        prep = Prepared(cfg, device, root, tokenizer, train_t, eval_t, train_enc, eval_enc, [], None,
                        root / "f0" / "model")
        if cfg.f0_steps:  # f_0 = SFT of the given model (the CLI's --base-model)
            base = path or root / "base"
            if path is None and is_main() and not (base / "config.json").is_file():
                save_model(model, tokenizer, base)
            cfg.base_model = str(base)
            fit_f0(prep, resume=False)
        else:  # the given model is f_0 (the CLI's --f0-model); on disk for evaluate()
            prep.f0, prep.f0_dir = model, path or prep.f0_dir
            if path is None and is_main() and not (prep.f0_dir / "config.json").is_file():
                save_model(model, tokenizer, prep.f0_dir)
        prep.load_f0().eval()
        prep.train_ref = ref_logprobs(prep, train_enc, "train")
        if eval_enc is not None:
            prep.eval_ref = ref_logprobs(prep, eval_enc, "eval")
        fit_outcome(prep)
        if method_of(cfg.method).dm_rows:
            build_dm(prep)
    return prep


def make_trainable(f0: Any, peft_config: Any, seed: int) -> Any:
    """The policy starts at f_0 (policy.make_policy): peft adapters, initialized under the
    CLI's seed (seed + 1, without moving the run's RNG), or a full copy without peft_config."""
    model = copy.deepcopy(f0)
    if peft_config is None:
        return model.requires_grad_(True)
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return get_peft_model(model, peft_config)
