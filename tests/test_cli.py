"""The command line (cpo_fast/cli.py, ``cpo-fast``) end to end on tiny settings: every
subcommand, resume, input errors, EmoBank; and every failure a new user hit: one line naming
the flag, file or column, a non-zero exit, no traceback, and no file that existed before the
command changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EMOBANK, ROOT

from cpo_fast.cli import main, printable
from cpo_fast.pipeline.stages.synthetic import make_corpus, write_corpus

TINY = ["--max-tokens", "40", "--vocab-size", "200", "--hidden-size", "32", "--num-layers", "1",
        "--num-heads", "2", "--f0-steps", "6", "--f0-batch-size", "16", "--steps", "3",
        "--batch-size", "8", "--dm-batch-size", "8", "--dm-size", "16", "--num-samples", "8",
        "--max-new-tokens", "10", "--bootstrap", "50", "--outcome-folds", "3",
        "--warmup-steps", "1", "--progress", "false", "--eval-fraction", "0.2",
        "--lora-r", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corpus.csv"
    write_corpus(make_corpus(100, seed=2), path)
    return path


def test_bad_method_exits_nonzero_with_message(corpus, tmp_path):
    # A real process: the console entry point's exit status and stderr.
    r = subprocess.run([sys.executable, "-m", "cpo_fast.cli", "train", "--data", str(corpus),
                        "--method", "dpo", "--output-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--method='dpo' is not one of" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["demo", "train", "precompute", "fit-outcome", "generate",
                                     "evaluate"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "--output-dir" in capsys.readouterr().out


def test_unknown_column_exits_nonzero(corpus, tmp_path, capsys):
    rc = main(["train", "--data", str(corpus), "--outcome-column", "rating",
               "--output-dir", str(tmp_path), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "column 'rating'" in err and "available columns" in err


def test_other_input_errors(corpus, tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), *TINY]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--output-dir",
                 str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  stepz: 3\n")
    assert main(["train", "--config", str(y), "--data", str(corpus)]) == 2
    assert "unknown config key 'stepz'. Did you mean 'steps'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a non-number for an int flag
        main(["train", "--steps", "many"])
    assert e.value.code == 2


def test_train_stop_resume_and_other_subcommands(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(corpus), "--group-column", "group", "--output-dir", str(out), *TINY]
    assert main(["precompute", *common]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["fit-outcome", *common]) == 0
    assert "out-of-fold R^2" in capsys.readouterr().out
    # Interrupted after 2 of 3 steps, then resumed: the run finishes and evaluates.
    assert main(["train", *common, "--method", "dr_cpo", "--stop-after", "2"]) == 0
    ckpt = out / "dr_cpo" / "checkpoint"
    assert (ckpt / "state.json").is_file() and (ckpt / "tensors.safetensors").is_file()
    assert not (out / "dr_cpo" / "model").exists()
    capsys.readouterr()
    assert main(["train", *common, "--method", "dr_cpo", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "3/3 steps" in text and "[eval] dr_cpo" in text
    assert "resuming from step 2" in text
    res = json.loads((out / "dr_cpo" / "results.json").read_text())
    assert {"ipw", "snips", "dr"} <= set(res["policy"]["off_policy"])
    for png in ("training.png", "weights.png", "outcome.png"):
        assert (out / "dr_cpo" / "plots" / png).stat().st_size > 1000
    assert main(["generate", *common, "--method", "dr_cpo", "--num-samples", "4"]) == 0
    lines = (out / "samples" / "dr_cpo.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "ghat" in json.loads(lines[0])
    capsys.readouterr()
    assert main(["evaluate", *common, "--model-dir", "f0",
                 "--scorer", "cpo_fast.pipeline.stages.synthetic:oracle"]) == 0
    assert "oracle " in capsys.readouterr().out
    assert "oracle" in json.loads((out / "eval" / "f_0.json").read_text())
    assert main(["evaluate", *common, "--model-dir", "f0", "--scorer", "nope"]) == 2
    assert "expected 'module:function'" in capsys.readouterr().err
    assert main(["evaluate", *common, "--model-dir", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    assert main(["fit-outcome", *common, "--f0-steps", "7"]) == 2  # stale f_0 refused
    assert "built with other settings {'f0_steps': (6, 7)}" in capsys.readouterr().err


def test_tiny_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--rows", "120", "--output-dir", str(out), *TINY,
               "--max-new-tokens", "12", "--num-samples", "16"])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("f_0", "SFT-all", "SFT-top", "OO-RLHF", "CPO", "DR-CPO"):
        assert f"\n{name:9s} " in text
    res = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in res["table"]][0] == "f_0" and res["seconds"] > 0
    assert (out / "plots" / "oracle.png").is_file()


@pytest.mark.skipif(not EMOBANK.is_file(), reason=f"{EMOBANK} not present")
def test_emobank_train(tmp_path, capsys):
    out = tmp_path / "emo"
    rc = main(["train", "--data", str(EMOBANK), "--outcome-column", "V", "--id-column", "id",
               "--max-rows", "300", "--method", "dr_cpo", "--output-dir", str(out), *TINY,
               "--max-tokens", "48", "--vocab-size", "300"])
    assert rc == 0
    res = json.loads((out / "dr_cpo" / "results.json").read_text())
    assert res["train"]["finished"] and res["policy"]["off_policy"]["n"] == 60
    assert 1.0 <= res["policy"]["ghat"]["mean"] <= 5.0


# ----------------------------------------------------------------------------- issue 12

@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A finished, evaluated dr_cpo run (module-shared: the tests below only add to it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--data", str(corpus), "--output-dir", str(out), "--method", "dr_cpo",
                 "--group-column", "group", *TINY]) == 0
    return out


def test_resume_no_eval_keeps_results(finished_run, capsys):
    """Item 4: `--resume --no-eval` on a finished run keeps every field of results.json and
    prints the real last loss and ESS (was: results replaced, 'last loss None, ESS None')."""
    path = finished_run / "dr_cpo" / "results.json"
    before = json.loads(path.read_text())
    assert {"train", "f0", "policy"} <= set(before)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(finished_run), "--resume", "--no-eval"]) == 0
    text = capsys.readouterr().out
    assert "resuming from step 3" in text and "None" not in text
    loss = before["train"]["loss"]
    assert f"last loss {loss:.4g}, ESS {before['train']['ess']:.4g}" in text
    after = json.loads(path.read_text())
    assert set(before) <= set(after)
    assert after["policy"] == before["policy"] and after["f0"] == before["f0"]
    assert after["train"]["loss"] == loss and after["train"]["finished"]


def test_commands_read_the_saved_settings(finished_run, capsys):
    """Item 7: generate/evaluate/precompute need only --output-dir; outputs land in the
    documented places (samples/NAME.jsonl, eval/NAME.json), the same for train and evaluate."""
    out = str(finished_run)
    assert (finished_run / "eval" / "dr_cpo.json").is_file()  # written by train
    assert (finished_run / "eval" / "f_0.json").is_file()
    assert main(["precompute", "--output-dir", out]) == 0
    assert main(["generate", "--output-dir", out, "--num-samples", "3"]) == 0
    assert len((finished_run / "samples" / "dr_cpo.jsonl").read_text().splitlines()) == 3
    (finished_run / "eval" / "dr_cpo.json").unlink()
    assert main(["evaluate", "--output-dir", out]) == 0
    assert json.loads((finished_run / "eval" / "dr_cpo.json").read_text())["name"] == "dr_cpo"
    assert main(["generate", "--output-dir", out, "--model-dir", "f0", "--num-samples", "2"]) == 0
    assert (finished_run / "samples" / "f_0.jsonl").is_file()
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "generate", "demo"])
def test_help_shows_each_default_once(command, capsys):
    """Item 8: '(default: cuda when available) (default: None)' was printed."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    import re

    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"default:[^()]*\) \(default:", text)
    assert "(default: cuda when available)" in text


