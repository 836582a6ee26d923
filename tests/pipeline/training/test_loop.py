"""Training a policy (cpo_fast/pipeline/training/loop.py) on tiny models: all five methods,
the rows each trains on (pure, epoch-permuting micro-batches; the DM rows a step needs
checked against the DM set), exact resume, other architectures; and exactness over the effective
batch (issue 13): gradient accumulation and ranks change how the batch is split, never the
parameters it trains (up to float rounding).

(a) one process, grad_accum A x batch B == one process, batch A*B;
(b) 2 gloo ranks x B x A == one process, batch 2*A*B (the loop function, spawned);
(c) `torchrun --nproc_per_node=2 -m cpo_fast train`, interrupted by SIGTERM, resumed on 1
    process, then on 2 again (`accelerate launch`) == one uninterrupted process with the same
    effective batch.

Tolerance: parameters after K AdamW steps agree to TOL (fp32; measured differences are in
docs/scale-out.md). Batches of different splits are padded to different lengths, and the
sums run in another order, so bitwise equality is not expected; AdamW's first step moves
every parameter by about lr, so a tolerance far below lr says the runs took the same steps.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist import free_port, spawn_ranks
from conftest import ROOT, TINY_RUN

import cpo_fast
from cpo_fast.pipeline.run.config import METHODS, RunConfig
from cpo_fast.pipeline.stages.data import Encoded
from cpo_fast.pipeline.stages.policy import make_policy
from cpo_fast.pipeline.stages.synthetic import make_corpus, write_corpus
from cpo_fast.pipeline.training import loop
from cpo_fast.pipeline.training.loop import TrainData, batch_indices, train_data, train_policy
from cpo_fast.pipeline.training.prepare import prepare


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
                    method="cpo", **TINY_RUN).validate()
    p = prepare(cfg)
    d = train_data(p, "cpo")
    assert np.all(d.log_propensity == -30.0)
    _, summary = train_policy(p, cfg)
    # With P^R = e^-30 the weights are f_0's own probabilities: far from uniform.
    assert summary["ess"] < cfg.batch_size


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_lora_step(arch, prep, tmp_path):
    from cpo_fast.pipeline.stages.modeling import build_model
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


# ---- exact over the effective batch: (a) accumulation (its own prepared run) --------------

TINY_EXACT = dict(text_column="text", outcome_column="outcome", group_column="group", id_column="id",
                  max_tokens=40, vocab_size=200, hidden_size=32, num_layers=1, num_heads=2,
                  f0_steps=6, f0_batch_size=16, dm_size=24, outcome_folds=3, warmup_steps=0,
                  save_every=0, progress=False, batch_size_eval=32, eval_fraction=0.2, lora_r=4,
                  lr=1e-2, grad_clip=0.0, threads=1)
A, B, K = 2, 4, 3  # accumulation, micro-batch rows, optimizer steps
TOL = 2e-5  # max |parameter difference| after K steps (lr = 1e-2)
CASES = [(m, w) for m in ("cpo", "dr_cpo") for w in ("self_normalized", "clipped")]


@pytest.fixture(scope="module")
def exact_prep(tmp_path_factory):
    from cpo_fast.pipeline.training.prepare import prepare

    d = tmp_path_factory.mktemp("dist")
    write_corpus(make_corpus(120, seed=1), d / "corpus.csv")
    cfg = RunConfig(data=str(d / "corpus.csv"), output_dir=str(d / "run"), **TINY_EXACT).validate()
    threads = torch.get_num_threads()
    yield prepare(cfg, need_dm=True)
    torch.set_num_threads(threads)


def _config(prep, method: str, weighting: str, *, world: int = 1, accum: int = A,
            rows: int = B) -> RunConfig:
    return dataclasses.replace(prep.cfg, method=method, weighting=weighting, steps=K,
                               batch_size=rows, dm_batch_size=rows, grad_accum=accum,
                               clip_eps=0.02)  # a narrow trust region: rows get cut by step 2


def _train(f0, data, cfg: RunConfig, out_dir: Path, pad_id: int) -> dict[str, torch.Tensor]:
    from cpo_fast.pipeline.run.runtime import seed_everything
    from cpo_fast.pipeline.stages.policy import make_policy
    from cpo_fast.pipeline.training.loop import train

    seed_everything(cfg.seed)
    policy = make_policy(f0, cfg)
    train(policy, data, cfg, out_dir, pad_id=pad_id)
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _moved(f0_params: dict, p: dict) -> float:
    return max(float(p[k].abs().max()) for k in p if "lora_B" in k)  # B starts at 0


@pytest.mark.parametrize("method,weighting", CASES)
def test_accumulation_equals_one_big_batch(exact_prep, tmp_path, method, weighting):
    """(a) A micro-batches of B rows == one batch of A*B rows (the plain loss on it)."""
    from cpo_fast.pipeline.training.loop import train_data

    data, f0 = train_data(exact_prep, method), exact_prep.load_f0()
    cfg = _config(exact_prep, method, weighting)
    acc = _train(f0, data, cfg, tmp_path / "acc", exact_prep.pad_id)
    big = _train(f0, data, _config(exact_prep, method, weighting, accum=1, rows=A * B),
                 tmp_path / "big", exact_prep.pad_id)
    print(f"max |acc - big| {method} {weighting}: {_max_diff(acc, big):.3g}")
    assert _max_diff(acc, big) < TOL
    assert _moved({}, big) > 100 * TOL  # the runs trained: the test can fail
    for run in ("acc", "big"):  # the metrics are the effective batch's
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert all(r["batch_rows"] == A * B and r["ess"] <= A * B + 1e-4 for r in rows)
    if weighting == "clipped":  # some rows left the trust region: the cut is exercised
        assert any(r["clip_fraction"] > 0 for r in rows)


@pytest.mark.parametrize("method,extra", [("dr_cpo", {}), ("sft_all", dict(entropy_coef=0.01))])
def test_accumulation_with_a_trained_head_forms_its_gradient_in_the_forward(
        exact_prep, tmp_path, monkeypatch, method, extra):
    """(a) full fine-tuning (the head trained): pass 2 (and SFT) announce their coefficients,
    so the head's gradient is formed in its forward (no recompute, no recompute warning),
    and the result still equals the one big batch."""
    import warnings

    from cpo_fast.ops import linear_token_logprobs_known as known
    from cpo_fast.pipeline.training.loop import train_data

    calls = []
    real = known.forward_with_grads
    monkeypatch.setattr(known, "forward_with_grads", lambda *a: calls.append(1) or real(*a))
    data, f0 = train_data(exact_prep, method), exact_prep.load_f0()
    cfg = dataclasses.replace(_config(exact_prep, method, "self_normalized"), lora=False, **extra)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*recomputing it exactly")
        acc = _train(f0, data, cfg, tmp_path / "acc", exact_prep.pad_id)
    assert len(calls) >= K * A  # every pass-2 micro-batch of every step
    big = _train(f0, data, dataclasses.replace(cfg, grad_accum=1, batch_size=A * B,
                                               dm_batch_size=A * B), tmp_path / "big", exact_prep.pad_id)
    print(f"max |acc - big| {method} full fine-tune: {_max_diff(acc, big):.3g}")
    assert _max_diff(acc, big) < TOL
    assert max(float((big[k] - f0.state_dict()[k]).abs().max()) for k in big) > 100 * TOL


@pytest.mark.parametrize("method,extra", [
    ("dr_cpo", dict(kl_coef=0.1, entropy_coef=0.01, log_weight_cap=0.3)),
    ("cpo", dict(kl_coef=0.1, log_weight_cap=0.3, length_normalize=True)),
    ("dr_cpo", dict(ess_target=0.995)),
    ("oo_rlhf", dict(ess_target=0.995)),
    ("sft_all", dict(entropy_coef=0.01))])
def test_accumulation_with_regularizers_cap_and_sft(exact_prep, tmp_path, method, extra):
    """(a) with the token-level terms (KL, entropy: token means over the effective batch), the
    log-weight cap (the effective batch's median) and SFT (no coupling, token mean)."""
    from cpo_fast.pipeline.training.loop import train_data

    data, f0 = train_data(exact_prep, method), exact_prep.load_f0()
    cfg = dataclasses.replace(_config(exact_prep, method, "self_normalized"), **extra)
    acc = _train(f0, data, cfg, tmp_path / "acc", exact_prep.pad_id)
    big = _train(f0, data, dataclasses.replace(cfg, grad_accum=1, batch_size=A * B,
                                               dm_batch_size=A * B), tmp_path / "big", exact_prep.pad_id)
    print(f"max |acc - big| {method} {extra}: {_max_diff(acc, big):.3g}")
    assert _max_diff(acc, big) < TOL
    if extra.get("ess_target"):  # tempering acted, and held the ESS at its target
        rows = [json.loads(x) for x in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
        assert any(r["ess_tau"] < 1.0 for r in rows)
        assert all(r["ess"] >= extra["ess_target"] * r["batch_rows"] * (1 - 1e-6) for r in rows
                   if method != "oo_rlhf")


@pytest.mark.parametrize("weighting", ["self_normalized", "clipped"])
def test_step_gradient_is_the_full_batch_gradient_with_dropout(exact_prep, weighting):
    """The two-pass step's .grad equals autograd through the effective batch's objective
    (all micro-batches' rows concatenated, same dropout masks), with LoRA dropout on: the
    RNG replay gives the backward pass the masks of the no-grad pass."""
    from cpo_fast import dr_cpo_loss
    from cpo_fast.distributed import SINGLE, rng_replay, rng_snapshot
    from cpo_fast.effective_batch import token_pair
    from cpo_fast.estimators import cap_log_weights
    from cpo_fast.pipeline.run.runtime import seed_everything
    from cpo_fast.pipeline.stages.policy import make_policy
    from cpo_fast.pipeline.training.loop import effective_gradient, step_micro_batches, train_data

    sn = weighting == "self_normalized"  # the cap centres on the median there, on 0 otherwise
    cfg = dataclasses.replace(_config(exact_prep, "dr_cpo", weighting), lora_dropout=0.3,
                              log_weight_cap=0.5 if sn else 0.0, clip_eps=0.2)
    seed_everything(0)
    model = make_policy(exact_prep.load_f0(), cfg)
    with torch.no_grad():  # move off f_0 so that weights, cap and clipping are not trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    micro = step_micro_batches(train_data(exact_prep, "dr_cpo"), 1, cfg=cfg, world=SINGLE,
                               pad_id=exact_prep.pad_id, device=torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    snap = rng_snapshot(torch.device("cpu"))
    effective_gradient(model, micro, cfg, SINGLE, dict(device_type="cpu", enabled=False), 2)
    got = [p.grad.clone() for p in params]
    model.zero_grad()
    rng_replay(snap, torch.device("cpu"))
    rows: dict[str, list] = {}
    obj = cfg.objective()
    for pair in micro:  # the same forwards, in the same order, with gradients
        main, dm = token_pair(model, pair, obj)
        for k, v in obj.row_values(main, dm).items():
            rows.setdefault(k, []).append(v)
    r = {k: torch.cat(v) for k, v in rows.items()}
    out = dr_cpo_loss(
        cap_log_weights(r["policy_logp"], r["ref_logp"], cfg.log_weight_cap, self_normalized=sn),
        r["ref_logp"], r["outcome"], r["outcome_pred"],
        dm_policy_logp=cap_log_weights(r["dm_policy_logp"], r["dm_ref_logp"], cfg.log_weight_cap,
                                       self_normalized=sn),
        dm_ref_logp=r["dm_ref_logp"], dm_outcome_pred=r["dm_outcome_pred"], weighting=weighting,
        clip_eps=cfg.clip_eps)
    assert sn or 0 < float(out.clip_fraction) < 1  # the clipped case cuts some rows
    out.loss.backward()
    assert max(float(g.abs().max()) for g in got) > 1e-3  # a gradient that can be wrong
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_per_micro_batch_losses_would_fail(exact_prep, tmp_path, monkeypatch):
    """The control: the loop before issue 13 (each micro-batch's own self-normalized loss,
    divided by A) lands far outside TOL of the big batch, so test (a) can fail."""
    from cpo_fast.effective_batch import token_pair

    def per_micro_batch(model, micro, cfg, world, autocast, step):
        obj = cfg.objective()
        for pair in micro:
            out = obj.loss(*token_pair(model, pair, obj))
            (out.loss / len(micro)).backward()
        return loop.StepResult(float(out.loss.detach()), out, 1)

    data, f0 = train_data(exact_prep, "dr_cpo"), exact_prep.load_f0()
    big = _train(f0, data, _config(exact_prep, "dr_cpo", "self_normalized", accum=1, rows=A * B),
                 tmp_path / "big", exact_prep.pad_id)
    monkeypatch.setattr(loop, "effective_gradient", per_micro_batch)
    naive = _train(f0, data, _config(exact_prep, "dr_cpo", "self_normalized"), tmp_path / "naive",
                   exact_prep.pad_id)
    assert _max_diff(naive, big) > 100 * TOL


# ----------------------------------------------------------------------- (b) 2 gloo ranks

def _rank_worker(rank: int, world: int, port: int, job: dict, q) -> None:
    import torch.distributed as dist

    from cpo_fast.pipeline.stages.policy import load_causal_lm

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for case, (cfg, data) in job["cases"].items():
            f0 = load_causal_lm(job["f0"], torch.device("cpu"))
            p = _train(f0, data, cfg, Path(job["out"]) / "-".join(case), job["pad_id"])
            out[case] = {k: v.numpy() for k, v in p.items()}
        q.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_accumulation_equal_one_process(exact_prep, tmp_path):
    """(b) 2 gloo ranks x B rows x A micro-batches == one process with 2*A*B rows, for CPO and
    DR-CPO, self-normalized and clipped. Only rank 0 writes metrics and checkpoints."""
    from cpo_fast.pipeline.training.loop import train_data

    job = {"f0": str(exact_prep.f0_dir), "pad_id": exact_prep.pad_id, "out": str(tmp_path),
           "cases": {c: (_config(exact_prep, *c), train_data(exact_prep, c[0])) for c in CASES}}
    results = spawn_ranks(_rank_worker, 2, job, timeout=300)
    f0 = exact_prep.load_f0()
    for case in CASES:
        one = _train(f0, train_data(exact_prep, case[0]), _config(exact_prep, *case, accum=1, rows=2 * A * B),
                     tmp_path / "one", exact_prep.pad_id)
        for rank in (0, 1):
            got = {k: torch.from_numpy(v) for k, v in results[rank][case].items()}
            print(f"max |2 ranks - 1 process| {case} rank {rank}: {_max_diff(got, one):.3g}")
            assert _max_diff(got, one) < TOL, (case, rank)
        lines = (tmp_path / "-".join(case) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == list(range(1, K + 1))
        assert json.loads(lines[0])["batch_rows"] == 2 * A * B


# ----------------------------------------------- (c) torchrun, SIGTERM, resume on 1 and 2 ranks

CLI_TINY = ["--max-tokens", "40", "--vocab-size", "200", "--hidden-size", "32", "--num-layers",
            "1", "--num-heads", "2", "--f0-steps", "6", "--f0-batch-size", "16",
            "--outcome-folds", "3", "--warmup-steps", "0", "--progress", "false",
            "--eval-fraction", "0.2", "--lora-r", "4", "--dm-size", "16", "--threads", "1",
            "--method", "dr_cpo", "--lr", "1e-2", "--save-every", "0"]


def _launch(args: list[str], launcher: str = "torchrun") -> subprocess.Popen:
    """2 processes of ``python -m cpo_fast ARGS`` under torchrun or accelerate launch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    else:  # accelerate's multi-GPU launcher is torchrun's; without a GPU the ranks use gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return subprocess.Popen([*cmd, "-m", "cpo_fast", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from cpo_fast.pipeline.run.persist import load_tensors

    return load_tensors(run / "dr_cpo" / "model" / "adapter_model.safetensors")


def test_torchrun_sigterm_then_resume_on_other_rank_counts(tmp_path, capsys):
    """(c) Effective batch 8 = 2 ranks x 4 rows = 1 process x 4 rows x 2 micro-batches:
    2 ranks (torchrun, SIGTERM mid-run) -> 1 process -> 2 ranks (accelerate launch) == 1
    process uninterrupted."""
    from cpo_fast.cli import main

    write_corpus(make_corpus(100, seed=2), tmp_path / "corpus.csv")
    common = ["--data", str(tmp_path / "corpus.csv"), *CLI_TINY]
    prepared = tmp_path / "prepared"
    assert main(["fit-outcome", "--output-dir", str(prepared), *common]) == 0
    shutil.copytree(prepared, tmp_path / "run")
    run = ["train", "--output-dir", str(tmp_path / "run"), *common, "--no-eval"]
    steps = 14
    p = _launch([*run, "--steps", str(steps), "--batch-size", "4", "--dm-batch-size", "4"])
    metrics = tmp_path / "run" / "dr_cpo" / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert p.poll() is None and time.monotonic() - t0 < 240, p.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGTERM)  # the launcher and its workers, as `kill` of a job
    out, _ = p.communicate(timeout=120)  # no rank hangs in a collective
    assert "stopped by SIGTERM after step" in out and "Continue with:" in out, out[-3000:]
    stopped = json.loads((tmp_path / "run" / "dr_cpo" / "checkpoint" / "state.json").read_text())
    print(f"SIGTERM: the 2 ranks stopped after step {stopped['step']}")
    assert 2 <= stopped["step"] < steps - 2, stopped["step"]
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert logged == list(range(1, stopped["step"] + 1))  # rank 0 alone wrote them, once
    capsys.readouterr()
    assert main([*run, "--resume", "--steps", str(steps), "--stop-after", str(stopped["step"] + 1),
                 "--batch-size", "4", "--dm-batch-size", "4", "--grad-accum", "2"]) == 0
    assert f"resuming from step {stopped['step']}" in capsys.readouterr().out
    launcher = "accelerate" if importlib.util.find_spec("accelerate") else "torchrun"
    p = _launch([*run, "--resume", "--steps", str(steps), "--batch-size", "4", "--grad-accum", "1",
                 "--dm-batch-size", "4"], launcher)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    assert out.count(f"resuming from step {stopped['step'] + 1}") == 1  # rank 0 prints
    shutil.copytree(prepared, tmp_path / "ref")
    assert main(["train", "--output-dir", str(tmp_path / "ref"), *common, "--no-eval", "--steps", str(steps),
                 "--batch-size", "8", "--dm-batch-size", "8"]) == 0
    a, b = _adapter(tmp_path / "ref"), _adapter(tmp_path / "run")
    print(f"max |interrupted 2 -> 1 -> 2 ranks - uninterrupted 1 process|: {_max_diff(a, b):.3g}")
    assert _max_diff(a, b) < TOL
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(
        range(1, steps + 1))


def test_autocast_follows_bf16_and_the_model_size(monkeypatch):
    """bf16 autocast only where --bf16 is on and it pays: native bf16, >= 20M parameters."""
    from cpo_fast.pipeline.stages import generate
    from cpo_fast.pipeline.training.loop import autocast_args

    small = torch.nn.Linear(4, 4)
    big = torch.nn.Linear(5000, 4001)  # 20.0M parameters
    monkeypatch.setattr(generate, "_cpu_bf16", lambda: True)
    assert autocast_args(big, RunConfig())["enabled"]
    assert autocast_args(big, RunConfig())["device_type"] == "cpu"
    assert not autocast_args(big, RunConfig(bf16=False))["enabled"]
    assert not autocast_args(small, RunConfig())["enabled"]
    monkeypatch.setattr(generate, "_cpu_bf16", lambda: False)
    assert not autocast_args(big, RunConfig())["enabled"]


def test_batch_indices_pure_and_epoch_permutations():
    a = [batch_indices(10, 4, k, seed=3) for k in range(5)]
    b = [batch_indices(10, 4, k, seed=3) for k in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    flat = np.concatenate(a)
    assert sorted(flat[:10].tolist()) == list(range(10))  # epoch 0 covers every row once
    assert sorted(flat[10:20].tolist()) == list(range(10))
    assert not np.array_equal(batch_indices(10, 4, 0, seed=4), a[0])


def test_dm_rows_checked_for_every_dm_source():
    enc = Encoded(input_ids=[[1, 2, 3]] * 8, score_start=[1] * 8)
    data = TrainData(enc=enc, rows=np.arange(8), ref=[], outcomes=np.zeros(8), dm_enc=enc)
    data.check("dr_cpo", 8)
    with pytest.raises(ValueError, match="32 DM rows per optimizer step .* DM set has 8"):
        data.check("dr_cpo", 32)


# The files one training step enters, from its micro-batches to the optimizer update
# (`cpo-fast train --method dr_cpo`, one process, CPU): docs/architecture.md's walk. A new
# file on this path fails here; add it to the walk there, then here.
STEP_WALK = {
    "pipeline/training/loop.py": "the step: micro-batches, the update",
    "pipeline/stages/data.py": "the encoded rows (their count)",
    "pipeline/run/config.py": "the run's Objective",
    "models.py": "collate; token_batch: backbone, labels shifted once",
    "effective_batch.py": "the two passes",
    "objectives.py": "the method table, the per-row values, the loss",
    "estimators.py": "the weights, tempering, ESS",
    "distributed.py": "the world's sums (one process: the values themselves)",
    "ops/linear_token_logprobs.py": "the fused-linear op",
    "_backend.py": "which module runs (device, dtype)",
    "cpu/linear_token_logprobs.py": "the C++ backend",
    "cpu/_common.py": "the C++ backend's pointers and dtypes",
    "_transform.py": "the head transform (none for Llama)",
    "_checks.py": "the op's and the estimators' argument checks",
}


def test_one_step_enters_the_documented_files(prep, tmp_path, monkeypatch):
    """Trace every Python call inside cpo_fast from ``step_micro_batches`` to the end of
    ``update``: the step enters exactly STEP_WALK's files."""
    pkg = Path(cpo_fast.__file__).parent
    entered: list[str] = []

    def profile(frame, event, _arg):
        path = Path(frame.f_code.co_filename)
        if event == "call" and path.is_relative_to(pkg):
            entered.append(path.relative_to(pkg).as_posix())

    def data(*a, **k):
        sys.setprofile(profile)
        return step_micro_batches(*a, **k)

    def update(*a, **k):
        try:
            return step_update(*a, **k)
        finally:
            sys.setprofile(None)

    step_micro_batches, step_update = loop.step_micro_batches, loop.update
    monkeypatch.setattr(loop, "step_micro_batches", data)
    monkeypatch.setattr(loop, "update", update)
    cfg = dataclasses.replace(prep.cfg, method="dr_cpo", steps=1)
    train_policy(prep, cfg, out_dir=tmp_path)
    assert entered[0] == "pipeline/training/loop.py" and entered[-1] == entered[0]
    assert set(entered) == set(STEP_WALK), sorted(set(entered) ^ set(STEP_WALK))
