"""Where everything of a run lives: one place naming every path under ``--output-dir``.

    OUTPUT_DIR/
      config.json            settings of the last command run here (the source of truth that
                             `generate`, `evaluate`, `precompute`, `train --resume` read)
      prepare.json           the settings that pinned tokenizer/, f0/ and cache/
      corpus.csv             (demo only) the generated corpus
      tokenizer/             a tokenizer trained here (absent when one was given)
      f0/                    f_0's SFT run: metrics.jsonl, checkpoint/, model/
      cache/                 ref_logprobs-<key>.npz: f_0's per-token log-probs
      outcome_model.json     ghat's kind and out-of-fold R^2 / RMSE
      dm_<source>_<...>.jsonl  the DM set (texts and token ids)
      <method>/              one policy run: config.json, metrics.jsonl, checkpoint/,
                             model/, plots/, results.json
      eval/<name>.json       an evaluation (`train`, `evaluate`, `demo`), and
      eval/<name>.samples.jsonl  its generations
      samples/<name>.jsonl   `generate`'s samples
      plots/, results.json   (demo only) the comparison of all methods

``<name>`` is ``f_0`` for f_0 and the method name for a trained policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class _Under:
    """A fixed file or folder under the run folder, read as an attribute of RunLayout."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, layout: RunLayout, owner: type | None = None) -> Path:
        return layout.root / self.name


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    config = _Under("config.json")
    prepare = _Under("prepare.json")
    tokenizer = _Under("tokenizer")
    f0 = _Under("f0")
    cache = _Under("cache")
    outcome_model = _Under("outcome_model.json")

    def dm_set(self, source: str, tag: str) -> Path:
        return self.root / f"dm_{source}_{tag}.jsonl"

    def method(self, method: str) -> Path:
        return self.root / method

    def eval(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"

    def samples(self, name: str) -> Path:
        return self.root / "samples" / f"{name}.jsonl"