def test_errors_name_flags_and_leave_no_empty_dir(corpus, tmp_path, capsys):
    """Item 8: errors name the flag, not DataConfig.path; a failed run leaves no empty dir."""
    out = tmp_path / "new" / "run"
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "DataConfig" not in err
    assert main(["train", "--data", str(corpus), "--outcome-column", "rating",
                 "--output-dir", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--outcome-column" in err and "DataConfig" not in err
    assert not out.exists()


# ------------------------------------------- every failure a new user hit (own flags and corpus)

TINY_ERRORS = ["--max-tokens", "40", "--vocab-size", "200", "--hidden-size", "32", "--num-layers", "1",
               "--num-heads", "2", "--f0-steps", "4", "--f0-batch-size", "16", "--steps", "3",
               "--batch-size", "8", "--dm-batch-size", "8", "--dm-size", "16", "--num-samples", "8",
               "--max-new-tokens", "8", "--bootstrap", "50", "--outcome-folds", "3",
               "--warmup-steps", "1", "--progress", "false", "--eval-fraction", "0.2", "--lora-r", "4",
               "--threads", "1"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("errors") / "corpus.csv"
    write_corpus(make_corpus(60, seed=3), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_corpus) -> Path:
    """A run whose shared stages exist and whose CPO policy trained for 2 steps."""
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", "--data", str(small_corpus), "--output-dir", str(out), *TINY_ERRORS, "--method",
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
def test_bad_numbers_are_refused_before_any_work(flag, value, says, small_corpus, tmp_path, capsys):
    out = tmp_path / "never"
    err = _fails(["train", "--data", str(small_corpus), "--output-dir", str(out), *TINY_ERRORS, flag, value],
                 capsys)
    assert says in err
    assert not out.exists()


def test_device_cuda_without_cuda(small_corpus, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "never"
    err = _fails(["train", "--data", str(small_corpus), "--output-dir", str(out), *TINY_ERRORS,
                  "--device", "cuda"], capsys)
    assert "--device cuda" in err and "--device cpu" in err
    assert not out.exists()


def test_backend_triton_on_a_cpu_machine(small_corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "cpo_fast", "train", "--data", str(small_corpus),
                        "--output-dir", str(out), *TINY_ERRORS, "--backend", "triton"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--backend triton" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_too_few_rows_is_refused_before_f0(tmp_path, capsys):
    tiny = tmp_path / "two.csv"
    tiny.write_text("text,outcome\nA fine day.,1\nA bad day.,0\n")
    out = tmp_path / "never"
    err = _fails(["train", "--data", str(tiny), "--output-dir", str(out), *TINY_ERRORS], capsys)
    assert "--outcome-folds" in err and "two.csv" in err
    assert not out.exists()


def test_scorer_that_returns_text(small_corpus, tmp_path, capsys):
    out = tmp_path / "never"
    err = _fails(["train", "--data", str(small_corpus), "--output-dir", str(out), *TINY_ERRORS,
                  "--scorer", "json:dumps"], capsys)
    assert "--scorer 'json:dumps'" in err and "one number per text" in err
    assert not out.exists()


def test_dm_batch_larger_than_the_dm_set(small_corpus, tmp_path, capsys):
    err = _fails(["train", "--data", str(small_corpus), "--output-dir", str(tmp_path / "never"), *TINY_ERRORS,
                  "--dm-batch-size", "32", "--dm-size", "8"], capsys)
    assert "--dm-batch-size" in err and "--dm-size 8" in err


def test_generate_on_a_missing_run(tmp_path, capsys):
    err = _fails(["generate", "--output-dir", str(tmp_path / "nowhere")], capsys)
    assert "--output-dir" in err and "does not exist" in err and "--data" not in err


def test_broken_yaml_config(small_corpus, tmp_path, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  steps: [3\n")
    err = _fails(["train", "--config", str(y), "--data", str(small_corpus)], capsys)
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


# ---------------------------------------------------------------- data

def test_too_long_row_names_its_file_row_and_id(tmp_path, capsys):
    rows = ["id,text,outcome"] + [f"{100 + i},short text {i},{i % 3}" for i in range(1, 31)]
    rows[10] = "110," + " ".join(["long"] * 80) + ",1"  # data row 10, id 110
    p = tmp_path / "long.csv"
    p.write_text("\n".join(rows) + "\n")
    err = _fails(["train", "--data", str(p), "--id-column", "id", "--output-dir",
                  str(tmp_path / "r"), *TINY_ERRORS, "--on-too-long", "error"], capsys)
    assert "data row 10 (id 110)" in err and "--max-tokens" in err


# ---------------------------------------------------------------- output

def test_generations_are_echoed_without_control_characters():
    assert printable("ok\x1b[2Jgone\x07 text\nnext") == "ok\\x1b[2Jgone\\x07 text\\nnext"
    assert printable("café, naïve") == "café, naïve"


def test_cpo_metrics_have_no_dm_rows(run):
    lines = [json.loads(x) for x in (run / "cpo" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("dm_batch_rows" not in x for x in lines)


def test_no_eval_does_not_claim_eval_output(small_corpus, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data", str(small_corpus), "--output-dir", str(out), *TINY_ERRORS, "--method",
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
