"""The direct-method (DM) set x'_j of DR-CPO and OO-RLHF (docs/math.md).

The DM term ``(1/m) sum_j W'_j ghat(x'_j)`` estimates E_{P^f}[ghat(X)] on texts that need
no outcome. Three sources (``RunConfig.dm_source``):

- ``f0_completions`` (default): for ``dm_size`` training rows drawn with a seeded RNG, keep
  the first ``dm_prefix_fraction`` of the text's tokens (or the whole prompt, when the data
  has prompts) and let f_0 sample the rest. The texts are then close to draws from f_0,
  i.e. from P^R, so W'_j = P^f/P^R is well defined and not degenerate, and they are
  *new* texts, which is what makes DR-CPO's DM term differ from CPO's. The token ids are
  kept exactly as sampled (no decode/re-encode round trip), so the reference log-probs are
  those of the sequence f_0 actually produced.
- ``dataset``: the training texts themselves (with ghat cross-fitted, DR-CPO then has the
  same value as CPO for raw/self-normalized/truncated weights; see objectives.py).
- ``file``: a separate unlabeled file (same text/prompt column names; outcome optional).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.stages.data import DataConfig, Encoded, OutcomeTable, encode, load_table
from cpo_fast.pipeline.stages.generate import decode, sample_continuations


@dataclass
class DMSet:
    """DM texts with their encoding (the ids that get scored)."""

    table: OutcomeTable
    encoded: Encoded
    source: str

    def __len__(self) -> int:
        return len(self.encoded)


def f0_completions(f0, tokenizer, train_table: OutcomeTable, train_enc: Encoded, *, size: int,
                   prefix_fraction: float, max_tokens: int, seed: int, temperature: float = 1.0,
                   batch_size: int = 64, device=None, progress: bool = False,
                   bf16: bool = True) -> DMSet:
    """Sample f_0's completions of truncated training texts (see the module docstring)."""
    n = len(train_enc)
    rng = np.random.default_rng(seed + 7919)
    rows = rng.choice(n, size=size, replace=size > n)
    prefixes, keeps = [], []
    for i in rows:
        ids, start = train_enc.input_ids[i], train_enc.score_start[i]
        body = len(ids) - 1 - start  # response tokens, EOS excluded
        k = start + max(1, int(round(prefix_fraction * body))) if train_table.prompts is None \
            else start  # prompted data: the whole response is f_0's
        k = min(k, len(ids) - 1, max_tokens - 2)
        prefixes.append(ids[:k])
        keeps.append(k)
    room = max(1, max_tokens - min(keeps) - 1)
    new = sample_continuations(f0, tokenizer, prefixes, max_new_tokens=room,
                               temperature=temperature, seed=seed + 104729,
                               batch_size=batch_size, device=device, progress=progress,
                               desc="DM: f_0 completions", bf16=bf16)
    eos = int(tokenizer.eos_token_id)
    input_ids, starts, texts, prompts = [], [], [], []
    for i, p, r in zip(rows, prefixes, new, strict=True):
        r = r[: max(0, max_tokens - len(p) - 1)]
        input_ids.append([*p, *r, eos])
        start = train_enc.score_start[i]
        starts.append(start)
        texts.append(decode(tokenizer, [*p[start:], *r]))
        prompts.append(train_table.prompts[i] if train_table.prompts is not None else "")
    table = OutcomeTable(texts=texts, prompts=prompts if train_table.prompts is not None else None,
                         ids=[f"dm{j}" for j in range(len(texts))])
    return DMSet(table, Encoded(input_ids=input_ids, score_start=starts), "f0_completions")


def build_dm_set(cfg: RunConfig, f0, tokenizer, train_table: OutcomeTable, train_enc: Encoded,
                 device=None) -> DMSet:
    """The DM set chosen by ``cfg.dm_source``."""
    if cfg.dm_source == "dataset":
        return DMSet(train_table, train_enc, "dataset")
    if cfg.dm_source == "file":
        dcfg = DataConfig(path=cfg.dm_path, text_column=cfg.text_column,
                          outcome_column=cfg.outcome_column, prompt_column=cfg.prompt_column,
                          max_tokens=cfg.max_tokens, on_too_long="truncate", path_flag="--dm-path")
        table = load_table(dcfg, require_outcome=False)
        if cfg.dm_size and len(table) > cfg.dm_size:
            rng = np.random.default_rng(cfg.seed + 7919)
            table = table.subset(np.sort(rng.choice(len(table), cfg.dm_size, replace=False)))
        return DMSet(table, encode(table, tokenizer, cfg.max_tokens, "truncate"), "file")
    return f0_completions(f0, tokenizer, train_table, train_enc, size=cfg.dm_size,
                          prefix_fraction=cfg.dm_prefix_fraction, max_tokens=cfg.max_tokens,
                          seed=cfg.seed, batch_size=cfg.batch_size_eval, device=device,
                          progress=cfg.progress)


def save_dm_set(dm: DMSet, path: str | Path) -> None:
    """JSONL with the text, prompt, token ids and score start of every DM row."""
    with Path(path).open("w") as f:
        for j in range(len(dm)):
            f.write(json.dumps({
                "text": dm.table.texts[j],
                "prompt": dm.table.prompts[j] if dm.table.prompts is not None else None,
                "input_ids": dm.encoded.input_ids[j], "score_start": dm.encoded.score_start[j],
            }) + "\n")


def load_dm_set(path: str | Path, source: str) -> DMSet:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    has_prompts = any(r["prompt"] is not None for r in rows)
    table = OutcomeTable(texts=[r["text"] for r in rows],
                         prompts=[r["prompt"] or "" for r in rows] if has_prompts else None,
                         ids=[f"dm{j}" for j in range(len(rows))])
    enc = Encoded(input_ids=[r["input_ids"] for r in rows],
                  score_start=[r["score_start"] for r in rows])
    return DMSet(table, enc, source)
