"""No import circles inside st_bitnet: the module graph (module-level and function-level imports) is acyclic."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "st_bitnet"


def _modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: {st_bitnet modules it imports}}``, every ``import`` statement counted (lazy ones too).

    ``from pkg import name`` points at the submodule ``pkg.name`` when there is one, else at ``pkg`` itself (its
    ``__init__``); parents implicitly imported on the way to a submodule are not edges.
    """
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                for alias in node.names:
                    target = f"{prefix}.{alias.name}"
                    edges.add(target if target in modules else prefix)
        edges.discard(name)
        graph[name] = {e for e in edges if e in modules}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_st_bitnet_has_no_import_circles():
    cycles = find_cycles(import_graph())
    details = [" <-> ".join(c) for c in cycles]
    assert not cycles, "import circles inside st_bitnet:\n" + "\n".join(details)


def test_the_checker_sees_circles(tmp_path):
    package = tmp_path / "st_bitnet"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("def f():\n    from .sub import b  # lazy imports count too\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from st_bitnet.a import f\n")
    (package / "c.py").write_text("import st_bitnet.sub.b\n")
    graph = import_graph(package)
    assert graph["st_bitnet.c"] == {"st_bitnet.sub.b"} and graph["st_bitnet"] == {"st_bitnet.a"}
    assert find_cycles(graph) == [["st_bitnet.a", "st_bitnet.sub.b"]]
