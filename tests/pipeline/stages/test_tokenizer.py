"""The tokenizer trained on the data itself (cpo_fast/pipeline/stages/tokenizer.py)."""

from __future__ import annotations

import pytest

from cpo_fast.pipeline.stages.synthetic import make_corpus, oracle
from cpo_fast.pipeline.stages.tokenizer import train_tokenizer


def test_tokenizer_roundtrip_and_save(tmp_path):
    texts = make_corpus(100, seed=2).texts
    for kind in ("bpe", "wordlevel"):
        tk = train_tokenizer(texts, 400, min_frequency=1, kind=kind)
        assert [tk.pad_token_id, tk.bos_token_id, tk.eos_token_id, tk.unk_token_id] == [0, 1, 2, 3]
        ids = tk(texts[0])["input_ids"]
        assert ids[0] == tk.bos_token_id
        dec = tk.decode(ids, skip_special_tokens=True)
        assert oracle([dec])[0] == pytest.approx(oracle([texts[0]])[0])
        if kind == "bpe":
            assert dec == texts[0]
        tk.save_pretrained(tmp_path / kind)
        from transformers import AutoTokenizer

        back = AutoTokenizer.from_pretrained(tmp_path / kind)
        assert back(texts[1])["input_ids"] == tk(texts[1])["input_ids"]
        assert back.pad_token == "<pad>" and back.eos_token == "<eos>"
