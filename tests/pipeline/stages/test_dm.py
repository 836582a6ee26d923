"""The direct-method set (cpo_fast/pipeline/stages/dm.py) from each source."""

from __future__ import annotations

import dataclasses
import json


def test_dm_sources(prep, tmp_path):
    from cpo_fast.pipeline.stages.dm import build_dm_set

    d = build_dm_set(dataclasses.replace(prep.cfg, dm_source="dataset"), None, prep.tokenizer,
                     prep.train_table, prep.train_enc)
    assert d.encoded is prep.train_enc
    f = tmp_path / "unlabeled.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the tea was warm .", "ok ."]))
    d = build_dm_set(dataclasses.replace(prep.cfg, dm_source="file", dm_path=str(f)), None,
                     prep.tokenizer, prep.train_table, prep.train_enc)
    assert d.table.texts == ["the tea was warm .", "ok ."] and len(d.encoded) == 2
