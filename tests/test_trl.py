"""``cpo_fast.trl.DRCPOTrainer`` (issue 22): a TRL-style trainer that runs the CLI's stages
and step. A tiny Llama built from a config, a synthetic corpus, offline, on the CPU.

- the trainer's parameters after K steps equal ``cpo-fast train``'s (prepare ->
  train_policy) for the same data, seed and settings, for each of the five methods;
- the step metrics (loss, ESS, DM ESS, max weight share, clip fraction, ESS guard, ghat's
  out-of-fold R^2) land in a TensorBoard event file; evaluate() reports the off-policy
  estimates; save_model writes safetensors; resume_from_checkpoint continues exactly;
- a dataset without the outcome column, or with non-numeric outcomes, is refused naming it;
- 2 gloo ranks x gradient accumulation 2 == one process with the same effective batch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch
from _dist import leave_process_group, spawn_ranks

pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from cpo_fast.pipeline.run.config import RunConfig  # noqa: E402
from cpo_fast.pipeline.stages.data import DataConfig, load_table  # noqa: E402

K = 3  # optimizer steps
TOL = 1e-5  # max |parameter difference| after K AdamW steps at lr 1e-2 (fp32)
SHARED = dict(eval_fraction=0.2, outcome_folds=3, dm_size=16, f0_steps=2, f0_batch_size=16,
              top_quantile=0.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus CSV, a tokenizer and a tiny Llama (saved as a CLI user would have them)."""
    from cpo_fast.pipeline.stages.modeling import build_model
    from cpo_fast.pipeline.stages.policy import save_model
    from cpo_fast.pipeline.stages.synthetic import make_corpus, write_corpus
    from cpo_fast.pipeline.stages.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("trl")
    table = make_corpus(60, seed=1)
    write_corpus(table, d / "corpus.csv")
    tok = train_tokenizer(table.texts, 200)
    tok.save_pretrained(d / "tok")
    model = build_model("llama", len(tok), hidden_size=32, num_layers=1, num_heads=2,
                        max_positions=48, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, seed=0)
    save_model(model, tok, d / "model")
    rows = load_table(DataConfig(path=str(d / "corpus.csv")))
    ds = datasets.Dataset.from_dict({"text": rows.texts, "outcome": rows.outcomes.tolist()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: 2 OpenMP threads on a loaded 2-core box are 10x slower
    yield d, ds
    torch.set_num_threads(threads)


def _model(d: Path):
    from cpo_fast.pipeline.stages.policy import load_causal_lm

    return load_causal_lm(d / "model", torch.device("cpu"))


def _lora(model):
    from peft import LoraConfig

    from cpo_fast.pipeline.stages.policy import lora_targets

    return LoraConfig(r=4, lora_alpha=16.0, lora_dropout=0.0, target_modules=lora_targets(model),
                      task_type="CAUSAL_LM")


def _trainer(d: Path, ds, out: Path, method: str = "dr_cpo", *, lora: bool = True, model=None,
             **kw):
    from transformers import AutoTokenizer

    from cpo_fast.trl import DRCPOConfig, DRCPOTrainer

    settings = dict(output_dir=str(out), stages_dir=str(d / "stages"), method=method,
                    max_steps=K, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    learning_rate=1e-2, warmup_steps=0, max_length=40, report_to=[],
                    use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                    per_device_eval_batch_size=32, num_samples=8, bootstrap=50,
                    f0_learning_rate=3e-3, **SHARED)
    settings.update(kw)
    model = _model(d) if model is None else model
    return DRCPOTrainer(model=model, args=DRCPOConfig(**settings), train_dataset=ds,
                        processing_class=AutoTokenizer.from_pretrained(d / "tok"),
                        peft_config=_lora(_model(d)) if lora else None)


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def cli_prep(corpus):
    from cpo_fast.pipeline.training.prepare import prepare

    d, _ = corpus
    cfg = RunConfig(data=str(d / "corpus.csv"), output_dir=str(d / "cli"), tokenizer=str(d / "tok"),
                    base_model=str(d / "model"), max_tokens=40, steps=K, batch_size=4, grad_accum=2,
                    dm_batch_size=4, lr=1e-2, warmup_steps=0, lora_r=4, lora_alpha=16.0,
                    progress=False, batch_size_eval=32, save_every=0, f0_lr=3e-3, bf16=False,
                    **SHARED).validate()
    return prepare(cfg, need_dm=True)


CLIPPED = dict(weighting="clipped", clip_eps=0.05)


@pytest.mark.parametrize("method,loss", [
    *[(m, CLIPPED) for m in ("dr_cpo", "cpo", "oo_rlhf", "sft_all", "sft_top")],
    ("dr_cpo", dict(ess_target=0.99))])
def test_trainer_equals_the_cli(corpus, cli_prep, tmp_path, method, loss):
    """Same data, seed and settings: the trainer's LoRA parameters after K steps equal
    `cpo-fast train`'s (f_0 = 2 SFT steps of the model, DM set of f_0's completions)."""
    from cpo_fast.pipeline.training.loop import train_policy

    d, ds = corpus
    cfg = dataclasses.replace(cli_prep.cfg, method=method, **loss)
    t0 = time.perf_counter()
    policy, _ = train_policy(cli_prep, cfg, out_dir=tmp_path / "cli")
    t_cli = time.perf_counter() - t0
    trainer = _trainer(d, ds, tmp_path / "trl", method, **loss)
    t0 = time.perf_counter()
    trainer.train()
    t_trl = time.perf_counter() - t0
    diff = _max_diff(_trained(policy), _trained(trainer.model))
    print(f"{method}: max |trainer - CLI| = {diff:.3g} after {K} steps; train() {t_trl:.2f} s, "
          f"CLI loop {t_cli:.2f} s")
    assert diff < TOL
    moved = _max_diff(_trained(trainer.model), _trained(make_fresh(trainer)))
    assert moved > 100 * TOL  # the steps did move the parameters


def test_given_model_as_f0_equals_the_cli(corpus, tmp_path):
    """f0_steps=0: the model object is f_0 (the CLI's --f0-model on the same weights)."""
    from cpo_fast.pipeline.training.loop import train_policy
    from cpo_fast.pipeline.training.prepare import prepare

    d, ds = corpus
    cfg = RunConfig(data=str(d / "corpus.csv"), output_dir=str(tmp_path / "cli"),
                    tokenizer=str(d / "tok"), f0_model=str(d / "model"), max_tokens=40, steps=K,
                    batch_size=4, grad_accum=2, dm_batch_size=4, lr=1e-2, warmup_steps=0,
                    lora_r=4, lora_alpha=16.0, progress=False, batch_size_eval=32, save_every=0,
                    bf16=False, **{**SHARED, "f0_steps": 0}).validate()
    policy, _ = train_policy(prepare(cfg), cfg)
    given = _model(d)
    trainer = _trainer(d, ds, tmp_path / "trl", model=given, f0_steps=0)
    trainer.train()
    assert not any(p.requires_grad for p in given.parameters())  # f_0 stays as it was given
    diff = _max_diff(_trained(policy), _trained(trainer.model))
    print(f"f_0 given: max |trainer - CLI| = {diff:.3g}")
    assert diff < TOL


def make_fresh(trainer):
    from cpo_fast.trl import make_trainable

    return make_trainable(trainer.prepared.load_f0(), trainer.model.peft_config["default"],
                          trainer.cfg.seed)


def test_metrics_reach_tensorboard_and_evaluate(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, ds = corpus
    trainer = _trainer(d, ds, tmp_path / "tb", report_to=["tensorboard"])  # <output_dir>/runs/
    trainer.train()
    metrics = trainer.evaluate()
    for k in ("eval_dr", "eval_dr_lo", "eval_snips", "eval_ipw", "eval_ess", "eval_dm"):
        assert k in metrics, k
    other = trainer.evaluate(eval_dataset=ds.select(range(10)), metric_key_prefix="other")
    assert other["other_n"] == 10 and "other_dr" in other
    files = list((tmp_path / "tb").rglob("events.out.tfevents*"))
    assert files
    tags = set()
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/ess", "train/dm_ess", "train/max_weight_share",
                "train/clip_fraction", "train/ess_guard_fired", "train/ghat_oof_r2", "eval/dr"):
        assert tag in tags, (tag, sorted(tags))
    r2 = [h["ghat_oof_r2"] for h in trainer.state.log_history if "ghat_oof_r2" in h]
    assert r2 and r2[0] == pytest.approx(trainer.prepared.outcome_fit.r2)


def test_ess_guard_state_is_logged_and_can_stop(corpus, tmp_path):
    """The CLI's ESS guard runs on the trainer's steps: its state is logged, and with
    stop_on_collapse it ends training at the step it fires (threshold 0.99)."""
    from cpo_fast.pipeline.training.guard import WeightCollapseWarning

    d, ds = corpus
    trainer = _trainer(d, ds, tmp_path, ess_guard=0.99, stop_on_collapse=True, max_steps=4)
    with pytest.warns(WeightCollapseWarning):
        trainer.train()
    lines = [h for h in trainer.state.log_history if "ess_guard_fired" in h]
    fired = [h["step"] for h in lines if h["ess_guard_fired"]]
    assert fired and trainer.state.global_step == fired[0] < 4  # stopped where it fired
    assert min(v for k, v in lines[-1].items() if k.startswith("ess_guard_min_")) < 0.99


def test_save_model_and_resume(corpus, tmp_path):
    """save_model writes safetensors (adapter; full model without peft); resuming from the
    step-2 checkpoint ends where the uninterrupted run ends."""
    d, ds = corpus
    full = _trainer(d, ds, tmp_path / "a", save_strategy="steps", save_steps=2)
    full.train()
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed = _trainer(d, ds, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == K
    assert _max_diff(_trained(full.model), _trained(resumed.model)) < 1e-6
    resumed.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    plain = _trainer(d, ds, tmp_path / "c", "cpo", lora=False, max_steps=1,
                     model=str(d / "model"))  # a model directory works as model=
    plain.train()
    plain.save_model(str(tmp_path / "full"))
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_dataset_errors_name_the_column(corpus, tmp_path):
    d, ds = corpus
    with pytest.raises(ValueError, match=r"no column 'outcome' \(DRCPOConfig.outcome_column\)"):
        _trainer(d, ds.remove_columns("outcome"), tmp_path)
    bad = ds.map(lambda r, i: {"outcome": "high" if i == 3 else str(r["outcome"])},
                 with_indices=True)
    with pytest.raises(ValueError, match=r"row 4, column 'outcome': 'high' is not a number"):
        _trainer(d, bad, tmp_path)
    with pytest.raises(ValueError, match="DRCPOConfig.method='dpo'"):
        _trainer(d, ds, tmp_path, "dpo")


def test_prompt_completion_columns(corpus):
    """TRL's prompt-completion format: the completion is the scored response."""
    from cpo_fast.trl import DRCPOConfig, dataset_table

    ds = datasets.Dataset.from_dict({"prompt": ["Say:", "Tell:"], "completion": ["a b", "c"],
                                     "outcome": [1, 2.5]})
    t = dataset_table(ds, DRCPOConfig(output_dir="unused", use_cpu=True))
    assert t.texts == ["a b", "c"] and t.prompts == ["Say:", "Tell:"]
    assert t.outcomes.tolist() == [1.0, 2.5]
    with pytest.raises(ValueError, match=r"row 2, column 'outcome': missing value"):
        dataset_table(ds.map(lambda r, i: {"outcome": None if i else 1.0}, with_indices=True),
                      DRCPOConfig(output_dir="unused", use_cpu=True))


def _ddp_worker(rank: int, world: int, port: int, payload, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    d, ds, out = payload
    trainer = _trainer(d, ds, out, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert trainer.args.world_size == world
    trainer.train()
    q.put((rank, {k: v.numpy() for k, v in _trained(trainer.model).items()}))  # no shared memory
    leave_process_group()


@pytest.mark.slow  # two spawned processes: about 25 s on 2 cores
def test_two_ranks_with_accumulation_equal_one_process(corpus, tmp_path):
    """2 gloo ranks x per_device 2 x accumulation 2 == one process with per_device 8."""
    d, ds = corpus
    one = _trainer(d, ds, tmp_path / "one", per_device_train_batch_size=8,
                   gradient_accumulation_steps=1)
    one.train()
    got = spawn_ranks(_ddp_worker, 2, (d, ds, tmp_path / "ddp"))
    for rank in (0, 1):
        diff = _max_diff(_trained(one.model), {k: torch.from_numpy(v) for k, v in got[rank].items()})
        print(f"DRCPOTrainer 2 ranks x GA 2, rank {rank}: max |2 ranks - 1 process| {diff:.3g}")
        assert diff < TOL
