"""The package's layers (docs/architecture.md sections 1 and 2), checked on the source (with
``ast``): no module imports from a layer above its own, anywhere in its body; the
module-level imports have no cycle; and every ``cpo_fast`` import in the tree resolves."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cpo_fast"

# Lowest first; a module's layer is that of the longest prefix listed. The estimators and
# the collectives are plain tensor math and sit below the ops only because the float64
# reference (the ops' fallback backend) also holds the estimators' ground truth.
LAYERS: list[tuple[str, ...]] = [
    ("cpo_fast.constants", "cpo_fast._checks", "cpo_fast._transform", "cpo_fast.distributed",
     "cpo_fast.estimators"),
    ("cpo_fast._backend", "cpo_fast._linear_common", "cpo_fast._C", "cpo_fast.reference",
     "cpo_fast.cpu", "cpo_fast.kernels", "cpo_fast.ops"),
    ("cpo_fast.models", "cpo_fast.objectives", "cpo_fast.effective_batch",
     "cpo_fast.hf", "cpo_fast.judges", "cpo_fast.pretrained",
     "cpo_fast.integrations", "cpo_fast"),
    ("cpo_fast.pipeline.run",),
    ("cpo_fast.pipeline.stages",),
    ("cpo_fast.pipeline.training",),
    ("cpo_fast.pipeline.report",),
    ("cpo_fast.trl", "cpo_fast.bench", "cpo_fast.cli", "cpo_fast.__main__"),
]


def layer(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module}: not in LAYERS (add it to its layer)"
    return found


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _absolute(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level(body: list[ast.stmt]):
    """Statements that run at import: the body, into if/try blocks, not into defs."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            nested = node.body + node.orelse + getattr(node, "finalbody", [])
            nested += [s for h in getattr(node, "handlers", []) for s in h.body]
            yield from _top_level(nested)


def imports(module: str, path: Path, *, top_level_only: bool) -> set[str]:
    """The cpo_fast modules ``module`` imports (``from a import b`` counts ``a.b`` when that
    is a module, else ``a``); imports under ``if TYPE_CHECKING`` are skipped."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    known = set(modules()) | {"cpo_fast._C"}  # the extension module
    found: set[str] = set()
    for node in (_top_level(tree.body) if top_level_only else ast.walk(tree)):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cpo_fast"))
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(node, module, path.name == "__init__.py")
            if src.startswith("cpo_fast"):
                for a in node.names:
                    found.add(f"{src}.{a.name}" if f"{src}.{a.name}" in known else src)
    found.discard(module)
    return found


def test_every_module_has_a_layer():
    for m in modules():
        layer(m)


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_import_from_a_layer_above(module):
    path = modules()[module]
    mine = layer(module)
    above = sorted(m for m in imports(module, path, top_level_only=False) if layer(m) > mine)
    assert not above, f"{module} (layer {mine}) imports from a layer above: {above}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None. An edge from a submodule to its own
    package (``a.b -> a``: the package's __init__ runs first anyway) is not a cycle."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def dfs(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := dfs(n, stack + [n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := dfs(m, [m])):
            return found
    return None


def test_no_import_cycle_at_module_level():
    mods = modules()
    graph = {m: {i for i in imports(m, p, top_level_only=True) if i in mods}
             for m, p in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p.x": {"p"}, "p": {"p.x"}}) is None


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """A test that cannot fail is a defect: an upward import in a fake module is caught."""
    fake = tmp_path / "objectives.py"
    fake.write_text("def f():\n    from cpo_fast.pipeline.run.config import RunConfig\n")
    found = imports("cpo_fast.objectives", fake, top_level_only=False)
    assert "cpo_fast.pipeline.run.config" in found
    assert layer("cpo_fast.pipeline.run.config") > layer("cpo_fast.objectives")


# Where an import may sit inside a function. Third-party modules may (optional dependencies:
# triton, trl, peft, the judges; heavy ones loaded at first use: transformers, matplotlib);
# the package's own modules and the standard library are imported at the top, except here:
LAZY_OWN = {
    "cpo_fast._backend": "the dispatch table's loaders (a backend module imports Triton or "
                         "the C++ core) and the probe of the optional core",
    "cpo_fast.cpu": "the C++ core may be unbuilt",
    "cpo_fast.bench.environment": "the probe of the optional core",
}
LAZY_STDLIB = {
    "cpo_fast.bench.isolation": "the fork server decides what its processes import, and when",
}


def function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function of ``path``."""
    found = []
    for f in ast.walk(ast.parse(path.read_text())):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(f):
                if isinstance(n, ast.Import):
                    found += [(n.lineno, a.name) for a in n.names]
                elif isinstance(n, ast.ImportFrom) and n.level == 0:
                    found.append((n.lineno, n.module or ""))
    return found


