"""Small causal LMs of every architecture (cpo_fast/pipeline/stages/modeling.py): the fused-linear
route (cpo_fast.models.token_batch) equals the logits route (also through peft), and
the fingerprint the caches key on."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL, sequence_token_logprobs

from cpo_fast.models import collate, last_hidden, output_weight
from cpo_fast.pipeline.run.config import ARCHS
from cpo_fast.pipeline.stages.modeling import build_model, model_fingerprint


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


def _logits_route(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lab = b["labels"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, lab.clamp(min=0)[..., None])
    return (lp[..., 0] * (lab != -100)).float(), logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", _usable_backends())
def test_fused_route_matches_logits(encoded_corpus, arch, backend):
    t, tok, enc = encoded_corpus
    model = build_model(arch, len(tok), seed=0, tie_word_embeddings=arch == "gpt2", **TINY_MODEL)
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


def test_through_peft(encoded_corpus):
    from peft import LoraConfig, get_peft_model

    t, tok, enc = encoded_corpus
    base = build_model("llama", len(tok), seed=0, **TINY_MODEL)
    fp0 = model_fingerprint(base)
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
    b = collate(enc, range(4), tok.pad_token_id)
    lp = sequence_token_logprobs(pm, b, backend="reference")
    ref, _ = _logits_route(pm, b)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    assert last_hidden(pm, b["input_ids"], b["attention_mask"]).shape[-1] == 32
    assert model_fingerprint(pm) != fp0  # the adapters are part of the state


def test_fingerprint_changes_with_one_parameter(encoded_corpus):
    _, tok, _ = encoded_corpus
    m = build_model("qwen2", len(tok), seed=0, **TINY_MODEL)
    m2 = build_model("qwen2", len(tok), seed=0, **TINY_MODEL)
    assert model_fingerprint(m) == model_fingerprint(m2)
    with torch.no_grad():
        next(iter(m2.parameters())).view(-1)[5] += 1e-6
    assert model_fingerprint(m) != model_fingerprint(m2)
    assert model_fingerprint(build_model("qwen2", len(tok), seed=1, **TINY_MODEL)) != \
        model_fingerprint(m)
