"""cpo_fast as TRL's engine (cpo_fast.integrations.trl): same values and gradients as TRL's
own helpers and fused LM head, and the same training steps in SFT, DPO and GRPO trainers."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import trl.trainer.utils as trl_utils  # noqa: E402

import cpo_fast.integrations.trl as cpo_trl  # noqa: E402

TRL_SLS = trl_utils.selective_log_softmax
TRL_ENT = trl_utils.entropy_from_logits
TRL_BOTH = trl_utils.selective_log_softmax_and_entropy
TRL_CHUNKED = trl_utils._ChunkedLogProbFunction


@pytest.fixture(autouse=True)
def _restore():
    yield
    cpo_trl.remove()


def _reference(hidden, weight, bias, targets, temperature, softcap, scale):
    """float64 log-probs and entropies of the transformed logits."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z / temperature, -1)
    return lp.gather(-1, targets[:, None])[:, 0], -(lp.exp() * lp).sum(-1)


def test_apply_remove_swaps_every_importer_and_restores():
    import trl.trainer.grpo_trainer as grpo  # imports add_fused_lm_head etc. by name
    cpo_trl.apply()
    assert trl_utils.selective_log_softmax is cpo_trl.selective_log_softmax
    assert trl_utils._ChunkedLogProbFunction is cpo_trl.ChunkedLogProbFunction
    # a TRL module that imported a helper by name got ours too
    importers = [m for m in sys.modules.values()
                 if getattr(m, "__name__", "").startswith("trl.")
                 and getattr(m, "selective_log_softmax", None) is not None]
    assert all(m.selective_log_softmax is cpo_trl.selective_log_softmax for m in importers)
    cpo_trl.apply()  # idempotent
    cpo_trl.remove()
    assert trl_utils.selective_log_softmax is TRL_SLS
    assert trl_utils.entropy_from_logits is TRL_ENT
    assert trl_utils.selective_log_softmax_and_entropy is TRL_BOTH
    assert trl_utils._ChunkedLogProbFunction is TRL_CHUNKED
    assert all(m.selective_log_softmax is TRL_SLS for m in importers)
    assert grpo.add_fused_lm_head is trl_utils.add_fused_lm_head
    with cpo_trl.enabled():
        assert cpo_trl.is_applied()
    assert not cpo_trl.is_applied() and trl_utils.selective_log_softmax is TRL_SLS


def test_module_imported_after_apply_is_restored():
    cpo_trl.apply()
    name = "trl.experimental.sdft.loss_utils"
    sys.modules.pop(name, None)
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # optional deps of an experimental module
        pytest.skip(f"{name} does not import here: {exc}")
    assert mod.selective_log_softmax is cpo_trl.selective_log_softmax
    cpo_trl.remove()
    assert mod.selective_log_softmax is TRL_SLS


def test_old_trl_is_refused(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(RuntimeError, match=r"TRL >= 1\.16.*1\.15\.2"):
        cpo_trl.apply()
    monkeypatch.setattr(trl, "__version__", "1.16.0")
    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(RuntimeError, match="_ChunkedLogProbFunction"):
        cpo_trl.apply()
    assert not cpo_trl.is_applied()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_helpers_match_trl(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 97, generator=g) * 3).to(dtype)
    index = torch.randint(0, 97, (3, 5), generator=g)
    row_mask = torch.rand(3, 5, generator=g) > 0.3
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    want = TRL_SLS(logits.float(), index, temperature, row_mask)
    a = logits.clone().requires_grad_()
    cpo_trl.apply()
    got = trl_utils.selective_log_softmax(a, index, temperature, row_mask)
    torch.testing.assert_close(got.float(), want, **tol)
    lp, ent = trl_utils.selective_log_softmax_and_entropy(a, index, True, temperature, row_mask)
    want_lp, want_ent = TRL_BOTH(logits.float(), index, True, temperature, row_mask)
    torch.testing.assert_close(lp.float(), want_lp, **tol)
    torch.testing.assert_close(ent.float(), want_ent, **tol)
    torch.testing.assert_close(trl_utils.entropy_from_logits(logits).float(),
                               TRL_ENT(logits.float()), **tol)
    # gradients against TRL's (in fp32: its half-precision fallback rounds the logits)
    b = logits.float().clone().requires_grad_()
    (got.float() * torch.arange(15.).view(3, 5)).sum().backward()
    (TRL_SLS(b, index, temperature, row_mask) * torch.arange(15.).view(3, 5)).sum().backward()
    torch.testing.assert_close(a.grad.float(), b.grad, **tol)


def test_top_k_index_falls_back_to_trl():
    logits = torch.randn(2, 4, 11)
    index = torch.randint(0, 11, (2, 4, 3))
    cpo_trl.apply()
    torch.testing.assert_close(trl_utils.selective_log_softmax(logits, index),
                               TRL_SLS(logits, index))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,softcap,scale", [(1.0, None, 1.0), (0.7, None, 1.0),
                                                       (1.0, 3.0, 1.0), (0.9, 2.5, 0.5)])
