"""The package's seams: no import cycle between its modules, each module imports on its own, and one
version number."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bleep_rs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "bleep_rs"


def _modules() -> dict:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict:
    """Module -> the package modules it imports anywhere in its source (function-level imports too:
    a cycle through a lazy import is still a cycle of dependencies). The package's ``__init__``
    (``from . import __version__``) is left out: it imports no module that imports back by name."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join((package[: len(package) - node.level + 1] if node.level else []) + [node.module or ""]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t not in (mod, "bleep_rs"):
                    graph[mod].add(t)
    return graph


def _reach(graph: dict, start: str) -> set:
    reach, stack = {start}, [start]
    while stack:
        for w in graph[stack.pop()]:
            if w not in reach:
                reach.add(w)
                stack.append(w)
    return reach


def cycles(graph: dict) -> list:
    """The groups of more than one module that import each other, directly or not."""
    reach = {m: _reach(graph, m) for m in graph}
    groups = {frozenset(m for m in reach[start] if start in reach[m]) for start in graph}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert {"bleep_rs.cli", "bleep_rs.training", "bleep_rs.demo"} <= set(graph)
    assert "bleep_rs.training" in graph["bleep_rs.cli"] and "bleep_rs.training" in graph["bleep_rs.demo"]
    assert cycles(graph) == []


@pytest.mark.slow
@pytest.mark.parametrize("module", ["bleep_rs.cli", "bleep_rs.training", "bleep_rs.demo"])
def test_each_module_imports_fresh(module):
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_version_has_one_source():
    """Cargo.toml's workspace version, the Rust crates' and (through maturin) the package's, which reads it
    from its installed metadata; pyproject.toml declares it dynamic."""
    cargo = (ROOT / "Cargo.toml").read_text()
    stated = re.search(r'^\[workspace\.package\]\nversion = "([^"]+)"', cargo, re.M).group(1)
    assert bleep_rs.__version__ == stated
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()
    assert not re.search(r"^version\s*=", (ROOT / "pyproject.toml").read_text(), re.M)
    literal = re.compile(r"""__version__\s*=\s*["']""")
    assert not [f.name for f in PACKAGE.rglob("*.py") if literal.search(f.read_text())]
    res = subprocess.run([sys.executable, "-m", "bleep_rs", "--version"], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == f"bleep-rs {stated}"


def in_fresh_interpreter(code: str) -> None:
    """Runs ``code`` in a new Python process (what it imports is its own) and checks it succeeded."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_public_names_stay_what_they_are_after_any_import():
    """Importing a submodule binds its name on the package: no public function may share a submodule's
    name (bleep_rs.train was once replaced by the module bleep_rs/train.py that way)."""
    code = ("import importlib, pkgutil, bleep_rs\n"
            "for m in pkgutil.walk_packages(bleep_rs.__path__, 'bleep_rs.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "import types\n"
            "bad = [n for n in bleep_rs.__all__ if isinstance(getattr(bleep_rs, n), types.ModuleType)]\n"
            "assert not bad and callable(bleep_rs.train), bad\n")
    in_fresh_interpreter(code)


def test_the_command_line_and_the_training_config_start_without_torch():
    """The library apart from the training application: the command line and TrainConfig (the train
    flags) import no torch; bleep_rs.train does, on first use."""
    code = ("import sys, bleep_rs.cli\n"
            "from bleep_rs.training import TrainConfig\n"
            "TrainConfig(epochs=2)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import bleep_rs\n"
            "bleep_rs.train\n"
            "assert 'torch' in sys.modules\n")
    in_fresh_interpreter(code)
