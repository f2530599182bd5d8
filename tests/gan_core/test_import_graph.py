"""No import circle among the modules of gan_core, services and tuning.

A circle makes the outcome of an import depend on which module of it is imported first (a name
read from a module that is still half-initialised). The graph is read from the source with
``ast``: only imports that run when a module is imported count (module and class bodies, and the
blocks of ``if``/``try``/``with`` at that level); imports inside functions run later, once every
module is loaded, and ``if TYPE_CHECKING:`` blocks never run. Importing ``a.b.c`` also runs the
``__init__`` of ``a`` and ``a.b``, so those are edges too, except the packages that hold the
importing module itself (Python initialises them before it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gan_core", "services", "tuning")


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under the ``PACKAGES`` folders of ``root``."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(body: list[ast.stmt], all_levels: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when a module with this ``body`` is imported (every one when
    ``all_levels``, functions included)."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if all_levels:
                out += _import_nodes(node.body, all_levels)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            out += _import_nodes(node.orelse, all_levels)
        else:
            for name in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, name, None) or []:
                    block = (
                        child.body
                        if isinstance(child, ast.ExceptHandler | ast.match_case)
                        else [child]
                    )
                    out += _import_nodes(block, all_levels)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path = ROOT, all_levels: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of ``PACKAGES`` its import runs."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text()).body, all_levels):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            # "from package import name" runs the submodule when name is one.
            targets.update(f"{base}.{alias.name}" for alias in node.names)
        own = set(_ancestors(name)) | ({name} if is_package else set())
        edges: set[str] = set()
        for target in targets:
            for hit in [*_ancestors(target), target]:
                if hit in modules and hit not in own and hit != name:
                    edges.add(hit)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
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
    return sorted(found)


def test_the_graph_sees_module_level_imports_only(tmp_path: Path) -> None:
    """A hand-made package: a circle through a function-level import is not one, one through a
    parent package's __init__ is, and a TYPE_CHECKING import is skipped."""
    pkg = tmp_path / "gan_core"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from gan_core.sub.leaf import X\n")
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from gan_core.sub.leaf import X\n"
        "if TYPE_CHECKING:\n    from gan_core import b\n"
        "def f():\n    from gan_core import b\n"
    )
    (pkg / "b.py").write_text("try:\n    from . import a\nexcept ImportError:\n    pass\n")
    graph = import_graph(tmp_path)
    assert graph["gan_core.a"] == {"gan_core.sub", "gan_core.sub.leaf"}
    assert graph["gan_core.b"] == {"gan_core.a"}
    assert graph["gan_core.sub"] == {"gan_core.sub.leaf"}
    assert graph["gan_core.sub.leaf"] == set()
    assert cycles(graph) == []
    assert cycles(import_graph(tmp_path, all_levels=True)) == [["gan_core.a", "gan_core.b"]]
    # A leaf that imports its package's sibling through the package's __init__ closes a circle.
    (pkg / "sub" / "leaf.py").write_text("from gan_core import a\nX = 1\n")
    assert cycles(import_graph(tmp_path)) == [["gan_core.a", "gan_core.sub", "gan_core.sub.leaf"]]


def test_no_import_circle_in_gan_core_services_tuning() -> None:
    graph = import_graph()
    assert "gan_core.config.schema" in graph  # the walk found the config package
    assert cycles(graph) == []


def test_config_schema_imports_nothing_of_raygan() -> None:
    """nets and footprint read the schema; the schema must not lead back to them."""
    assert import_graph(all_levels=True)["gan_core.config.schema"] == set()
