"""No import cycle anywhere in python/otterfast (docs/architecture.md: imports only point down).

Every module's imports are read with `ast`, at module level and inside functions (a lazy import runs too, later):
`import otterfast.x`, `from otterfast.x import y`, `from . import y`, `from ..x import y`, and `__import__` /
`importlib.import_module` of a literal name. Each becomes an edge to the module it names (to `x.y` when `y` is a
submodule, else to `x`, a package meaning its `__init__.py`). A lazy import that points up (the CLI importing every
area) is fine on its own; a cycle is A importing B and B importing A, directly or through others. Imports under
`if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
import os

PKG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "otterfast")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py under python/otterfast (a package as its __init__.py)."""
    out = {}
    root = os.path.dirname(PKG_DIR)
    for dirpath, dirnames, filenames in os.walk(PKG_DIR):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _dynamic_import(node: ast.AST) -> str | None:
    """The module of `__import__("otterfast.x", ...)` or `importlib.import_module("otterfast.x")`, else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    arg = node.args[0]
    if name in ("__import__", "import_module") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _dynamic_import(node):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _edges(name: str, path: str, modules: dict[str, str]) -> list[tuple[str, int]]:
    """(imported module, line) for each package-internal import of one module."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Call):
            targets = [_dynamic_import(node)]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules and "." in t:  # `import otterfast.x.y` where only otterfast.x is ours
                t = t.rpartition(".")[0]
            if t in modules and t != name:
                out.append((t, node.lineno))
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {module it imports: the first line that does}."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        graph[name] = {}
        for t, line in _edges(name, path, modules):
            graph[name].setdefault(t, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a closed path of modules) per strongly connected component that has one (Tarjan)."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in sccs:  # a shortest closed path through the component's first module, by breadth-first search
        start = min(comp)
        prev, frontier, path = {start: None}, [start], None
        while frontier and path is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        path = [v]
                        while prev[path[-1]] is not None:
                            path.append(prev[path[-1]])
                        break
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if path is not None:
                    break
            frontier = nxt
        cycles.append([start] + path[::-1][1:] + [start])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n    ".join(steps)


def test_graph_sees_module_level_and_lazy_imports():
    g = import_graph()
    assert "otterfast.data.prompts" in g["otterfast.generate.templates"]  # module level, `from ..data.prompts`
    assert "otterfast.train.cli" in g["otterfast.cli"]  # `from .train import cli as train_cli`: the submodule
    assert "otterfast.train.loop" in g["otterfast.train.cli"]  # inside a function
    assert "otterfast.config" in g["otterfast.train.config"]


def test_dynamic_imports_are_edges_too():
    call = ast.parse('__import__("otterfast.train.cli", fromlist=["register"])').body[0].value
    assert _dynamic_import(call) == "otterfast.train.cli"
    assert _dynamic_import(ast.parse('importlib.import_module("otterfast.eval")').body[0].value) == "otterfast.eval"


def test_find_cycles_reports_the_cycle():
    g = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    assert find_cycles(g) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_otterfast():
    g = import_graph()
    cycles = find_cycles(g)
    assert not cycles, "import cycles (imports must only point down, docs/architecture.md):\n  " + \
        "\n  ".join(_describe(c, g) for c in cycles)
