"""Reference log-probs of f_0, computed once with the fused forward and cached on disk.

docs/math.md: the per-token log-probs of f_0 over the dataset are computed once
(no reference model in memory during training); their masked sum is log P^R(x) when f_0
estimates P^R, and per token they feed the KL penalty. The forward runs under
``torch.no_grad`` through :func:`cpo_fast.models.token_batch`
(backbone + fused-linear op, logits never built).

``bf16=True`` runs the passes under bf16 autocast, as the training passes do where bf16
pays (loop.autocast_args): a policy still equal to f_0 then starts at log-weights of sd
0.10 nats on SmolLM2 (rounding alone; an fp32 cache against bf16 training: 0.13).

Cache: ``cache_dir/ref_logprobs-<key>.npz`` with ``key = blake2b(model_fingerprint(model),
data_key, data_fingerprint(encoded), precision, format version)``. The model enters by the bytes of
its parameters (not its name) and the data by its token ids and scoring starts (so a
changed text, tokenizer, prompt split or truncation limit is a different key): a changed
input never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cpo_fast.models import collate, token_batch
from cpo_fast.pipeline.stages.data import Encoded
from cpo_fast.pipeline.stages.modeling import model_fingerprint

_FORMAT = "ref-logprobs-v1"


def data_fingerprint(encoded: Encoded) -> str:
    """blake2b hex digest of every row's token ids and scoring start."""
    h = hashlib.blake2b(digest_size=20)
    lens = np.fromiter((len(r) for r in encoded.input_ids), dtype=np.int64,
                       count=len(encoded.input_ids))
    h.update(lens.tobytes())
    h.update(np.asarray(encoded.score_start, dtype=np.int64).tobytes())
    flat = [t for r in encoded.input_ids for t in r]
    h.update(np.asarray(flat, dtype=np.int64).tobytes())
    return h.hexdigest()


def cache_key(model: Any, encoded: Encoded, data_key: str = "", bf16: bool = False) -> str:
    h = hashlib.blake2b(digest_size=20)
    parts = (_FORMAT, model_fingerprint(model), data_key, data_fingerprint(encoded))
    for part in parts + (("bf16",) if bf16 else ()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def length_sorted_batches(encoded: Encoded, batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (less padding)."""
    order = np.argsort([len(r) for r in encoded.input_ids], kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def precompute_ref_logprobs(
    model: Any,
    encoded: Encoded,
    *,
    cache_dir: str | Path | None,
    data_key: str = "",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    backend: str | None = None,
    progress: bool = True,
    bf16: bool = False,
) -> list[np.ndarray]:
    """Per-row float32 arrays of length ``len(input_ids[i]) - 1``, aligned with the
    ``labels`` positions of :func:`collate` (0 where not scored). Loads the cache when its
    key matches, otherwise computes and writes it (``cache_dir=None`` disables caching).
    ``device``: where batches go (default: the model's device; the model is not moved)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    path = None
    if cache_dir is not None:
        key = cache_key(model, encoded, data_key, bf16)
        path = Path(cache_dir) / f"ref_logprobs-{key}.npz"
        cached = _read_cache(path, encoded) if path.exists() else None
        if cached is not None:
            return cached
    dev = torch.device(device) if device is not None else _model_device(model)
    out: list[np.ndarray | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        batches = length_sorted_batches(encoded, batch_size)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            for idx in tqdm(batches, desc="reference log-probs", disable=not progress):
                b = collate(encoded, idx, pad_id=0)
                b = {k: v.to(dev) for k, v in b.items()}
                lp = token_batch(model, b, backend=backend).logp.float().cpu().numpy()
                for j, i in enumerate(idx):
                    out[i] = lp[j, :len(encoded.input_ids[i]) - 1].copy()
    finally:
        model.train(was_training)
    res: list[np.ndarray] = [r for r in out if r is not None]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in res])]).astype(np.int64)
        flat = np.concatenate(res).astype(np.float32) if res else np.zeros(0, np.float32)
        # write-then-rename: a crash mid-write never leaves a truncated cache behind
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, flat=flat, offsets=offsets)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is ordinary data
        os.replace(tmp, path)
    return res


def _read_cache(path: Path, encoded: Encoded) -> list[np.ndarray] | None:
    """The cached rows, or None (recompute) when the file does not fit ``encoded`` or is
    damaged: a cache is derived data, so a bad one is replaced, not fatal."""
    try:
        with np.load(path, allow_pickle=False) as z:
            flat, offsets = z["flat"], z["offsets"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"{path}: damaged reference cache ({type(e).__name__}: {e}); "
                      "recomputing it.", UserWarning, stacklevel=3)
        return None
    lens = np.diff(offsets)
    expect = np.array([len(r) - 1 for r in encoded.input_ids])
    if len(lens) != len(expect) or not np.array_equal(lens, expect) or offsets[-1] != len(flat):
        return None
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(lens))]


def sequence_ref_logprob(ref: list[np.ndarray]) -> np.ndarray:
    """log P^R(x_i) estimated by f_0: the sum of each row's scored token log-probs."""
    return np.array([float(r.sum(dtype=np.float64)) for r in ref])
