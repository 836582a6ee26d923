"""The flags of ``cpo-fast bench`` (cpo_fast/bench/arguments.py), on a parser of their own: the
defaults, the positive-integer checks and their messages (naming the flag and the bad value),
the dtype choices (the same names as cpo_fast.bench.e2e.DTYPES), each help text stating its
default once and truly, and the module staying light (importable without torch)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from cpo_fast.bench.arguments import DESCRIPTION, DTYPE_NAMES, add_arguments

POSITIVE = ("--vocab", "--hidden", "--tokens", "--seq", "--layers", "--reps")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpo-fast bench", description=DESCRIPTION)
    add_arguments(p)
    return p


def test_defaults():
    args = _parser().parse_args([])
    assert vars(args) == dict(vocab=32000, hidden=256, tokens=512, seq=256, dtype="fp32",
                              frozen_head=False, device=None, layers=2, reps=3, no_e2e=False,
                              json=False)


def test_every_flag_parsed():
    args = _parser().parse_args(["--vocab", "7", "--hidden", "8", "--tokens", "9", "--seq", "10",
                                 "--dtype", "bf16", "--frozen-head", "--device", "cuda:1",
                                 "--layers", "3", "--reps", "4", "--no-e2e", "--json"])
    assert vars(args) == dict(vocab=7, hidden=8, tokens=9, seq=10, dtype="bf16", frozen_head=True,
                              device="cuda:1", layers=3, reps=4, no_e2e=True, json=True)
    assert all(isinstance(getattr(args, f[2:]), int) for f in POSITIVE)


@pytest.mark.parametrize("flag", POSITIVE)
@pytest.mark.parametrize("value, shown", [("0", "got 0"), ("-3", "got -3"), ("abc", "got 'abc'"),
                                          ("1.5", "got '1.5'")])
def test_positive_flags_reject_with_the_flag_named(flag, value, shown, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} must be a positive integer, {shown}" in err, err


def test_dtype_choices_match_the_e2e_dtypes(capsys):
    from cpo_fast.bench.e2e import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)
    assert {_parser().parse_args(["--dtype", d]).dtype for d in DTYPE_NAMES} == set(DTYPE_NAMES)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--dtype", "fp64"])
    assert "invalid choice: 'fp64'" in capsys.readouterr().err


def test_help_states_each_default_once_and_correctly():
    p = _parser()
    stated = {}
    for a in p._actions:
        if a.help is None or a.dest == "help":
            continue
        n = a.help.count("(default:")
        assert n <= 1, a.help
        if n:
            stated[a.dest] = re.search(r"\(default: ([^)]*)\)", a.help).group(1)
    assert set(stated) == {"vocab", "hidden", "tokens", "seq", "dtype", "frozen_head", "device",
                           "layers", "reps"}
    for dest in ("vocab", "hidden", "tokens", "seq", "dtype", "layers", "reps"):
        assert stated[dest] == str(p.get_default(dest)), dest
    assert stated["device"] == "cuda when available" and p.get_default("device") is None


def test_module_imports_without_torch():
    # Loaded on its own (not through the cpo_fast package, which imports torch): it needs
    # nothing beyond argparse, so every CLI command can build its parser cheaply.
    path = str(ROOT / "cpo_fast" / "bench" / "arguments.py")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('a', {path!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "import argparse; p = argparse.ArgumentParser(); m.add_arguments(p)\n"
            "print(p.parse_args([]).vocab, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["32000", "False"]
