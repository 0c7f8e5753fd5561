"""The package's structure, read from its own imports (module-level and function-level alike): no import circle,
and no import from a lower layer up to a higher one. The layers are listed in ``prmkit/__init__.py``'s docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "prmkit"

# Lowest first. A module belongs to the layer of the longest prefix that names it; it may import its own layer
# (without a circle) and any layer below.
LAYERS: list[tuple[str, ...]] = [
    ("prmkit.errors", "prmkit.core"),
    ("prmkit.tokenization", "prmkit.metrics"),
    ("prmkit.kinds", "prmkit.data.formats", "prmkit.data.split_spec"),
    ("prmkit.config",),
    ("prmkit.data",),
    ("prmkit.models",),
    ("prmkit.scoring", "prmkit.hub"),
    ("prmkit.training", "prmkit.evaluation", "prmkit.serve"),
    ("prmkit.api",),
    ("prmkit.cli", "prmkit.__main__"),
    ("prmkit",),
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(modules: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported prmkit module, line)}; ``from pkg import name`` counts as ``pkg.name`` when that is a
    module, else as ``pkg``."""
    edges: dict[str, set[tuple[str, int]]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while (
                    target and target not in modules
                ):  # `import prmkit.a.b` names prmkit.a.b; a class in it, its module
                    target = target.rpartition(".")[0]
                if target.startswith("prmkit") and target != name:
                    edges[name].add((target, node.lineno))
    return edges


def layer(module: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def cycles(edges: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {m: sorted({t for t, _ in ts}) for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def edges():
    return imports(module_names())


def test_every_module_has_a_layer():
    assert [m for m in module_names() if layer(m) < 0] == []


def test_no_import_circles(edges):
    assert cycles(edges) == []


def test_no_import_from_a_lower_layer_up(edges):
    upward = sorted(
        f"{m}:{line} imports {t}" for m, ts in edges.items() for t, line in ts if m != "prmkit" and layer(t) > layer(m)
    )
    assert upward == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The checks above are not vacuous: a circle and an arrow up, hidden in function-level imports, are found."""
    edges = {
        "prmkit.core.a": {("prmkit.core.b", 3)},
        "prmkit.core.b": {("prmkit.core.a", 9)},
        "prmkit.data.x": {("prmkit.cli.app", 5)},
    }
    assert cycles(edges) == [["prmkit.core.a", "prmkit.core.b"]]
    assert layer("prmkit.data.x") < layer("prmkit.cli.app")
    src = tmp_path / "prmkit" / "core"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text("def f():\n    from prmkit.core import b\n")
    (src / "b.py").write_text("from .a import f\n")
    names = {"prmkit.core": src / "__init__.py", "prmkit.core.a": src / "a.py", "prmkit.core.b": src / "b.py"}
    assert cycles(imports(names)) == [["prmkit.core.a", "prmkit.core.b"]]
