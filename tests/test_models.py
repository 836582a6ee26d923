"""The model-level drop-in (cpo_fast.causal_lm_token_logprobs): equal to the model's own
logits path for every supported family and wrapper, head transforms included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import cpo_fast
from cpo_fast import HeadTransform
from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.models import collate, output_weight

V, D = 97, 32
_SMALL = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)


def _model(kind: str, **over):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=64, **over)
        return tf.GPT2LMHeadModel(cfg).eval()  # no dropout: compared path to path
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
           "cohere": (tf.CohereConfig, tf.CohereForCausalLM),
           "granite": (tf.GraniteConfig, tf.GraniteForCausalLM)}[kind]
    extra = {"head_dim": 16} if kind == "gemma2" else {}
    gain = over.pop("_head_gain", 1.0)
    model = cls[1](cls[0](**_SMALL, **extra, **over)).float()
    with torch.no_grad():  # make the head's output large enough for a softcap to matter
        model.get_output_embeddings().weight.mul_(gain)
    return model.eval()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    return ids, mask, labels


def _hf_logprobs(model, ids, mask, labels, temperature: float = 1.0):
    """The model's own path: logits (with its head transform) -> log_softmax -> gather."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / temperature
    lab = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    return lp.masked_fill(lab == IGNORE_INDEX, 0.0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_equal(model, temperature: float = 1.0, **kw):
    ids, mask, labels = _batch()
    want = _hf_logprobs(model, ids, mask, labels, temperature)
    (want * torch.linspace(-1, 1, want.numel()).view_as(want)).sum().backward()
    g_want = _grads(model)
    model.zero_grad()
    got = cpo_fast.causal_lm_token_logprobs(model, ids, labels, attention_mask=mask,
                                            temperature=temperature, **kw)
    assert got.shape == labels[:, 1:].shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    (got * torch.linspace(-1, 1, got.numel()).view_as(got)).sum().backward()
    g_got = _grads(model)
    assert g_got.keys() == g_want.keys()
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n].float(), atol=2e-5, rtol=2e-4, msg=n)
    return got


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_matches_the_models_logits(kind):
    _check_equal(_model(kind))


def test_tied_embeddings_get_both_gradients():
    model = _model("llama", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _check_equal(model)


def test_temperature():
    _check_equal(_model("qwen2"), temperature=0.7)


def test_gemma2_softcap_is_applied():
    """Gemma-2 caps its logits at 30: the drop-in reads that and is reference-exact; without
    the cap the result would differ (so the check can fail)."""
    model = _model("gemma2", _head_gain=300.0)
    assert HeadTransform.from_model(model) == HeadTransform(logit_scale=1.0, softcap=30.0)
    got = _check_equal(model)
    ids, mask, labels = _batch()
    with torch.no_grad():
        h = cpo_fast.models.last_hidden(model, ids, mask)
        w, _ = output_weight(model)
        uncapped = cpo_fast.linear_token_logprobs(h[:, :-1], w, labels[:, 1:])
    assert (uncapped - got.detach()).abs().max() > 1e-2


def test_cohere_and_granite_scales():
    cohere = _model("cohere", logit_scale=0.25)
    assert HeadTransform.from_model(cohere).logit_scale == 0.25
    _check_equal(cohere)
    granite = _model("granite", logits_scaling=4.0)
    assert HeadTransform.from_model(granite).logit_scale == 0.25
    _check_equal(granite)


def test_lora_backbone_and_lora_head():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(model, lcfg)
    w, _ = output_weight(pm)
    assert w.requires_grad and not torch.equal(w, model.lm_head.base_layer.weight)
    _check_equal(pm)


def test_modules_to_save_head():
    peft = pytest.importorskip("peft")
    model = _model("qwen2")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                    modules_to_save=["lm_head"]))
    with torch.no_grad():  # the trained copy differs from the original head
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    _check_equal(pm)


def test_default_labels_and_shape_error():
    model = _model("llama")
    ids, mask, _ = _batch()
    out = cpo_fast.causal_lm_token_logprobs(model, ids, attention_mask=mask)
    assert out[1, 5:].abs().sum() == 0 and out[1, :5].abs().sum() > 0
    with pytest.raises(ValueError, match="labels has shape"):
        cpo_fast.causal_lm_token_logprobs(model, ids, ids[:, 1:])


def test_token_ids_outside_the_vocabulary():
    import transformers as tf

    import cpo_fast

    cfg = tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"token id 40, outside the model's vocabulary \[0, 32\)"):
        cpo_fast.causal_lm_token_logprobs(model, torch.tensor([[1, 2, 40]]))
    with pytest.raises(ValueError, match="token id -3"):
        cpo_fast.causal_lm_token_logprobs(model, torch.tensor([[1, -3, 4]]))


@pytest.mark.parametrize("multiple", [1, 16])
def test_collate_writes_the_batch_dictionary(multiple):
    """Right padding, unshifted HF labels scored from each row's ``score_start`` to its end,
    T rounded up to the multiple, the known per-row values indexed by ``indices``."""
    from types import SimpleNamespace

    enc = SimpleNamespace(input_ids=[[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 9, 9, 9, 9, 2]],
                          score_start=[3, 1, 2])
    y, lp = np.array([4.0, 1.0, 2.5]), np.array([-1.0, -2.0, -3.0])
    b = collate(enc, [2, 0], pad_id=0, outcomes=y, log_propensity=lp, pad_to_multiple=multiple)
    ids, lab, am = b["input_ids"], b["labels"], b["attention_mask"]
    B, T = ids.shape
    assert (B, T) == (2, 7 if multiple == 1 else 16) and lab.shape == am.shape == (B, T)
    for row, i in enumerate([2, 0]):
        r, s = enc.input_ids[i], enc.score_start[i]
        L, pos = len(r), torch.arange(T)
        assert ids[row, :L].tolist() == r and (ids[row, L:] == 0).all() and am[row].sum() == L
        scored = lab[row] != IGNORE_INDEX
        assert torch.equal(scored, (pos >= s) & (pos < L))  # never position 0
        assert torch.equal(lab[row][scored], ids[row][scored])
    assert b["outcome"].dtype == torch.float32 and b["outcome"].tolist() == [2.5, 4.0]
    assert b["ref_logp"].tolist() == [-3.0, -1.0] and b["index"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="empty batch"):
        collate(enc, [], pad_id=0)
