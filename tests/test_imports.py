"""The library's import structure: ``models`` is never imported by the library, and
its modules' import graph has no cycle (``spec`` <-> ``layer_map`` used to be one)."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxhicache"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _top_level_imports(name: str, path: pathlib.Path, known) -> set[str]:
    """Modules of the package that ``path`` imports when it is imported, or for type
    checking (``if TYPE_CHECKING:`` blocks count); imports inside functions do not."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for sub in getattr(node, block, []):
                        visit(sub.body if isinstance(sub, ast.ExceptHandler) else [sub])

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_library_import_graph_has_no_cycle():
    mods = _modules()
    graph = {n: _top_level_imports(n, p, mods) for n, p in mods.items()}
    assert "jaxhicache.spec" in graph["jaxhicache.layer_map.stage"]  # the checker sees imports
    assert "jaxhicache.layer_map" not in graph["jaxhicache.spec"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_the_old_spec_layer_map_cycle():
    """Control: the graph as it was (spec imported layer_map for type checking)."""
    mods = _modules()
    graph = {n: _top_level_imports(n, p, mods) for n, p in mods.items()}
    graph["jaxhicache.spec"] = graph["jaxhicache.spec"] | {"jaxhicache.layer_map"}
    assert any({"jaxhicache.layer_map", "jaxhicache.spec"} <= set(c) for c in _cycles(graph))


def test_importing_every_library_module_never_imports_models():
    code = (
        "import importlib, json, sys\n"
        f"names = {sorted(n for n in _modules() if not n.endswith('.__main__'))!r}\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'models' "
        "or m.startswith('models.'))))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
    assert len(_modules()) > 30  # every module was imported, the CLI included
