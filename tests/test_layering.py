"""Imports point down the layers (data -> runtime -> training | inference -> api -> cli | serving),
also inside functions, and no two packages import each other, even through others.

The source is read with `ast` (nothing is imported), so a lazy import inside a function counts
exactly like one at the top of a module.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "keeneye"

#: package (first name below keeneye) -> packages it must never import
FORBIDDEN = {
    **{low: {"training", "inference", "api", "cli", "serving"} for low in ("data", "model", "runtime")},
    "inference": {"training", "api", "cli", "serving"},
    "training": {"inference", "api", "cli", "serving"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every keeneye import in a file, at any depth."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]  # `from keeneye import api`
    return [(name, line) for name, line in found if name == "keeneye" or name.startswith("keeneye.")]


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@functools.lru_cache(maxsize=1)
def _edges() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> ["module:line", ...] (imports within a package left out)."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(SRC.rglob("*.py")):
        source = _package(_module_name(path))
        for name, line in _imported(path):
            target = _package(name)
            if source and target and target != source and ((SRC / f"{target}.py").exists() or (SRC / target).is_dir()):
                where = f"{path.relative_to(SRC)}:{line}"
                if where not in edges[source][target]:
                    edges[source][target].append(where)
    return edges


def test_the_walk_sees_imports_inside_functions():
    """The checker itself: a lazy import in a function body is found (else the test could not fail)."""
    lazy = [name for name, _ in _imported(SRC / "cli.py") if name.startswith("keeneye.inference")]
    assert lazy, "cli.py imports the inference layer inside its commands; the walk must see it"
    assert _package("keeneye.runtime.engines") == "runtime" and _package("keeneye") is None


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package):
    edges = _edges()
    assert package in edges or package == "runtime", f"no imports found for {package}: is the walk broken?"
    wrong = {target: where for target, where in edges.get(package, {}).items() if target in FORBIDDEN[package]}
    assert not wrong, f"keeneye.{package} imports layers above it: {dict(wrong)}"


def _cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_packages():
    edges = _edges()
    cycles = _cycles(edges)
    detail = {
        " <-> ".join(cycle): {f"{a} -> {b}": edges[a][b][:3] for a in cycle for b in cycle if b in edges.get(a, {})}
        for cycle in cycles
    }
    assert not cycles, f"packages importing each other: {detail}"
