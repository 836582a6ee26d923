"""The Trainer drop-in: a tiny Llama trained two steps by transformers.Trainer with the
DR-CPO loss, and the loss value equals the functional route on materialized logits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _dist import leave_process_group, spawn_ranks

import cpo_fast
from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.hf import DRCPOTrainerMixin, drcpo_compute_loss
from cpo_fast.pipeline.stages.modeling import build_model

transformers = pytest.importorskip("transformers")


def _batch(n=8, T=10, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "outcome": torch.randn(n, generator=g), "outcome_pred": torch.randn(n, generator=g) * 0.1,
            "ref_token_logp": -torch.rand(n, T - 1, generator=g) * 4}


def test_compute_loss_matches_materialized_logits():
    torch.manual_seed(0)
    model = build_model("llama", 50, hidden_size=32, num_layers=1, num_heads=2, max_positions=16)
    b = _batch()
    loss = drcpo_compute_loss(model, b, weighting="self_normalized")
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lab = b["labels"][:, 1:]
    lp = cpo_fast.reference.token_logprobs(logits[:, :-1].double(), lab)
    m = lab != IGNORE_INDEX
    seq = cpo_fast.sequence_logprobs(lp, m)
    ref = cpo_fast.sequence_logprobs(b["ref_token_logp"].double(), m)
    expect = cpo_fast.dr_cpo_loss(seq, ref, b["outcome"].double(), b["outcome_pred"].double()).loss
    torch.testing.assert_close(loss.double(), expect, atol=1e-4, rtol=1e-4)
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        drcpo_compute_loss(model, {"input_ids": b["input_ids"], "labels": b["labels"]})


def test_trainer_runs_with_the_mixin(tmp_path):
    from transformers import Trainer, TrainingArguments

    class DRCPOTrainer(DRCPOTrainerMixin, Trainer):
        cpo_loss_kwargs = {"weighting": "self_normalized"}

    torch.manual_seed(0)
    model = build_model("llama", 50, hidden_size=32, num_layers=1, num_heads=2, max_positions=16)
    b = _batch(n=16)
    rows = [{k: v[i] for k, v in b.items()} for i in range(16)]
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True,
                             remove_unused_columns=False, save_strategy="no", logging_steps=1)
    trainer = DRCPOTrainer(model=model, args=args, train_dataset=rows,
                           data_collator=lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]})
    trainer.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert 1.0 <= trainer._cpo_last["ess"] <= 8.0


# ------------------------------------------------------- gradient accumulation (issue 13)

def _train_params(tmp_path, mixin: bool, per_device: int, accum: int, weighting: str, steps=2,
                  world=1):
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    class T(DRCPOTrainerMixin, Trainer):
        cpo_loss_kwargs = {"weighting": weighting, "clip_eps": 0.05}

        def _get_train_sampler(self, *a, **k):  # the same row order for every split
            return SequentialSampler(self.train_dataset)

    class PerMicroBatch(Trainer):  # the naive loss: each micro-batch normalized on its own
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return drcpo_compute_loss(model, inputs, weighting=weighting, clip_eps=0.05)

    torch.manual_seed(0)
    model = build_model("llama", 50, hidden_size=32, num_layers=1, num_heads=2, max_positions=16)
    n = per_device * accum * world * steps
    b = _batch(n=n, seed=1)
    b["ref_token_logp"] = b["ref_token_logp"] * 0 - 3.0  # P^R near the policy: weights vary
    rows = [{k: v[i] for k, v in b.items()} for i in range(n)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accum, max_steps=steps,
                             learning_rate=1e-2, report_to=[], use_cpu=True, max_grad_norm=0.0,
                             remove_unused_columns=False, save_strategy="no", logging_steps=1)
    trainer = (T if mixin else PerMicroBatch)(
        model=model, args=args, train_dataset=rows,
        data_collator=lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]})
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


@pytest.mark.parametrize("weighting", ["self_normalized", "clipped"])
def test_trainer_gradient_accumulation_equals_one_big_batch(tmp_path, weighting, monkeypatch):
    """gradient_accumulation_steps=4 x per_device 2 == per_device 8 (fp32, 2 AdamW steps: max
    |parameter difference| < 1e-5, lr 1e-2); the per-micro-batch loss differs by far more.
    The head is trained: pass 2 forms its gradient in the forward (no recompute warning)."""
    import warnings

    from cpo_fast.ops import linear_token_logprobs_known as known

    calls = []
    real = known.forward_with_grads
    monkeypatch.setattr(known, "forward_with_grads", lambda *a: calls.append(1) or real(*a))
    big, tb = _train_params(tmp_path / "big", True, 8, 1, weighting)
    calls.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*recomputing it exactly")
        acc, ta = _train_params(tmp_path / "acc", True, 2, 4, weighting)
    assert len(calls) == 2 * 4  # pass 2 of every micro-batch of both steps
    naive, _ = _train_params(tmp_path / "naive", False, 2, 4, weighting)
    diff = max(float((big[k] - acc[k]).abs().max()) for k in big)
    off = max(float((big[k] - naive[k]).abs().max()) for k in big)
    print(f"Trainer GA {weighting}: max |acc - big| {diff:.3g}, per-micro-batch loss {off:.3g}")
    assert diff < 1e-5 and off > 100 * diff
    assert ta._cpo_last["ess"] == pytest.approx(tb._cpo_last["ess"], rel=1e-4)  # effective batch's
    logged = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (ta, tb)]
    assert logged[0] == pytest.approx(logged[1], rel=1e-4)


def _ddp_worker(rank: int, world: int, port: int, out: str, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    params, trainer = _train_params(Path(out) / str(rank), True, 2, 2, "self_normalized",
                                    world=world)
    assert trainer.args.world_size == world and trainer.accelerator.num_processes == world
    q.put((rank, {k: v.numpy() for k, v in params.items()}))  # no shared memory
    leave_process_group()


def test_trainer_ddp_with_accumulation_equals_one_big_batch(tmp_path):
    """2 gloo ranks (Trainer's own DDP) x per_device 2 x GA 2 == per_device 8 on one process."""
    got = spawn_ranks(_ddp_worker, 2, str(tmp_path))
    big, _ = _train_params(tmp_path / "big", True, 8, 1, "self_normalized")
    for rank in (0, 1):
        diff = max(float((big[k] - torch.from_numpy(got[rank][k])).abs().max()) for k in big)
        print(f"Trainer DDP rank {rank}: max |2 ranks - 1 process| {diff:.3g}")
        assert diff < 1e-5


def test_trainer_logs_carry_the_weight_diagnostics(tmp_path):
    """Issue 17 item 5: ESS, DM ESS, max weight share and clip fraction reach Trainer's log
    lines (so every report_to backend), each the mean over the steps since the last line."""
    from transformers import TrainerCallback

    seen: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs or {}))

    _, trainer = _train_params(tmp_path, True, 4, 2, "clipped", steps=2)  # logging_steps=1
    lines = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert len(lines) == 2
    for key in ("ess", "dm_ess", "max_weight_share", "dm_max_weight_share", "clip_fraction"):
        assert all(key in h for h in lines), key
    assert lines[-1]["ess"] == pytest.approx(trainer._cpo_last["ess"])
    assert 1.0 <= lines[0]["ess"] <= 8.0 and 0.0 <= lines[0]["clip_fraction"] <= 1.0
    trainer.add_callback(Keep())  # the same lines go to the callbacks (report_to's route)
    trainer._cpo_record({"ess": 2.0})
    trainer._cpo_record({"ess": 4.0})
    trainer.log({"loss": 0.5})
    assert seen[-1]["ess"] == 3.0 and seen[-1]["loss"] == 0.5
