"""The package's import graph has no cycle, function-level imports included.

Every ``import`` and ``from … import`` statement of every module of ``bsafe_data`` (at any depth: in
functions, methods, ``try`` blocks; not under ``if TYPE_CHECKING:``, which never runs) is an edge to
the module it names; importing ``a.b.c`` also imports the packages ``a.b`` (except for a module
inside that package: it is already being imported). A cycle means some module can only work
because another is half-imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "bsafe_data"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importer's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return [n for n in names if n.split(".")[0] == "bsafe_data"]


def _statements(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            typing_only = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            if not typing_only:
                todo.append(child)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (every statement, any depth)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _statements(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, name, is_package, known):
                while target and target not in known:  # an attribute of a module: the module
                    target = target.rpartition(".")[0]
                parts = target.split(".")
                for depth in range(2, len(parts)):  # the packages on the way, outside our own
                    parent = ".".join(parts[:depth])
                    if not name.startswith(parent + ".") and name != parent:
                        edges.add(parent)
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_walker_sees_function_level_imports_and_cycles():
    """The walker itself: an import inside a function is an edge, and a two-module loop is found."""
    graph = import_graph()
    assert "bsafe_data.registry" in graph["bsafe_data.cli"]  # cli imports it at module level
    assert "bsafe_data.pipeline" in graph["bsafe_data.cli"]  # … and this inside `build`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