def misplaced_imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of the imports inside functions of ``path`` that name the package or
    the standard library and are not allowed by LAZY_OWN / LAZY_STDLIB."""
    return [(line, name) for line, name in function_imports(path)
            if (name.split(".")[0] == "cpo_fast" and module not in LAZY_OWN)
            or (name.split(".")[0] in sys.stdlib_module_names and module not in LAZY_STDLIB)]


def test_imports_sit_at_the_top_of_the_module():
    """A reader sees a module's dependencies in its first lines: no import of the package or
    the standard library hides in a function body (the exceptions say why)."""
    bad = [f"{p.relative_to(ROOT)}:{line}: {name}" for m, p in sorted(modules().items())
           for line, name in misplaced_imports(m, p)]
    assert not bad, "move these imports to the top of the module:\n" + "\n".join(bad)


def test_the_import_placement_check_sees_a_violation(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text("import os\n\n\ndef f():\n    import json\n    from cpo_fast import models\n"
                    "    import triton\n")
    assert misplaced_imports("cpo_fast.objectives", fake) == [(5, "json"), (6, "cpo_fast")]
    assert misplaced_imports("cpo_fast._backend", fake) == [(5, "json")]
    assert misplaced_imports("cpo_fast.bench.isolation", fake) == [(6, "cpo_fast")]


# Source modules tested elsewhere than tests/<path>/test_<module>.py, and why.
TESTED_WITH: dict[str, str] = {
    "cpo_fast.cpu.linear_token_logprobs": "tests/ops/test_linear_token_logprobs.py (each backend "
                                          "against the float64 reference, by op)",
    "cpo_fast.cpu.token_logprobs": "tests/ops/test_token_logprobs.py (by op)",
}


def own_test_file(module: str, path: Path) -> Path:
    """tests/<path>/test_<module>.py of ``cpo_fast/<path>/<module>.py`` (a leading underscore
    dropped: _backend.py -> test_backend.py); a package's __init__ and __main__ have none."""
    rel = path.relative_to(PKG)
    return ROOT / "tests" / rel.parent / f"test_{rel.stem.lstrip('_')}.py"


def untested(mods: dict[str, Path]) -> list[str]:
    """The modules with code but neither a test module of their own nor a TESTED_WITH entry."""
    return [m for m, p in sorted(mods.items())
            if p.name not in ("__init__.py", "__main__.py") and m not in TESTED_WITH
            and not own_test_file(m, p).is_file()]


def test_every_module_has_its_test_module():
    """Tests are laid out like the source (docs/architecture.md, section 6)."""
    for m, where in TESTED_WITH.items():
        assert Path(ROOT / where.split()[0]).is_file() and m in modules(), (m, where)
    missing = untested(modules())
    assert not missing, "add " + ", ".join(
        str(own_test_file(m, modules()[m]).relative_to(ROOT)) for m in missing)


def test_the_layout_check_sees_a_missing_test_module():
    fake = {"cpo_fast.nowhere": PKG / "nowhere.py", "cpo_fast.objectives": PKG / "objectives.py",
            "cpo_fast.ops": PKG / "ops" / "__init__.py",
            "cpo_fast.cpu.token_logprobs": PKG / "cpu" / "token_logprobs.py"}
    assert untested(fake) == ["cpo_fast.nowhere"]
    assert own_test_file("cpo_fast._backend", PKG / "_backend.py") == ROOT / "tests/test_backend.py"


def test_every_cpo_fast_import_in_the_tree_resolves():
    """``from cpo_fast.x import y`` in the package, tests, benchmarks, scripts and examples
    names a module and a name that exist (a moved module breaks a script that no test runs)."""
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in {"cpo_fast", "kernels", "tests", "benchmarks", "scripts",
                                "examples"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [(node.module or "", a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                names = [(a.name, None) for a in node.names]
            else:
                continue
            for mod, name in names:
                if not mod.startswith("cpo_fast") or mod == "cpo_fast._C":
                    continue
                try:
                    m = importlib.import_module(mod)
                except ImportError as e:
                    missing.append(f"{rel}:{node.lineno}: {mod} ({e})")
                    continue
                if name and name != "*" and not hasattr(m, name) \
                        and importlib.util.find_spec(f"{mod}.{name}") is None:
                    missing.append(f"{rel}:{node.lineno}: {mod}.{name}")
    assert not missing, "\n".join(missing)
