"""What the loop samples: the rows of a run (:class:`TrainData`) and micro-batch ``k`` of
them, built on the fly from token ids and the cached reference log-probs.

Micro-batch ``k`` is a pure function of (seed, k) (:func:`batch_indices`), so a resumed run
sees the same data in the same order without saving any iterator state. The effective
batch of optimizer step ``t`` is the global micro-batches ``k = t*W*A .. (t+1)*W*A - 1``
(W ranks, A = grad_accum), of which rank r computes the A consecutive ones starting at
``t*W*A + r*A`` (:func:`step_micro_batches`). With b rows each, that is the slice
``[t*E, (t+1)*E)`` of the seeded permutation stream, E = W*A*b: a function of (seed, t, E)
alone, however E is split into ranks and micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cpo_fast.distributed import World
from cpo_fast.models import collate
from cpo_fast.objectives import method_of
from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.stages.data import Encoded


@dataclass
class TrainData:
    """Rows the loop samples from (``rows`` indexes ``enc``), and the DM set for DR/OO."""

    enc: Encoded
    rows: np.ndarray
    ref: list[np.ndarray]  # f_0 token log-probs per row, aligned with labels
    outcomes: np.ndarray | None = None
    log_propensity: np.ndarray | None = None
    ghat: np.ndarray | None = None  # cross-fitted (out-of-fold) predictions
    dm_enc: Encoded | None = None
    dm_ref: list[np.ndarray] | None = None
    dm_ghat: np.ndarray | None = None

    def check(self, method: str, dm_rows: int = 0) -> None:
        """``dm_rows``: DM rows of one effective batch; more than the DM set holds would
        repeat rows within a batch and report an ESS over rows that do not exist."""
        spec = method_of(method)
        if spec.dm_rows and self.dm_enc is None:
            raise ValueError(f"method={method!r} needs a DM set (TrainData.dm_enc) and ghat.")
        if spec.dm_rows and dm_rows > len(self.dm_enc):
            raise ValueError(f"--dm-batch-size: {dm_rows} DM rows per optimizer step (over "
                             f"micro-batches and ranks) but the DM set has {len(self.dm_enc)}; "
                             "lower --dm-batch-size or raise --dm-size.")
        if spec.weighted and spec.outcome_rows and self.outcomes is None:
            raise ValueError(f"method={method!r} needs outcomes.")


def batch_indices(n: int, batch_size: int, k: int, seed: int) -> np.ndarray:
    """Row positions of micro-batch ``k``: consecutive slices of per-epoch permutations."""
    start = k * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, pos = divmod(start, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[pos:pos + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out, dtype=np.int64)


def ref_tokens(ref: list[np.ndarray], idx, width: int) -> torch.Tensor:
    """Cached per-token log-probs of rows ``idx`` padded/cut to ``width`` scored positions
    (``labels[:, 1:]``'s)."""
    out = torch.zeros(len(idx), width, dtype=torch.float32)
    for b, i in enumerate(idx):
        r = torch.as_tensor(np.asarray(ref[int(i)], dtype=np.float32))[:width]
        out[b, : len(r)] = r
    return out


# Training batches are padded to a multiple of 16 tokens. oneDNN (and torch's other per-shape
# caches) keep state for every matmul shape they see; with each length from 5 to 64 tokens
# a SmolLM2 run's RSS grew by about 60 MB a step (9 GB after 100 steps), with a handful of
# shapes it stays flat. The padding is masked and costs a few per cent of the step.
PAD_MULTIPLE = 16


def make_batch(enc: Encoded, idx, pad_id: int, device, ref, outcomes=None, lp=None, ghat=None):
    """collate() plus the rows' cached reference token log-probs (``ref_token_logp``) and
    ghat (``outcome_pred``), on ``device``."""
    b = collate(enc, idx, pad_id, outcomes=outcomes, log_propensity=lp,
                pad_to_multiple=PAD_MULTIPLE)
    b["ref_token_logp"] = ref_tokens(ref, idx, b["labels"].shape[1] - 1)
    if ghat is not None:
        b["outcome_pred"] = torch.as_tensor(np.asarray(ghat)[np.asarray(idx)], dtype=torch.float32)
    return {k: v.to(device) for k, v in b.items()}


def micro_batch(data: TrainData, k: int, *, cfg: RunConfig, pad_id: int,
                device) -> tuple[dict, dict | None]:
    """Micro-batch ``k`` of a run with settings ``cfg``: the training rows and, for
    DR-CPO/OO-RLHF, the DM rows (their own permutations: seed + 1)."""
    idx = data.rows[batch_indices(len(data.rows), cfg.batch_size, k, cfg.seed)]
    batch = make_batch(data.enc, idx, pad_id, device, data.ref, data.outcomes,
                       data.log_propensity, data.ghat)
    if not method_of(cfg.method).dm_rows:
        return batch, None
    didx = batch_indices(len(data.dm_enc), cfg.dm_batch_size, k, cfg.seed + 1)
    return batch, make_batch(data.dm_enc, didx, pad_id, device, data.dm_ref, ghat=data.dm_ghat)


def step_micro_batches(data: TrainData, step: int, *, cfg: RunConfig, world: World, pad_id: int,
                       device) -> list[tuple[dict, dict | None]]:
    """This rank's ``cfg.grad_accum`` micro-batches of optimizer step ``step`` (0-based); the
    ranks' micro-batches, concatenated in rank order, are the one-process order."""
    first = (step * world.size + world.rank) * cfg.grad_accum
    return [micro_batch(data, first + m, cfg=cfg, pad_id=pad_id, device=device)
            for m in range(cfg.grad_accum)]
