"""Pipeline models: the fused-linear route equals the logits route for every arch (also
through peft), fingerprints, the reference log-prob cache, pooled features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpo_fast.models import last_hidden, output_weight
from cpo_fast.pipeline.run.config import ARCHS
from cpo_fast.pipeline.stages.data import OutcomeTable, collate, encode
from cpo_fast.pipeline.stages.modeling import build_model, model_fingerprint
from cpo_fast.pipeline.stages.outcome import bag_of_words_features, mean_pooled_features
from cpo_fast.pipeline.stages.precompute import (
    data_fingerprint,
    precompute_ref_logprobs,
    sequence_ref_logprob,
)
from cpo_fast.pipeline.stages.synthetic import make_corpus
from cpo_fast.pipeline.stages.tokenizer import train_tokenizer
from cpo_fast.token_batch import from_inputs

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, max_positions=64)


def _usable_backends() -> list[str]:
    """'reference' plus the default backend when its implementation imports here."""
    from cpo_fast._backend import backend_module, resolve_backend

    out = ["reference"]
    try:
        name = resolve_backend(None, torch.device("cpu"))
        if name != "reference":
            backend_module(name, "linear_token_logprobs")
            out.append(name)
    except (ImportError, ValueError):
        pass
    return out


@pytest.fixture(scope="module")
def corpus():
    t = make_corpus(48, seed=3)
    t.prompts = [" ".join(s.split()[:2]) if i % 3 == 0 else "" for i, s in enumerate(t.texts)]
    t.texts = [" ".join(s.split()[2:]) if i % 3 == 0 else s for i, s in enumerate(t.texts)]
    tok = train_tokenizer(t.texts + t.prompts, 300, min_frequency=1, kind="wordlevel")
    return t, tok, encode(t, tok, 32)


def sequence_token_logprobs(model, b, **kw):
    """The fused route: token log-probs [B, T-1] aligned with labels[:, 1:]."""
    tb = from_inputs(model, b, **kw)
    return (tb.logp, tb.entropy) if kw.get("with_entropy") else tb.logp


def _logits_route(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lab = b["labels"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, lab.clamp(min=0)[..., None])
    return (lp[..., 0] * (lab != -100)).float(), logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", _usable_backends())
def test_fused_route_matches_logits(corpus, arch, backend):
    t, tok, enc = corpus
    model = build_model(arch, len(tok), seed=0, tie_word_embeddings=arch == "gpt2", **TINY)
    b = collate(enc, range(8), tok.pad_token_id)
    lp, ent = sequence_token_logprobs(model, b, with_entropy=True, backend=backend)
    ref, logits = _logits_route(model, b)
    lab = b["labels"][:, 1:]
    assert lp.dtype == torch.float32 and lp.shape == lab.shape
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    assert (lp[lab == -100] == 0).all()
    p = torch.softmax(logits[:, :-1].double(), -1)
    h = -(p * torch.log(p)).sum(-1).float()
    m = lab != -100
    torch.testing.assert_close(ent[m], h[m], atol=1e-5, rtol=1e-5)
    # gradients flow to the backbone and the output weight
    lp.sum().backward()
    w, _ = output_weight(model)
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_through_peft(corpus):
    from peft import LoraConfig, get_peft_model

    t, tok, enc = corpus
    base = build_model("llama", len(tok), seed=0, **TINY)
    fp0 = model_fingerprint(base)
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
    b = collate(enc, range(4), tok.pad_token_id)
    lp = sequence_token_logprobs(pm, b, backend="reference")
    ref, _ = _logits_route(pm, b)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    assert last_hidden(pm, b["input_ids"], b["attention_mask"]).shape[-1] == 32
    assert model_fingerprint(pm) != fp0  # the adapters are part of the state


def test_fingerprint_changes_with_one_parameter(corpus):
    _, tok, _ = corpus
    m = build_model("qwen2", len(tok), seed=0, **TINY)
    m2 = build_model("qwen2", len(tok), seed=0, **TINY)
    assert model_fingerprint(m) == model_fingerprint(m2)
    with torch.no_grad():
        next(iter(m2.parameters())).view(-1)[5] += 1e-6
    assert model_fingerprint(m) != model_fingerprint(m2)
    assert model_fingerprint(build_model("qwen2", len(tok), seed=1, **TINY)) != \
        model_fingerprint(m)


def test_reference_cache_hit_and_stale_miss(corpus, tmp_path):
    t, tok, enc = corpus
    m = build_model("llama", len(tok), seed=0, **TINY)
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


def test_mean_pooled_features_ignore_padding(corpus):
    t, tok, enc = corpus
    m = build_model("gpt2", len(tok), seed=0, **TINY)
    f_small = mean_pooled_features(m, enc, batch_size=1)
    f_big = mean_pooled_features(m, enc, batch_size=16)
    assert f_small.shape == (len(enc), 32)
    np.testing.assert_allclose(f_small, f_big, atol=1e-4)
    assert m.training  # mode restored
    f_all = mean_pooled_features(m, enc, batch_size=16, layers="all")
    assert f_all.shape == (len(enc), 32 * 2)  # embeddings + 1 layer
    np.testing.assert_allclose(f_all[:, 32:], f_big, atol=1e-5)  # last = ln_f output
    f_emb = mean_pooled_features(m, enc, batch_size=16, layers=[0])
    np.testing.assert_allclose(f_emb, f_all[:, :32], atol=1e-6)
    bow = bag_of_words_features(enc, len(tok))
    assert bow.shape == (len(enc), len(tok))
    assert bow.sum(1).tolist() == [len(r) for r in enc.input_ids]
