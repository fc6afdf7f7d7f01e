"""The house rules, checked on the source: no module imports upward, no import cycle, no huge module.

Layers, bottom up (docs/architecture.md): core -> models -> transforms -> pipelines -> runners. A module may
import its own layer and those below it. Every import counts, those inside functions too: a lazy import
still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "models", "transforms", "pipelines", "runners"]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    modules = {}
    for folder in LAYERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(("headrace", *parts))] = path
    return modules


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The headrace modules `path` imports (``from package import submodule`` names the submodule)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("headrace.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("headrace"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_the_layers_are_all_there():
    assert {m.split(".")[1] for m in MODULES} == set(LAYERS)
    assert len(MODULES) > 40


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(
        f"{m} ({m.split('.')[1]}) imports {dep} ({dep.split('.')[1]})"
        for m, deps in GRAPH.items()
        for dep in deps
        if _layer(dep) > _layer(m)
    )
    assert not upward, "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-imports."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
            if len(component) > 1 or v in GRAPH[v]:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert not _cycles(), _cycles()


def test_the_cycle_check_finds_a_cycle():
    GRAPH["headrace.core.errors"].add("headrace.core.config")
    try:
        assert ["headrace.core.config", "headrace.core.errors"] in _cycles()
    finally:
        GRAPH["headrace.core.errors"].discard("headrace.core.config")


def test_no_module_is_over_600_lines():
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
