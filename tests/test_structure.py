"""The package's shape, as rules: no import circle, the napari side on top, no method switch outside
``methods/``, no function over 100 lines and no class over 300.

The import graph is read from the source (every ``import`` statement, at module level or inside a
function), so a circle that a lazy import hides at run time is still a circle here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import napari_coarseseg
from napari_coarseseg.methods import METHODS

PACKAGE = "napari_coarseseg"
ROOT = Path(napari_coarseseg.__file__).parent
NAPARI_SIDE = {f"{PACKAGE}._viewer", f"{PACKAGE}._live_viewer", f"{PACKAGE}._widgets"}
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 100, 300


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in SOURCES.items()}


def imported_modules(name: str, tree: ast.AST) -> set[str]:
    """The package's modules that ``name`` imports (a package stands for its ``__init__``)."""
    is_package = SOURCES[name].name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from . import io` imports a module, `from .io import X` a name
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in SOURCES else source)
    return {module for module in found if module in SOURCES and module != name}


GRAPH = {name: imported_modules(name, tree) for name, tree in TREES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_is_read_from_every_module():
    assert {f"{PACKAGE}.methods", f"{PACKAGE}.methods._loop", f"{PACKAGE}.cli"} <= set(GRAPH)
    assert f"{PACKAGE}.methods._loop" in GRAPH[f"{PACKAGE}.methods.refineseg"]
    assert f"{PACKAGE}.inference" in GRAPH[f"{PACKAGE}.methods.refineseg"]
    assert f"{PACKAGE}._viewer" in GRAPH[PACKAGE]  # the lazy __getattr__ import counts too


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere_in_the_package():
    assert cycles(GRAPH) == []


def test_the_inference_engine_and_the_file_format_know_no_method():
    for engine in ("inference", "model_io", "data", "training", "checkpoint", "networks"):
        imports = GRAPH[f"{PACKAGE}.{engine}"]
        assert not {m for m in imports if m.startswith(f"{PACKAGE}.methods")}, engine


def test_the_core_never_imports_the_napari_side():
    # The package root's lazy __getattr__ hands out train_in_viewer and predict_in_viewer: the one exception.
    for name, imports in GRAPH.items():
        if name not in NAPARI_SIDE | {PACKAGE}:
            assert not imports & NAPARI_SIDE, f"{name} imports {imports & NAPARI_SIDE}"


def test_no_method_name_is_compared_outside_methods():
    names = set(METHODS)
    offenders = []
    for module, tree in TREES.items():
        if module.startswith(f"{PACKAGE}.methods"):
            continue
        for node in ast.walk(tree):
            compared = []
            if isinstance(node, ast.Compare):
                for operand in [node.left, *node.comparators]:
                    compared += operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            elif isinstance(node, ast.Dict):
                compared = [key for key in node.keys if key is not None]
            elif isinstance(node, ast.match_case):
                compared = [n for n in ast.walk(node.pattern) if isinstance(n, ast.Constant)]
            if any(isinstance(c, ast.Constant) and c.value in names for c in compared):
                offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


def sizes(kind) -> list[tuple[int, str]]:
    return sorted(((node.end_lineno - node.lineno + 1, f"{module}.{node.name}")
                   for module, tree in TREES.items() for node in ast.walk(tree) if isinstance(node, kind)),
                  reverse=True)


@pytest.mark.parametrize("kind, limit", [((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES),
                                         (ast.ClassDef, MAX_CLASS_LINES)])
def test_no_function_over_100_lines_and_no_class_over_300(kind, limit):
    measured = sizes(kind)
    assert measured, "nothing measured"
    assert [(lines, name) for lines, name in measured if lines > limit] == []


def test_every_subpackage_is_listed_for_installation():
    """A subpackage missing from setup.cfg's ``packages`` imports from the source tree and not once installed."""
    import configparser

    setup_cfg = ROOT.parent / "setup.cfg"
    if not setup_cfg.is_file():
        pytest.skip("an installed copy: no setup.cfg beside the package")
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    listed = set(config["options"]["packages"].split())
    subpackages = {name for name, path in SOURCES.items() if path.name == "__init__.py"}
    assert f"{PACKAGE}.methods" in subpackages
    assert subpackages - listed == set()
