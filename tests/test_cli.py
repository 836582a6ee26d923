"""``cpo-fast`` end to end on tiny settings: every subcommand, resume, input errors, EmoBank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpo_fast.cli import main
from cpo_fast.pipeline.stages.synthetic import make_corpus, write_corpus

EMOBANK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "emobank.csv"
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

