"""The project defines one top-level import name, ``cpo_fast``, and shadows nothing installed.

Run from the repository root (as ``python -m pytest``, ``python -m cpo_fast`` and ``python -c``
do, with the root first on ``sys.path``), a top-level folder with an ``__init__.py`` or a
``.py`` file would be imported instead of an installed distribution of the same name:
transformers 5.25 imports Hugging Face's ``kernels``, which a regular package ``kernels/`` here
used to replace, breaking transformers' model classes and TRL.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A build script every setuptools project has; not a module anyone imports.
BUILD_SCRIPTS = {"setup"}


def _import_names(folder: Path) -> set[str]:
    """Names `import NAME` finds in ``folder`` when it is on sys.path: regular packages and
    modules (a folder without __init__.py is a namespace portion, which never shadows)."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.name.split(".")[0] for p in folder.glob("*.so")}
    return names


def _installed_names() -> set[str]:
    """Top-level import names of every installed distribution, and the standard library's."""
    names = set(importlib.metadata.packages_distributions())
    return names | set(sys.stdlib_module_names)


def test_repo_root_defines_only_cpo_fast():
    assert _import_names(ROOT) - BUILD_SCRIPTS == {"cpo_fast"}
    assert not (ROOT / "kernels" / "__init__.py").exists()


@pytest.mark.parametrize("folder", ["tests", "benchmarks", "scripts", "examples"])
def test_helper_folders_shadow_nothing(folder: str):
    """pytest and the benchmark scripts put these folders on sys.path; none of their module
    names may be that of an installed distribution or a standard-library module."""
    path = ROOT / folder
    if not path.is_dir():
        pytest.skip(f"no {folder}/")
    assert not (path / "__init__.py").exists(), f"{folder}/ would be the import name {folder!r}"
    clash = _import_names(path) & _installed_names()
    assert not clash, f"{folder}/ shadows installed or standard modules: {sorted(clash)}"


def _from_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_installed_kernels_wins_from_the_repo_root():
    try:  # the distribution, not the name: from the root `kernels/` itself is importable
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed")
    r = _from_root("import kernels, pathlib, sys; f = pathlib.Path(kernels.__file__ or '');"
                   "own = pathlib.Path.cwd() / 'kernels';"
                   "sys.exit(0 if f.is_file() and own not in f.resolve().parents else 1)")
    assert r.returncode == 0, r.stderr[-2000:]


def test_transformers_and_trl_import_from_the_repo_root():
    pytest.importorskip("transformers")
    code = "from transformers import LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel\n"
    if importlib.util.find_spec("trl") is not None:
        code += "import trl, trl.trainer.utils\nimport cpo_fast.integrations.trl as t\nt._trl_utils()\n"
    r = _from_root(code)
    assert r.returncode == 0, r.stderr[-2000:]


def test_python_m_cpo_fast_help_from_the_repo_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for argv in (["--help"], ["train", "--help"]):
        r = subprocess.run([sys.executable, "-m", "cpo_fast", *argv], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "cpo-fast" in r.stdout


def test_trl_message_names_the_real_cause(monkeypatch):
    """TRL installed but broken on import: the error says why, not 'install TRL'."""
    pytest.importorskip("trl")
    import cpo_fast.integrations.trl as cpo_trl

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "trl.trainer.utils":
                raise ImportError("cannot import name 'X' from 'kernels'")
            return None

    for mod in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(ImportError, match="installed but does not import.*cannot import name"):
        cpo_trl._trl_utils()
