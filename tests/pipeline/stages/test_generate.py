"""Sampling from a causal LM (cpo_fast/pipeline/stages/generate.py): seeded, bounded, and the
caller's RNG untouched."""

from __future__ import annotations

import torch


def test_generation_seeded_and_bounded(prep):
    from cpo_fast.pipeline.stages.generate import generate_texts, sample_continuations

    f0 = prep.load_f0()
    bos = prep.tokenizer.bos_token_id
    a = sample_continuations(f0, prep.tokenizer, [[bos]] * 5, max_new_tokens=7, seed=3)
    b = sample_continuations(f0, prep.tokenizer, [[bos]] * 5, max_new_tokens=7, seed=3)
    assert a == b and all(len(r) <= 7 for r in a)
    assert prep.tokenizer.eos_token_id not in sum(a, [])
    state = torch.random.get_rng_state()
    texts, prompts = generate_texts(f0, prep.tokenizer, 4, prompts=["the soup was"],
                                    max_new_tokens=5, seed=0)
    assert len(texts) == 4 and prompts == ["the soup was"] * 4
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
