"""The package's import structure, read with ast (nothing imported): imports point down the layers of
``covidcxr/_layers.py`` (never up, never in a circle), no covidcxr module imports another inside a
function (except the documented facade), and no module but ``tasks.py`` compares a task's name."""
from __future__ import annotations

import ast
from pathlib import Path

from covidcxr._layers import FACADE, LAYERS, layer_of

ROOT = Path(__file__).resolve().parents[1] / "covidcxr"
TASK_NAMES = ("classify", "segment", "multitask")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


MODS = _modules()


def _targets(mod: str, node) -> list[str]:
    """The covidcxr modules an import statement loads (``from covidcxr import cli`` -> covidcxr.cli)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = mod.split(".") if MODS[mod].name == "__init__.py" else mod.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODS else base for a in node.names]
    out = []
    for n in names:
        while n and n not in MODS:
            n = n.rpartition(".")[0]
        if n and n != mod and n.startswith("covidcxr"):
            out.append(n)
    return out


def _scan():
    graph, inner, compares = {m: set() for m in MODS}, [], []
    for mod, path in MODS.items():
        tree = ast.parse(path.read_text())
        stack = [(tree, False)]
        while stack:
            node, in_fn = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(mod, node):
                    if in_fn:
                        if (mod, t) not in FACADE:
                            inner.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {t}")
                    else:
                        graph[mod].add(t)
            if isinstance(node, ast.Compare) and path.name != "tasks.py":
                if "task" in ast.unparse(node.left).lower() and any(
                        isinstance(c, ast.Constant) and c.value in TASK_NAMES for c in node.comparators):
                    compares.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {ast.unparse(node)}")
            fn = in_fn or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            stack += [(ch, fn) for ch in ast.iter_child_nodes(node)]
    return graph, inner, compares


GRAPH, INNER, COMPARES = _scan()


def test_every_module_has_a_layer():
    for mod in MODS:
        layer_of(mod)
    assert [name for name, _ in LAYERS][0] == "foundation"


def test_no_import_points_up_a_layer():
    up = [f"{m} (L{layer_of(m)}) imports {t} (L{layer_of(t)})"
          for m, ts in GRAPH.items() for t in sorted(ts) if layer_of(t) > layer_of(m)]
    assert not up, "\n".join(up)


def test_no_import_circle():
    # a package's __init__ and its own submodules are one unit: only edges between other modules count
    edges = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in GRAPH.items()}
    state, path, circles = {}, [], []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles)


def test_no_covidcxr_import_inside_a_function():
    assert not INNER, "\n".join(INNER)


def test_the_facade_is_the_only_exemption():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    assert all(not isinstance(n, (ast.Import, ast.ImportFrom)) or n.module in ("__future__", "pathlib")
               for n in tree.body), "covidcxr/__init__.py imports only the standard library at module level"


def test_only_tasks_compares_task_names():
    assert not COMPARES, "\n".join(COMPARES)
