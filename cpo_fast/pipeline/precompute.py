"""Reference log-probs of f_0, computed once with the fused forward and cached on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cpo_fast.pipeline.data import Encoded


def data_fingerprint(encoded: Encoded) -> str:
    """blake2b of the token ids and scoring starts of every row."""
    raise NotImplementedError


def precompute_ref_logprobs(model: Any, encoded: Encoded, *, cache_dir: str | Path,
                            data_key: str = "", batch_size: int = 32, device: Any = None,
                            backend: str | None = None, progress: bool = True
                            ) -> list[np.ndarray]:
    """Per-row float32 [len(input_ids)-1] token log-probs (0 where not scored)."""
    raise NotImplementedError
