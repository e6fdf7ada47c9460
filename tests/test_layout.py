"""The package's shape: imports point one way (math at the bottom), no cycles, small modules and functions."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "mnn_callback")
# The layers, bottom first: a module imports only from its own layer and the layers below it. The math
# (core's metrics, spectra, noise, accumulator) imports nothing of the package but itself and the errors.
LAYERS = ["core", "probing", "output", "monitoring", {"adapters", "posthoc"}, {"cli", "demo", "__main__"}]
MATH = {
    "core.metrics",
    "core.spectra",
    "core.noise",
    "core.accumulator",
    "core.uncertainty",
    "core.regime",
    "core.errors",
}


def modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name below it (``core.metrics``); ``__init__`` files excluded."""
    trees = {}
    for directory, _, names in os.walk(PACKAGE):
        for name in sorted(names):
            if name.endswith(".py") and name != "__init__.py":
                relative = os.path.relpath(os.path.join(directory, name[:-3]), PACKAGE)
                with open(os.path.join(directory, name), encoding="utf-8") as handle:
                    trees[relative.replace(os.sep, ".")] = ast.parse(handle.read())
    return trees


def package_imports(tree: ast.Module) -> set[str]:
    """Modules of the package that ``tree`` imports (at any depth: lazy imports count too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnn_callback"):
            inside = node.module.removeprefix("mnn_callback").lstrip(".")
            found.update(f"{inside}.{alias.name}".lstrip(".") for alias in node.names)
            found.add(inside)
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix("mnn_callback.")
                for alias in node.names
                if alias.name.startswith("mnn_callback.")
            )
    return found


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: package_imports(tree) & set(trees) - {name} for name, tree in trees.items()}


def layer(module: str) -> int:
    top = module.split(".")[0]
    return next(index for index, names in enumerate(LAYERS) if top in ({names} if isinstance(names, str) else names))


def test_every_module_is_in_a_layer():
    for name in modules():
        assert layer(name) >= 0, name


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
        for target in targets:
            assert layer(target) <= layer(name), f"{name} imports {target}, a layer above it"
            siblings = layer(target) == layer(name) == LAYERS.index({"adapters", "posthoc"})
            if siblings and name.split(".")[0] != target.split(".")[0]:
                pytest.fail(f"{name} imports {target}: the adapters and post hoc stay apart")


def code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body without its docstring (the signature is not counted)."""
    body = function.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:] or body
    return function.end_lineno - body[0].lineno + 1


def test_modules_and_functions_stay_small():
    for name, tree in modules().items():
        with open(os.path.join(PACKAGE, *name.split(".")) + ".py", encoding="utf-8") as handle:
            lines = len(handle.read().splitlines())
        assert lines <= 460, f"{name}.py has {lines} lines"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert code_lines(node) <= 60, f"{name}.{node.name} has {code_lines(node)} lines of code"
