"""The training pipeline (5b) on tiny models: every stage, all five methods, exact resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cpo_fast.pipeline.run.config import METHODS, RunConfig, config_from
from cpo_fast.pipeline.stages.policy import make_policy
from cpo_fast.pipeline.stages.synthetic import make_corpus, oracle, write_corpus
from cpo_fast.pipeline.training.batches import batch_indices
from cpo_fast.pipeline.training.loop import train_data, train_policy
from cpo_fast.pipeline.training.prepare import prepare

TINY = dict(text_column="text", outcome_column="outcome", group_column="group", id_column="id",
            max_tokens=40, vocab_size=200, hidden_size=32, num_layers=1, num_heads=2,
            f0_steps=6, f0_batch_size=16, steps=3, batch_size=8, dm_batch_size=8, dm_size=24,
            num_samples=12, max_new_tokens=12, bootstrap=50, outcome_folds=3, warmup_steps=1,
            save_every=0, progress=False, batch_size_eval=32, eval_fraction=0.2, lora_r=4,
            threads=None)


@pytest.fixture(scope="module")
def corpus_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.csv"
    write_corpus(make_corpus(120, seed=1), path)
    return path


@pytest.fixture(scope="module")
def prep(corpus_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(data=str(corpus_csv), output_dir=str(out), **TINY).validate()
    return prepare(cfg, need_dm=True)


def test_batch_indices_pure_and_epoch_permutations():
    a = [batch_indices(10, 4, k, seed=3) for k in range(5)]
    b = [batch_indices(10, 4, k, seed=3) for k in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    flat = np.concatenate(a)
    assert sorted(flat[:10].tolist()) == list(range(10))  # epoch 0 covers every row once
    assert sorted(flat[10:20].tolist()) == list(range(10))
    assert not np.array_equal(batch_indices(10, 4, 0, seed=4), a[0])


def test_config_yaml_flags_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1e-4\n  method: cpo\ndata:\n  max_tokens: 33\n")
    import argparse

    from cpo_fast.pipeline.run.config import add_config_flags

    p = argparse.ArgumentParser()
    add_config_flags(p)
    cfg = config_from(p.parse_args(["--config", str(y), "--method", "dr_cpo", "--lora", "false"]))
    assert (cfg.lr, cfg.method, cfg.max_tokens, cfg.lora) == (1e-4, "dr_cpo", 33, False)
    y.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        config_from(yaml_path=str(y))
    with pytest.raises(ValueError, match="--method='dr-cpo' is not one of .* Did you mean 'dr_cpo'"):
        config_from(method="dr-cpo")


def test_prepare_stages(prep):
    n = len(prep.train_enc)
    assert len(prep.train_ref) == n and prep.ghat_train.shape == (n,)
    for r, ids, s in zip(prep.train_ref, prep.train_enc.input_ids, prep.train_enc.score_start,
                         strict=True):
        assert r.shape == (len(ids) - 1,) and np.all(r[s - 1:] < 0)  # scored tokens: log p < 0
    assert (prep.out / "f0" / "model" / "config.json").is_file()
    assert (prep.out / "tokenizer" / "tokenizer_config.json").is_file()
    # The DM set: f_0 completions that keep the corpus prefix token by token.
    dm = prep.dm
    assert len(dm) == TINY["dm_size"] and len(prep.dm_ref) == len(dm)
    assert prep.dm_ghat.shape == (len(dm),)
    assert all(ids[0] == prep.tokenizer.bos_token_id and ids[-1] == prep.tokenizer.eos_token_id
               and len(ids) <= TINY["max_tokens"] for ids in dm.encoded.input_ids)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains(prep, method, tmp_path):
    cfg = dataclasses.replace(prep.cfg, method=method)
    policy, summary = train_policy(prep, cfg, out_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and summary["finished"]
    for r in rows:
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0
        if method in ("cpo", "dr_cpo", "oo_rlhf"):
            assert 1.0 <= r["ess"] <= cfg.batch_size + 1e-4
            assert 0 < r["max_weight_share"] <= 1
            assert r["clip_fraction"] in ((None, 0.0) if method == "oo_rlhf" else (0.0,))
        else:
            assert r["ess"] is None
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    # LoRA starts at f_0 (B = 0) and training moved the adapters only.
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)


def test_sft_top_uses_top_quantile_rows(prep):
    d = train_data(prep, "sft_top")
    y = prep.train_table.outcomes
    assert len(d.rows) < len(y) and y[d.rows].min() >= np.quantile(y, prep.cfg.top_quantile) - 1e-9


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,lora", [("dr_cpo", True), ("cpo", False)])
def test_resume_equals_uninterrupted(prep, tmp_path, method, lora):
    cfg = dataclasses.replace(prep.cfg, method=method, lora=lora, steps=5, grad_accum=2,
                              save_every=2, lora_dropout=0.1 if lora else 0.0)
    full, _ = train_policy(prep, cfg, out_dir=tmp_path / "full")
    stopped, s1 = train_policy(prep, dataclasses.replace(cfg, stop_after=3),
                               out_dir=tmp_path / "cut")
    assert s1["steps_done"] == 3 and not s1["finished"]
    torch.manual_seed(12345)  # a resumed process starts from a different global RNG state
    resumed, s2 = train_policy(prep, cfg, out_dir=tmp_path / "cut", resume=True)
    assert s2["steps_done"] == 5 and s2["finished"]
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(b[n], a[n]), n  # bitwise: same batches, same RNG, same ops
    m_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    m_cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in m_cut] == [1, 2, 3, 4, 5]
    assert [json.loads(x)["loss"] for x in m_cut] == pytest.approx(
        [json.loads(x)["loss"] for x in m_full], abs=1e-6)


def test_resume_refuses_other_settings(prep, tmp_path):
    cfg = dataclasses.replace(prep.cfg, method="cpo", steps=2)
    train_policy(prep, cfg, out_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings .*'lr'"):
        train_policy(prep, dataclasses.replace(cfg, lr=0.5), out_dir=tmp_path, resume=True)


def test_log_propensity_column_is_used(corpus_csv, tmp_path):
    import csv

    rows = list(csv.DictReader(corpus_csv.open()))
    path = tmp_path / "lp.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0].keys(), "logp"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "logp": -30.0})
    cfg = RunConfig(data=str(path), output_dir=str(tmp_path / "o"), log_propensity_column="logp",
                    method="cpo", **TINY).validate()
    p = prepare(cfg)
    d = train_data(p, "cpo")
    assert np.all(d.log_propensity == -30.0)
    _, summary = train_policy(p, cfg)
    # With P^R = e^-30 the weights are f_0's own probabilities: far from uniform.
    assert summary["ess"] < cfg.batch_size


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_lora_step(arch, prep, tmp_path):
    from cpo_fast.pipeline.stages.modeling import build_model
    from cpo_fast.pipeline.training.batches import TrainData
    from cpo_fast.pipeline.training.loop import train

    tok = prep.tokenizer
    f0 = build_model(arch, len(tok), hidden_size=32, num_layers=1, num_heads=2, max_positions=64,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, seed=0)
    cfg = dataclasses.replace(prep.cfg, method="cpo", steps=2, gradient_checkpointing=True)
    policy = make_policy(f0, cfg)
    data = TrainData(enc=prep.train_enc, rows=np.arange(len(prep.train_enc)),
                     ref=prep.train_ref, outcomes=prep.train_table.outcomes)
    before = _params(policy)
    summary = train(policy, data, cfg, tmp_path, pad_id=prep.pad_id)
    assert summary["finished"] and np.isfinite(summary["loss"])
    assert any(not torch.equal(before[n], p) for n, p in _params(policy).items())


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


def test_evaluate_and_plots(prep, tmp_path):
    from cpo_fast.pipeline.report.evaluate import evaluate_model, write_eval
    from cpo_fast.pipeline.report.plots import outcome_bars, training_curves, weight_histogram

    res = evaluate_model(prep, prep.load_f0(), name="f_0", scorers={"oracle": oracle})
    for key in ("oracle", "ghat"):
        assert res[key]["lo"] <= res[key]["mean"] <= res[key]["hi"]
    op = res["off_policy"]
    # f_0 against itself: every weight is 1, so IPW = SNIPS = the held-out mean outcome.
    assert op["ess"] == pytest.approx(len(prep.eval_enc), rel=1e-6)
    assert op["ipw"]["estimate"] == pytest.approx(prep.eval_table.outcomes.mean(), rel=1e-5)
    assert "dr" in op and len(res["samples"]) == prep.cfg.num_samples
    write_eval(res, tmp_path / "f0.json")
    assert json.loads((tmp_path / "f0.json").read_text())["name"] == "f_0"
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"step": 1, "loss": 1.0, "ess": 4.0, "batch_rows": 8,
                             "log_weights": [0.0, 0.1, -0.2]}) + "\n")
    for path in (training_curves({"cpo": m}, tmp_path / "a.png"),
                 weight_histogram({"cpo": m}, tmp_path / "b.png"),
                 outcome_bars({"f_0": res, "x": res}, "oracle", tmp_path / "c.png")):
        assert path.stat().st_size > 1000


def test_pins_are_declared_on_the_config_fields():
    """The prepare/resume keys live on the fields (config.py); these are the sets the
    pipeline has always used, so cached stages and checkpoints keep their meaning."""
    from cpo_fast.pipeline.run.config import FIELDS, pinned

    assert set(pinned("prepare")) == {
        "data", "text_column", "prompt_column", "max_rows", "eval_fraction", "seed",
        "max_tokens", "on_too_long", "tokenizer", "vocab_size", "base_model", "f0_model", "arch",
        "hidden_size", "num_layers", "num_heads", "f0_steps", "f0_lr", "f0_batch_size",
        "f0_lora"}  # LoRA or full SFT of f_0 (a pretrained base): it decides the cached f_0
    assert set(pinned("resume")) == {
        "method", "weighting", "steps", "batch_size", "grad_accum", "lr", "weight_decay",
        "warmup_steps", "grad_clip", "lora", "lora_r", "lora_alpha", "lora_dropout",
        "length_normalize", "entropy_coef", "kl_coef", "max_log_weight", "truncation",
        "clip_eps", "top_quantile", "dm_batch_size", "seed", "higher_is_better",
        "log_weight_cap"}  # the remedy changes the loss: pinned like kl_coef
    assert {n for n, f in FIELDS.items() if f.metadata.get("local")} == {
        "stop_after", "progress", "threads", "device", "output_dir"}
