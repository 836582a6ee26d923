"""The confounding comparison on real data: EmoBank with genre as the confounder.

f_0, SFT-all, SFT-top, OO-RLHF, CPO and DR-CPO trained on a genre-confounded selection of
EmoBank (valence as the outcome; cpo_fast/bench/emobank.py), judged by VADER, a
lexicon-and-rules sentiment analyzer that was never fitted to EmoBank (``pip install
'cpo_fast[bench]'``). Writes ``benchmarks/results/emobank.{md,json,png}``.

    python benchmarks/reproduce_emobank.py              # confounding 0.8, 3 seeds, 2000 rows
    python benchmarks/reproduce_emobank.py --quick

EmoBank is read from ``../shared/data/emobank.csv`` relative to the project root (or the
``EMOBANK_CSV`` environment variable); when it is absent the script says so and exits 0.
Other flags are those of benchmarks/reproduce.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def emobank_path() -> Path | None:
    for p in (os.environ.get("EMOBANK_CSV"), ROOT.parent / "shared" / "data" / "emobank.csv"):
        if p and Path(p).is_file():
            return Path(p)
    return None


def main(argv: list[str] | None = None):
    path = emobank_path()
    if path is None:
        print("[emobank] EmoBank not found (../shared/data/emobank.csv or $EMOBANK_CSV): "
              "skipped.")
        return None
    spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).with_name(
        "reproduce.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = list(argv or [])
    if "--levels" not in argv:
        argv += ["--levels", "0.8"]
    return mod.main(["--emobank", str(path), *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
