"""The type stubs of the compiled module (python/bleep_rs/_core.pyi) name exactly what it has."""

import ast
import inspect
from pathlib import Path

import bleep_rs
from bleep_rs import _core


def stub_names():
    tree = ast.parse((Path(bleep_rs.__file__).parent / "_core.pyi").read_text())
    top, members = set(), {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            top.add(node.target.id)
    return top, members


def test_stub_matches_module():
    top, members = stub_names()
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert top == public
    for cls, names in members.items():
        actual = {n for n, _ in inspect.getmembers(getattr(_core, cls)) if not n.startswith("_")}
        if cls == "BleepError":
            continue
        assert names == actual, cls


def test_stub_signatures_match():
    tree = ast.parse((Path(bleep_rs.__file__).parent / "_core.pyi").read_text())

    def check(fn, obj):
        stub_params = [a.arg for a in fn.args.args if a.arg != "self"]
        sig = inspect.signature(obj)
        assert stub_params == [p for p in sig.parameters if p != "self"], fn.name

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            check(node, getattr(_core, node.name))
        elif isinstance(node, ast.ClassDef) and node.name != "BleepError":
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and not any(
                    isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list
                ):
                    check(fn, getattr(getattr(_core, node.name), fn.name))
