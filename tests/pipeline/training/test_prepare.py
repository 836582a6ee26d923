"""The shared stages built once per output directory (cpo_fast/pipeline/training/prepare.py)."""

from __future__ import annotations

import numpy as np
from conftest import TINY_RUN


def test_prepare_stages(prep):
    n = len(prep.train_enc)
    assert len(prep.train_ref) == n and prep.ghat_train.shape == (n,)
    for r, ids, s in zip(prep.train_ref, prep.train_enc.input_ids, prep.train_enc.score_start,
                         strict=True):
        assert r.shape == (len(ids) - 1,) and np.all(r[s - 1:] < 0)  # scored tokens: log p < 0
    assert (prep.out / "f0" / "model" / "config.json").is_file()
    assert (prep.out / "tokenizer" / "tokenizer_config.json").is_file()
    # The DM set: f_0 completions that keep the corpus prefix token by token.
    dm = prep.dm
    assert len(dm) == TINY_RUN["dm_size"] and len(prep.dm_ref) == len(dm)
    assert prep.dm_ghat.shape == (len(dm),)
    assert all(ids[0] == prep.tokenizer.bos_token_id and ids[-1] == prep.tokenizer.eos_token_id
               and len(ids) <= TINY_RUN["max_tokens"] for ids in dm.encoded.input_ids)
