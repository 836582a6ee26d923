"""Training a policy: f_0 -> ``cfg.method`` (CPO, DR-CPO, OO-RLHF, SFT-all, SFT-top).

The pipeline, by concern (read in this order to follow one batch from the file to the
gradient):

    config.py      RunConfig: every setting, and which ones pin caches and resumes
    data.py        load and validate the data file, tokenize, collate
    prepare.py     the shared stages: tokenizer, f_0, reference cache, ghat, DM set
    batches.py     micro-batch k of a run: rows, token ids, cached reference log-probs
    loss.py        a micro-batch's loss (fused-linear token log-probs -> objective)
    step.py        one step's exact gradient over the effective batch (all micro-batches,
                   all ranks: docs/scale-out.md)
    loop.py        the optimization loop, phase by phase
    checkpoint.py  safe, atomic checkpoints (safetensors + JSON) and exact resume
    policy.py      loading f_0, making the policy (LoRA), saving/loading models
    layout.py      where every file of a run lives

This module joins them: :func:`train_policy` builds the policy from f_0 and trains it. The
names below are re-exported so ``from cpo_fast.pipeline.training.train import ...`` keeps working.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cpo_fast.objectives import method_of, top_quantile_mask
from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.run.runtime import pick_device, seed_everything  # noqa: F401
from cpo_fast.pipeline.stages.policy import (  # noqa: F401  (re-exported)
    load_causal_lm,
    lora_targets,
    make_policy,
    save_model,
)
from cpo_fast.pipeline.training.batches import (  # noqa: F401  (re-exported)
    TrainData,
    batch_indices,
    make_batch,
    ref_tokens,
)
from cpo_fast.pipeline.training.loop import lr_lambda, train  # noqa: F401  (re-exported)
from cpo_fast.pipeline.training.prepare import (  # noqa: F401  (re-exported)
    STAGES,
    Prepared,
    load_split,
    predict_outcome,
    prepare,
    texts_features,
)


def train_data(prep: Prepared, method: str) -> TrainData:
    """The rows ``method`` trains on (``sft_top``: the top quantile) and the DM set."""
    cfg = prep.cfg
    rows = np.arange(len(prep.train_enc))
    y = np.asarray(prep.train_table.outcomes, np.float64)
    if method_of(method).top_quantile:
        m = top_quantile_mask(torch.as_tensor(y), cfg.top_quantile,
                              higher_is_better=cfg.higher_is_better)
        rows = rows[m.numpy()]
    if method_of(method).dm_rows and prep.dm is None:
        raise ValueError(f"method={method!r} needs the DM set: call prepare(..., need_dm=True).")
    lp = prep.train_table.log_propensity
    return TrainData(enc=prep.train_enc, rows=rows, ref=prep.train_ref, outcomes=y,
                     log_propensity=lp, ghat=prep.ghat_train,
                     dm_enc=prep.dm.encoded if prep.dm is not None else None,
                     dm_ref=prep.dm_ref, dm_ghat=prep.dm_ghat)


def train_policy(prep: Prepared, cfg: RunConfig | None = None, *, out_dir: str | Path | None = None,
                 resume: bool = False):
    """Train ``cfg.method`` from f_0; returns (policy model, summary dict)."""
    cfg = cfg or prep.cfg
    out_dir = Path(out_dir or prep.layout.method(cfg.method))
    seed_everything(cfg.seed)
    policy = make_policy(prep.load_f0(), cfg)
    prep.f0 = None  # no reference model in memory while training (the cache stands in)
    summary = train(policy, train_data(prep, cfg.method), cfg, out_dir, pad_id=prep.pad_id,
                    resume=resume, desc=cfg.method, tokenizer=prep.tokenizer)
    return policy, summary
