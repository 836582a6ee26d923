"""``cpo-fast bench`` (cpo_fast/bench/command.py, its flags in arguments.py): it runs, prints
what it promises, and rejects bad arguments (numbers unchecked)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("transformers")
pytest.importorskip("peft")


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpo_fast", "bench", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_bench_table_and_json(capsys) -> None:
    from cpo_fast.cli import main

    assert main(["bench", "--vocab", "1000", "--hidden", "32", "--tokens", "64", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("eager", "cpo_fast-logits", "cpo_fast-linear", "cpo_fast", "tokens/s"):
        assert name in out, out
    # The same process: the case server started by the first call is reused.
    assert main(["bench", "--vocab", "1000", "--hidden", "32", "--tokens", "64", "--reps", "2",
                 "--frozen-head", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)  # JSON only on stdout
    assert {"schema", "timestamp", "environment", "settings", "op", "e2e"} <= set(rec)
    assert rec["settings"]["vocab"] == 1000 and rec["settings"]["frozen_head"] is True
    ops = {r["variant"]: r for r in rec["op"]}
    assert {"eager", "cpo_fast-logits", "cpo_fast-linear"} <= set(ops)
    for v in ("eager", "cpo_fast-logits", "cpo_fast-linear"):
        assert ops[v]["status"] == "ok" and ops[v]["median_ms"] > 0
        assert "peak_extra_bytes" in ops[v]
    e2e = {r["path"]: r for r in rec["e2e"]}
    assert {"eager", "cpo_fast"} <= set(e2e)
    assert e2e["cpo_fast"]["status"] == "ok" and e2e["cpo_fast"]["finetune"] == "lora"
    assert e2e["cpo_fast"]["tokens_per_s"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--vocab", "0"], "--vocab must be a positive integer"),
    (["--tokens", "-3"], "--tokens must be a positive integer"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--hidden", "33"], "--hidden must be even"),
])
def test_cli_bench_bad_arguments_exit_2(argv, needle, capsys) -> None:
    from cpo_fast.cli import main

    try:
        code = main(["bench", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr()
    assert code == 2, (code, err.err)
    assert needle in err.err and "Traceback" not in err.err
    assert err.out == ""


def test_cli_bench_bad_argument_exit_code_from_the_shell() -> None:
    proc = _cli("--vocab", "0", timeout=60)
    assert proc.returncode == 2 and "--vocab must be a positive integer" in proc.stderr


def test_cli_bench_help_shows_each_default_once(capsys) -> None:
    import re

    from cpo_fast.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"default:[^()]*\) \(default:", text)
    assert "(default: cuda when available)" in text and "(default: 32000)" in text
