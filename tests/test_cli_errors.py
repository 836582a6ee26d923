"""Every failure a new user hit: one line naming the flag, file or column, a non-zero exit,
no traceback, and no file that existed before the command changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpo_fast.cli import main, printable
from cpo_fast.pipeline.stages.synthetic import make_corpus, write_corpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--max-tokens", "40", "--vocab-size", "200", "--hidden-size", "32", "--num-layers", "1",
        "--num-heads", "2", "--f0-steps", "4", "--f0-batch-size", "16", "--steps", "3",
        "--batch-size", "8", "--dm-batch-size", "8", "--dm-size", "16", "--num-samples", "8",
        "--max-new-tokens", "8", "--bootstrap", "50", "--outcome-folds", "3",
        "--warmup-steps", "1", "--progress", "false", "--eval-fraction", "0.2", "--lora-r", "4",
        "--threads", "1"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("errors") / "corpus.csv"
    write_corpus(make_corpus(60, seed=3), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    """A run whose shared stages exist and whose CPO policy trained for 2 steps."""
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", "--data", str(corpus), "--output-dir", str(out), *TINY, "--method",
                 "cpo", "--steps", "2", "--save-every", "1", "--no-eval"]) == 0
    return out


def _fails(argv: list[str], capsys, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- flags checked before any work

@pytest.mark.parametrize("flag,value,says", [
    ("--lr", "-1", "--lr must be > 0"),
    ("--f0-lr", "0", "--f0-lr must be > 0"),
    ("--clip-eps", "-1", "--clip-eps must be > 0"),
    ("--clip-eps", "1.5", "--clip-eps must be < 1"),
    ("--temperature", "0", "--temperature must be > 0"),
    ("--outcome-folds", "1", "--outcome-folds must be >= 2"),
    ("--top-quantile", "1", "--top-quantile must be in (0, 1)"),
])
def test_bad_numbers_are_refused_before_any_work(flag, value, says, corpus, tmp_path, capsys):
    out = tmp_path / "never"
    err = _fails(["train", "--data", str(corpus), "--output-dir", str(out), *TINY, flag, value],
                 capsys)
    assert says in err
    assert not out.exists()


def test_device_cuda_without_cuda(corpus, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "never"
    err = _fails(["train", "--data", str(corpus), "--output-dir", str(out), *TINY,
                  "--device", "cuda"], capsys)
    assert "--device cuda" in err and "--device cpu" in err
    assert not out.exists()


def test_backend_triton_on_a_cpu_machine(corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "cpo_fast", "train", "--data", str(corpus),
                        "--output-dir", str(out), *TINY, "--backend", "triton"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--backend triton" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_too_few_rows_is_refused_before_f0(tmp_path, capsys):
    tiny = tmp_path / "two.csv"
    tiny.write_text("text,outcome\nA fine day.,1\nA bad day.,0\n")
    out = tmp_path / "never"
    err = _fails(["train", "--data", str(tiny), "--output-dir", str(out), *TINY], capsys)
    assert "--outcome-folds" in err and "two.csv" in err
    assert not out.exists()


def test_scorer_that_returns_text(corpus, tmp_path, capsys):
    out = tmp_path / "never"
    err = _fails(["train", "--data", str(corpus), "--output-dir", str(out), *TINY,
                  "--scorer", "json:dumps"], capsys)
    assert "--scorer 'json:dumps'" in err and "one number per text" in err
    assert not out.exists()


def test_dm_batch_larger_than_the_dm_set(corpus, tmp_path, capsys):
    err = _fails(["train", "--data", str(corpus), "--output-dir", str(tmp_path / "never"), *TINY,
                  "--dm-batch-size", "32", "--dm-size", "8"], capsys)
    assert "--dm-batch-size" in err and "--dm-size 8" in err


def test_dm_rows_checked_for_every_dm_source():
    from cpo_fast.pipeline.stages.data import Encoded
    from cpo_fast.pipeline.training.batches import TrainData

    enc = Encoded(input_ids=[[1, 2, 3]] * 8, score_start=[1] * 8)
    data = TrainData(enc=enc, rows=np.arange(8), ref=[], outcomes=np.zeros(8), dm_enc=enc)
    data.check("dr_cpo", 8)
    with pytest.raises(ValueError, match="32 DM rows per optimizer step .* DM set has 8"):
        data.check("dr_cpo", 32)


def test_generate_on_a_missing_run(tmp_path, capsys):
    err = _fails(["generate", "--output-dir", str(tmp_path / "nowhere")], capsys)
    assert "--output-dir" in err and "does not exist" in err and "--data" not in err


def test_broken_yaml_config(corpus, tmp_path, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  steps: [3\n")
    err = _fails(["train", "--config", str(y), "--data", str(corpus)], capsys)
    assert "--config" in err and "not valid YAML" in err and "line" in err


# ---------------------------------------------------------------- commands that change nothing

def test_failed_evaluate_leaves_the_run_as_it_was(run, capsys):
    before = _snapshot(run)
    err = _fails(["evaluate", "--output-dir", str(run), "--method", "dr_cpo"], capsys)
    assert "--method dr_cpo" in err and "train it first" in err
    assert _snapshot(run) == before


def test_evaluate_and_generate_never_rewrite_the_config(run, capsys):
    before = (run / "config.json").read_bytes()
    assert main(["generate", "--output-dir", str(run), "--num-samples", "2",
                 "--model-dir", "f0"]) == 0
    assert (run / "config.json").read_bytes() == before
    capsys.readouterr()


def test_refused_demo_leaves_its_directory_as_it_was(tmp_path, capsys):
    from cpo_fast.pipeline.report.demo import demo_config
    from cpo_fast.pipeline.run.layout import RunLayout

    out = tmp_path / "demo"
    out.mkdir()
    write_corpus(make_corpus(30, seed=9), out / "corpus.csv")  # another demo's corpus
    (out / "config.json").write_text("{}")
    before = _snapshot(out)
    err = _fails(["demo", "--quick", "--output-dir", str(out), "--rows", "40"], capsys)
    assert "another corpus" in err and _snapshot(out) == before
    # Stages built with other settings (a quick f_0, then the full demo): refused, unchanged.
    (out / "corpus.csv").unlink()
    cfg = demo_config(out, quick=True)
    (RunLayout(out).prepare).write_text(json.dumps({"f0_steps": cfg.f0_steps + 1}))
    before = _snapshot(out)
    err = _fails(["demo", "--output-dir", str(out), "--rows", "40"], capsys)
    assert "other settings" in err and _snapshot(out) == before


def test_quick_and_full_demo_have_their_own_default_directories():
    from cpo_fast.cli import _demo_dir, _parser

    assert _demo_dir(_parser().parse_args(["demo", "--quick"])) == "runs/demo-quick"
    assert _demo_dir(_parser().parse_args(["demo"])) == "runs/demo"


# ---------------------------------------------------------------- damaged or foreign files

def test_full_disk_as_safetensors_reports_it(run, tmp_path, monkeypatch, capsys):
    """safetensors raises SafetensorError (not OSError) when the disk is full."""
    import shutil

    import safetensors.torch
    from safetensors import SafetensorError

    r = tmp_path / "run"
    shutil.copytree(run, r)
    shutil.rmtree(r / "cpo")  # a fresh policy run on the finished shared stages
    real, calls = safetensors.torch.save_file, [0]

    def full(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                  'StorageFull, message: "No space left on device" })')
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    err = _fails(["train", "--output-dir", str(r), "--method", "cpo", "--steps", "4",
                  "--save-every", "1", "--no-eval"], capsys, code=1)
    assert "No space left on device" in err and "tensors.safetensors" in err
    assert json.loads((r / "cpo" / "checkpoint" / "state.json").read_text())["step"] == 1


def test_save_model_full_disk_is_a_write_error(tmp_path):
    from safetensors import SafetensorError

    from cpo_fast.pipeline.run.persist import WriteError
    from cpo_fast.pipeline.stages.policy import save_model

    class Model:
        def save_pretrained(self, path):
            raise SafetensorError("IoError(Os { code: 28, kind: StorageFull })")

    with pytest.raises(WriteError, match="No space left on device") as e:
        save_model(Model(), None, tmp_path / "m")
    assert e.value.errno == 28


def test_truncated_model_weights(run, tmp_path, capsys):
    import shutil

    r = tmp_path / "run"
    shutil.copytree(run, r)
    w = r / "f0" / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    err = _fails(["generate", "--output-dir", str(r), "--model-dir", "f0"], capsys)
    assert "model.safetensors" in err or str(r / "f0" / "model") in err
    assert "damaged" in err


def test_truncated_reference_cache_is_rebuilt(run, tmp_path, capsys):
    import shutil

    r = tmp_path / "run"
    shutil.copytree(run, r)
    caches = sorted((r / "cache").glob("ref_logprobs-*.npz"))
    assert caches
    for c in caches:
        c.write_bytes(c.read_bytes()[:40])
    with pytest.warns(UserWarning, match="damaged reference cache"):
        from cpo_fast.pipeline.stages.precompute import _read_cache

        assert _read_cache(caches[0], None) is None
    assert main(["fit-outcome", "--output-dir", str(r)]) == 0
    with np.load(caches[0]) as z:
        assert z["flat"].size > 0


def test_checkpoint_of_another_model_size():
    from cpo_fast.pipeline.stages.policy import load_trainable_state

    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 8\), the model's is \(3, 4\)"):
        load_trainable_state(model, {"weight": torch.zeros(3, 8)})


# ---------------------------------------------------------------- data

@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_duplicate_column_names_are_refused(suffix, tmp_path):
    from cpo_fast.pipeline.stages.data import DataConfig, load_table

    p = tmp_path / f"dup.{suffix}"
    if suffix == "csv":
        p.write_text("text,outcome,text\nfirst,1,second\nthird,2,fourth\n")
    elif suffix == "jsonl":
        p.write_text('{"text": "a", "outcome": 1}\n{"text": "b", "outcome": 2, "text": "c"}\n')
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array([1.0]), pa.array(["b"])],
                                            names=["text", "outcome", "text"]), p)
    with pytest.raises(ValueError, match=r"repeats the column name\(s\) \['text'\]"):
        load_table(DataConfig(path=str(p)))


def test_too_long_row_names_its_file_row_and_id(tmp_path, capsys):
    rows = ["id,text,outcome"] + [f"{100 + i},short text {i},{i % 3}" for i in range(1, 31)]
    rows[10] = "110," + " ".join(["long"] * 80) + ",1"  # data row 10, id 110
    p = tmp_path / "long.csv"
    p.write_text("\n".join(rows) + "\n")
    err = _fails(["train", "--data", str(p), "--id-column", "id", "--output-dir",
                  str(tmp_path / "r"), *TINY, "--on-too-long", "error"], capsys)
    assert "data row 10 (id 110)" in err and "--max-tokens" in err


def test_constant_outcome_warns(tmp_path, recwarn):
    from cpo_fast.pipeline.run.config import RunConfig
    from cpo_fast.pipeline.run.preflight import check_outcomes

    check_outcomes(RunConfig(), np.full(10, 3.0))
    assert any("constant outcome" in str(w.message) for w in recwarn.list)
    check_outcomes(RunConfig(), np.arange(10.0))
    assert sum("constant outcome" in str(w.message) for w in recwarn.list) == 1


# ---------------------------------------------------------------- API


# ---------------------------------------------------------------- output

def test_off_policy_estimates_marked_unreliable_when_weights_collapse():
    from cpo_fast.pipeline.report.estimate import describe, off_policy_estimates

    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, 60)
    lw = np.zeros(60)
    lw[:3] = 12.0  # three rows carry all the weight: ESS about 3 of 60
    op = off_policy_estimates(lw, y, np.full(60, 0.5), np.full(8, 0.5), n_boot=50)
    assert op["reliable"] is False and op["ipw"]["reliable"] is False
    line = describe(op)
    assert line["ipw"].startswith("unreliable (ESS 3.0 of 60)") and line["naive"] == round(
        float(y.mean()), 4)
    ok = off_policy_estimates(np.zeros(60), y, n_boot=50)
    assert ok["reliable"] is True and isinstance(describe(ok)["ipw"], float)


def test_generations_are_echoed_without_control_characters():
    assert printable("ok\x1b[2Jgone\x07 text\nnext") == "ok\\x1b[2Jgone\\x07 text\\nnext"
    assert printable("café, naïve") == "café, naïve"


def test_cpo_metrics_have_no_dm_rows(run):
    lines = [json.loads(x) for x in (run / "cpo" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("dm_batch_rows" not in x for x in lines)


def test_no_eval_does_not_claim_eval_output(corpus, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data", str(corpus), "--output-dir", str(out), *TINY, "--method",
                 "sft_all", "--no-eval"]) == 0
    text = capsys.readouterr().out
    assert "[train] wrote" in text and "eval/" not in text


def test_warnings_are_one_line(capsys):
    import warnings

    from cpo_fast.cli import _one_line_warning

    _one_line_warning(UserWarning("weights collapsed at step 3"), UserWarning, __file__, 1)
    err = capsys.readouterr().err
    assert err == "cpo-fast: UserWarning: weights collapsed at step 3\n"
    assert warnings.showwarning is not _one_line_warning  # main() restores it
