"""The end-to-end paths (cpo_fast/bench/e2e.py) on a tiny model: ``build_model``'s shape rules
(heads of 64 dims, even head size, GQA 4:1, MLP 3.5 d / 5.25 d, untied head, dtype) against a
brute-force count, its LoRA / full trainable sets and its argument errors; ``make_batch``'s
prompt masking; each CPU path's per-token log-probs (``token_logprobs_fn``) against a float64
log-softmax of the model's logits; and ``train_step_fn``'s loss, update and ``init_state``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from cpo_fast.bench import e2e  # noqa: E402
from cpo_fast.constants import IGNORE_INDEX  # noqa: E402

V = 96


def _heads(hidden):
    """Independent: the most heads of >= 64 dims (at least 1) with an even head size, and the
    most KV heads <= heads / 4 (at least 1) dividing them."""
    heads = max(h for h in range(1, max(1, hidden // 64) + 1)
                if hidden % h == 0 and (hidden // h) % 2 == 0)
    kv = max(k for k in range(1, max(1, heads // 4) + 1) if heads % k == 0)
    return heads, kv


def _ref_logprobs(model, ids, mask, labels):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    y = labels[:, 1:].clamp(min=0)
    return logits[:, :-1].log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def test_constants_consistent():
    from cpo_fast.bench.arguments import DTYPE_NAMES

    assert set(e2e.DTYPES) == set(DTYPE_NAMES)
    assert e2e.DTYPES["bf16"] is torch.bfloat16 and e2e.DTYPES["fp32"] is torch.float32
    assert set(e2e.GPU_ONLY) <= set(e2e.PATHS)
    assert {"eager", "cpo_fast", "trl-fused-head", "compile"} <= set(e2e.PATHS)


@pytest.mark.parametrize("hidden", [64, 130, 192, 704, 768])
def test_build_model_shape_rules(hidden):
    model = e2e.build_model("llama", V, hidden, 1, "full", "eager", torch.float32, "cpu")
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == _heads(hidden)
    assert cfg.hidden_size == hidden and cfg.vocab_size == V and cfg.num_hidden_layers == 1
    assert cfg.intermediate_size == int(3.5 * hidden)


def test_build_model_qwen2_bf16_lora():
    model = e2e.build_model("qwen2", V, 128, 2, "lora", "eager", torch.bfloat16, "cpu")
    base = model.get_base_model()
    cfg = base.config
    assert cfg.model_type == "qwen2" and cfg.intermediate_size == int(5.25 * 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)
    assert not cfg.tie_word_embeddings
    assert base.lm_head.weight.data_ptr() != base.get_input_embeddings().weight.data_ptr()
    # the model in the dtype asked for (peft keeps its adapters in fp32)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r=16 on every projection of every layer: q k v o gate up down, A and B
    assert len(trainable) == 2 * 7 * 2
    a = [p for n, p in model.named_parameters() if ".q_proj.lora_A." in n][0]
    assert a.shape == (16, 128)
    assert not base.lm_head.weight.requires_grad
    assert model.training


def test_build_model_full_trains_everything_and_is_seeded():
    m1 = e2e.build_model("llama", V, 64, 1, "full", "eager", torch.float32, "cpu")
    m2 = e2e.build_model("llama", V, 64, 1, "full", "eager", torch.float32, "cpu")
    m3 = e2e.build_model("llama", V, 64, 1, "full", "eager", torch.float32, "cpu", seed=3)
    assert all(p.requires_grad for p in m1.parameters()) and m1.training
    w = lambda m: m.lm_head.weight
    assert torch.equal(w(m1), w(m2)) and not torch.equal(w(m1), w(m3))


@pytest.mark.parametrize("kw, needle", [
    (dict(family="gpt2"), "family must be 'llama' or 'qwen2', got 'gpt2'"),
    (dict(finetune="qlora"), "finetune must be 'lora' or 'full', got 'qlora'"),
    (dict(hidden=65), "--hidden must be even for a rotary-attention model, got 65"),
])
def test_build_model_rejects(kw, needle):
    args = dict(family="llama", vocab=V, hidden=64, layers=1, finetune="full", path="eager",
                dtype=torch.float32, device="cpu") | kw
    with pytest.raises(ValueError) as e:
        e2e.build_model(**args)
    assert needle in str(e.value)


def test_make_batch():
    ids, mask, labels = e2e.make_batch(3, 10, 50, "cpu")
    assert ids.shape == mask.shape == labels.shape == (3, 10)
    assert ids.dtype == torch.long and ids.min() >= 0 and ids.max() < 50
    assert torch.equal(mask, torch.ones(3, 10, dtype=ids.dtype))
    assert (labels[:, :2] == IGNORE_INDEX).all()  # the first quarter (10 // 4 = 2): the prompt
    assert torch.equal(labels[:, 2:], ids[:, 2:])
    again = e2e.make_batch(3, 10, 50, "cpu")[0]
    other = e2e.make_batch(3, 10, 50, "cpu", seed=2)[0]
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_logsoftmax_gather_against_float64():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 7, generator=g) * 4).to(torch.bfloat16)
    y = torch.randint(0, 7, (2, 5), generator=g)
    got = e2e.logsoftmax_gather(logits, y)
    x = logits.double()
    want = torch.stack([torch.stack([x[b, t, y[b, t]] - torch.logsumexp(x[b, t], 0)
                                     for t in range(5)]) for b in range(2)])
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["eager", "cpo_fast", "trl-selective", "trl-fused-head"])
def test_path_logprobs_match_the_model(path):
    if path.startswith("trl"):
        pytest.importorskip("trl")
    model = e2e.build_model("llama", V, 64, 1, "full", path, torch.float32, "cpu")
    ids, mask, labels = e2e.make_batch(2, 12, V, "cpu")
    lp = e2e.token_logprobs_fn(path, model)(ids, mask, labels)
    assert lp.shape == (2, 11)
    keep = labels[:, 1:] != IGNORE_INDEX
    ref = _ref_logprobs(model, ids, mask, labels)
    torch.testing.assert_close(lp.double()[keep], ref[keep], atol=1e-4, rtol=1e-4)


def test_unknown_path_lists_the_paths():
    with pytest.raises(ValueError) as e:
        e2e.token_logprobs_fn("nope", None)
    msg = str(e.value)
    assert msg.startswith("unknown path 'nope'; one of ") and all(p in msg for p in e2e.PATHS)


def test_train_step_loss_update_and_init_state():
    model = e2e.build_model("llama", V, 64, 1, "full", "cpo_fast", torch.float32, "cpu")
    ids, mask, labels = e2e.make_batch(2, 12, V, "cpu")
    keep = labels[:, 1:] != IGNORE_INDEX
    want = -(_ref_logprobs(model, ids, mask, labels)[keep]).mean()
    step = e2e.train_step_fn(model, "cpo_fast", ids, mask, labels)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step.init_state()  # optimizer state only: lr 0 on zero gradients
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    loss = step()
    assert loss.requires_grad is False and loss.ndim == 0
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # AdamW moved every trained parameter
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
