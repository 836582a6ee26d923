"""Training a policy: f_0 -> ``cfg.method`` (CPO, DR-CPO, OO-RLHF, SFT-all, SFT-top).

:func:`train_data` picks the rows the method trains on (and the DM set) from the prepared
stages (prepare.py); :func:`train_policy` makes the policy from f_0 (LoRA or full,
stages/policy.py) and runs the loop (loop.py). docs/architecture.md walks one micro-batch
from here to its gradient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cpo_fast.objectives import method_of, top_quantile_mask
from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.run.runtime import seed_everything
from cpo_fast.pipeline.stages.policy import make_policy
from cpo_fast.pipeline.training.batches import TrainData
from cpo_fast.pipeline.training.loop import train
from cpo_fast.pipeline.training.prepare import Prepared


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
