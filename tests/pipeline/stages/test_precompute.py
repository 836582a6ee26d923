"""The reference log-probs of f_0, cached on disk (cpo_fast/pipeline/stages/precompute.py):
equal to a direct computation, a hit for the same model and data, a miss when either changes."""

from __future__ import annotations

import numpy as np
import torch
from conftest import TINY_MODEL, sequence_token_logprobs

from cpo_fast.models import collate
from cpo_fast.pipeline.stages.data import OutcomeTable, encode
from cpo_fast.pipeline.stages.modeling import build_model
from cpo_fast.pipeline.stages.precompute import (
    cache_key,
    data_fingerprint,
    precompute_ref_logprobs,
    sequence_ref_logprob,
)


def test_reference_cache_hit_and_stale_miss(encoded_corpus, tmp_path):
    t, tok, enc = encoded_corpus
    m = build_model("llama", len(tok), seed=0, **TINY_MODEL)
    ref = precompute_ref_logprobs(m, enc, cache_dir=tmp_path, data_key="d", batch_size=7,
                                  progress=False, backend="reference")
    assert len(ref) == len(enc) and all(r.dtype == np.float32 for r in ref)
    assert [len(r) for r in ref] == [len(x) - 1 for x in enc.input_ids]
    # equals a direct batched computation (rows sorted/padded differently there)
    b = collate(enc, range(len(enc)), tok.pad_token_id)
    with torch.no_grad():
        direct = sequence_token_logprobs(m, b, backend="reference").numpy()
    for i, r in enumerate(ref):
        np.testing.assert_allclose(r, direct[i, :len(r)], atol=1e-5)
        assert (r[: enc.score_start[i] - 1] == 0).all()
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    # hit: same model and data give the cached arrays (file untouched, no recompute)
    mtime = files[0].stat().st_mtime_ns
    again = precompute_ref_logprobs(m, enc, cache_dir=tmp_path, data_key="d", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(ref, again, strict=True))
    assert files[0].stat().st_mtime_ns == mtime and len(list(tmp_path.glob("*.npz"))) == 1
    # stale: a changed parameter, a changed text, or another data key miss the cache
    with torch.no_grad():
        m.lm_head.weight[3, 0] += 0.5
    changed = precompute_ref_logprobs(m, enc, cache_dir=tmp_path, data_key="d",
                                      progress=False, backend="reference")
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert not all(np.array_equal(a, b) for a, b in zip(ref, changed, strict=True))
    t2 = OutcomeTable(texts=list(t.texts), outcomes=t.outcomes, prompts=t.prompts)
    t2.texts[0] = t2.texts[0] + " nice"
    enc2 = encode(t2, tok, 32)
    assert data_fingerprint(enc2) != data_fingerprint(enc)
    precompute_ref_logprobs(m, enc2, cache_dir=tmp_path, data_key="d", progress=False,
                            backend="reference")
    precompute_ref_logprobs(m, enc2, cache_dir=tmp_path, data_key="e", progress=False,
                            backend="reference")
    assert len(list(tmp_path.glob("*.npz"))) == 4
    np.testing.assert_allclose(sequence_ref_logprob(ref),
                               [float(r.sum(dtype=np.float64)) for r in ref])


def test_precision_is_part_of_the_cache_key(encoded_corpus, tmp_path):
    """bf16 and fp32 reference log-probs are cached apart: switching ``--bf16`` never reuses
    the other precision's numbers (the weights would not start at 1)."""
    t, tok, enc = encoded_corpus
    m = build_model("llama", len(tok), seed=0, **TINY_MODEL)
    assert cache_key(m, enc, "d", bf16=True) != cache_key(m, enc, "d")
    fp32 = precompute_ref_logprobs(m, enc, cache_dir=tmp_path, data_key="d", progress=False)
    bf16 = precompute_ref_logprobs(m, enc, cache_dir=tmp_path, data_key="d", progress=False,
                                   bf16=True)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    # the bf16 passes really ran in bf16: rounding moves the log-probs, but not far
    diff = np.abs(np.concatenate(fp32) - np.concatenate(bf16))
    assert 0 < diff.max() < 0.5
