"""What the loop samples (cpo_fast/pipeline/training/batches.py): pure, epoch-permuting batch
indices, and the DM rows a step needs checked against the DM set."""

from __future__ import annotations

import numpy as np
import pytest

from cpo_fast.pipeline.training.batches import batch_indices


def test_batch_indices_pure_and_epoch_permutations():
    a = [batch_indices(10, 4, k, seed=3) for k in range(5)]
    b = [batch_indices(10, 4, k, seed=3) for k in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    flat = np.concatenate(a)
    assert sorted(flat[:10].tolist()) == list(range(10))  # epoch 0 covers every row once
    assert sorted(flat[10:20].tolist()) == list(range(10))
    assert not np.array_equal(batch_indices(10, 4, 0, seed=4), a[0])


def test_dm_rows_checked_for_every_dm_source():
    from cpo_fast.pipeline.stages.data import Encoded
    from cpo_fast.pipeline.training.batches import TrainData

    enc = Encoded(input_ids=[[1, 2, 3]] * 8, score_start=[1] * 8)
    data = TrainData(enc=enc, rows=np.arange(8), ref=[], outcomes=np.zeros(8), dm_enc=enc)
    data.check("dr_cpo", 8)
    with pytest.raises(ValueError, match="32 DM rows per optimizer step .* DM set has 8"):
        data.check("dr_cpo", 32)
