"""The package's shape: imports point one way (math at the bottom), no cycles, small modules and functions."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "mnn_callback")
# The bottom layer: pure math on tensors, importing nothing of the package but each other and the errors.
MATH = {"metrics", "spectra", "noise", "accumulator", "errors"}
# Adapters on top: nothing in the package imports them (the CLI and the demo are entry points).
TOP = {"callback", "accelerate_hook", "cli", "demo", "__main__"}


def modules() -> dict[str, ast.Module]:
    trees = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE, name), encoding="utf-8") as handle:
                trees[name[:-3]] = ast.parse(handle.read())
    return trees


def package_imports(tree: ast.Module) -> set[str]:
    """Modules of the package that ``tree`` imports (at any depth: lazy imports count too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnn_callback"):
            if node.module == "mnn_callback":
                found.update(alias.name for alias in node.names)
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("mnn_callback."))
    return found


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: package_imports(tree) & set(trees) - {name} for name, tree in trees.items() if name != "__init__"}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in graph.get(node, ()):
            if state.get(target) == "open":
                pytest.fail(f"import cycle: {' -> '.join([*path, node, target])}")
            if target not in state:
                visit(target, [*path, node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_math_at_the_bottom_adapters_on_top():
    graph = import_graph()
    for name in MATH:
        assert graph[name] <= MATH, f"{name} imports {graph[name] - MATH}"
    for name, targets in graph.items():
        if name not in ("cli", "__main__"):
            assert not targets & (TOP - {"callback"} if name == "demo" else TOP), f"{name} imports {targets & TOP}"


def code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body without its docstring (the signature is not counted)."""
    body = function.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:] or body
    return function.end_lineno - body[0].lineno + 1


def test_modules_and_functions_stay_small():
    for name, tree in modules().items():
        with open(os.path.join(PACKAGE, f"{name}.py"), encoding="utf-8") as handle:
            lines = len(handle.read().splitlines())
        assert lines <= 460, f"{name}.py has {lines} lines"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert code_lines(node) <= 60, f"{name}.{node.name} has {code_lines(node)} lines of code"