def test_fused_head_engine_matches_trl(dtype, temperature, softcap, scale):
    """Values and gradients of the engine behind add_fused_lm_head, against TRL's own, with
    temperature, Gemma's softcap and a logit scale; in bf16 ours is no farther from the float64
    truth than TRL's (plus a little)."""
    g = torch.Generator().manual_seed(1)
    N, d, V = 37, 24, 211
    hidden = (torch.randn(N, d, generator=g)).to(dtype)
    weight = (torch.randn(V, d, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    args = (targets, temperature, 64, softcap, scale, outputs)

    def run(engine):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        out = engine.apply(h, w, b, *args)
        (out[0].float() * torch.linspace(-1, 1, N)).sum().add(out[1].float().sum()).backward()
        return out, (h.grad, w.grad, b.grad)

    ours, ours_g = run(cpo_trl.ChunkedLogProbFunction)
    theirs, theirs_g = run(TRL_CHUNKED)
    lp64, ent64 = _reference(hidden, weight, bias, targets, temperature, softcap, scale)
    if dtype == torch.float32:
        for a, b in zip(ours[:2] + ours_g, theirs[:2] + theirs_g, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-4, rtol=2e-4)
    else:
        for got, truth, trl_val in ((ours[0], lp64, theirs[0]), (ours[1], ent64, theirs[1])):
            err_ours = (got.double() - truth).abs().max()
            err_trl = (trl_val.double() - truth).abs().max()
            assert err_ours <= err_trl * 1.5 + 1e-2, (err_ours, err_trl)
        for a, b in zip(ours_g, theirs_g, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
    # the fields TRL's kernel provides are TRL's own values
    for a, b in zip(ours[2:], theirs[2:], strict=True):
        torch.testing.assert_close(a, b)
    assert ours[2].grad_fn is None and ours[3].grad_fn is None


# ---------------------------------------------------------------- trainer steps


def _tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpo_fast.pipeline.stages.tokenizer import train_tokenizer

    texts = [f"the cat number {i} sat on the mat and it was {'good' if i % 2 else 'bad'}"
             for i in range(32)]
    tok = train_tokenizer(texts, vocab_size=300)
    tok.eos_token, tok.pad_token = "<eos>", "<pad>"
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    return texts, tok, LlamaForCausalLM(cfg)


def _common(tmp_path, **kw):
    # TRL turns bf16 autocast on by default; the test picks (tmp_path's name says which)
    bf16 = tmp_path.name.endswith("bf16")
    return dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                learning_rate=1e-2, bf16=bf16, **kw)


def _sft(tmp_path):
    from trl import SFTConfig, SFTTrainer
    texts, tok, model = _tiny()
    ds = datasets.Dataset.from_dict({"text": texts})
    return SFTTrainer(model=model, args=SFTConfig(**_common(tmp_path, max_length=32)),
                      train_dataset=ds, processing_class=tok)


def _dpo(tmp_path):
    from trl import DPOConfig, DPOTrainer
    texts, tok, model = _tiny()
    ds = datasets.Dataset.from_dict({"prompt": [t[:12] for t in texts],
                                     "chosen": [t[12:] for t in texts],
                                     "rejected": [t[12:][::-1] for t in texts]})
    return DPOTrainer(model=model, ref_model=copy.deepcopy(model), train_dataset=ds,
                      args=DPOConfig(**_common(tmp_path, max_length=48)), processing_class=tok)


def _grpo(tmp_path):
    from trl import GRPOConfig, GRPOTrainer
    texts, tok, model = _tiny()
    ds = datasets.Dataset.from_dict({"prompt": [t[:12] for t in texts]})

    def reward(completions, **_kw):  # longer, more varied completions score higher
        return [len(set(c)) / 10.0 for c in completions]

    args = GRPOConfig(**_common(tmp_path, num_generations=4, max_completion_length=8,
                                temperature=0.8))
    return GRPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                       reward_funcs=reward)


_KEYS = ("loss", "grad_norm", "entropy", "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("make", [_sft, _dpo, _grpo], ids=["sft", "dpo", "grpo"])
def test_trainer_steps_match(make, precision, tmp_path, monkeypatch):
    """Two optimizer steps with and without apply(): the same logged losses, gradient norms
    and final parameters in fp32; under bf16 autocast (TRL's default) both engines round the
    logits to bf16, so the first step's loss and gradient norm agree to bf16's precision (the
    parameters after Adam's sign-like first step are not compared there). And the cpo_fast
    engine really ran (calls counted)."""
    base = make(tmp_path / f"trl-{precision}")
    base.train()
    calls = []
    real = cpo_trl.ChunkedLogProbFunction.apply
    monkeypatch.setattr(cpo_trl.ChunkedLogProbFunction, "apply",
                        staticmethod(lambda *a, **k: calls.append(1) or real(*a, **k)))
    with cpo_trl.enabled():
        ours = make(tmp_path / f"cpo-{precision}")
        ours.train()
    assert calls, "the trainer never called cpo_fast's engine"
    if precision == "bf16":
        h0, h1 = base.state.log_history[0], ours.state.log_history[0]
        assert h1["loss"] == pytest.approx(h0["loss"], rel=2e-3, abs=1e-3)
        assert h1["grad_norm"] == pytest.approx(h0["grad_norm"], rel=2e-2)
        return
    for h0, h1 in zip(base.state.log_history[:2], ours.state.log_history[:2], strict=True):
        for k in _KEYS:
            if k in h0:
                assert h1[k] == pytest.approx(h0[k], rel=1e-4, abs=1e-5), k
    for (n, p0), (_, p1) in zip(base.model.named_parameters(), ours.model.named_parameters(),
                                strict=True):
        torch.testing.assert_close(p1, p0, atol=1e-5, rtol=1e-4, msg=n)
