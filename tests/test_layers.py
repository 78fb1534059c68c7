"""Imports only point down the layers of docs/architecture.md; siblings on one layer do not import
each other.

```
tstl.cli
tstl.twostage
tstl.train
tstl.data | tstl.models
pipeline | shard_tools
tstl.core
```

Every import in every ``.py`` under ``pipeline/``, ``shard_tools/`` and ``tstl/`` is checked,
module-level or inside a function (relative imports are resolved first). ``benchmarks/`` and
``tests/`` may import anything and nothing may import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("pipeline", "shard_tools", "tstl")
LAYERS = {  # component -> layer; one layer's components are siblings
    "tstl.core": 0, "tstl": 0,  # the bare package is only __init__ (the version); it counts as base
    "pipeline": 1, "shard_tools": 1,
    "tstl.data": 2, "tstl.models": 2,
    "tstl.train": 3,
    "tstl.twostage": 4,
    "tstl.predict": 5,  # using a trained run (predict, export); routes TSTL runs: above twostage
    "tstl.cli": 6,  # the `tstl` command: dispatches to every tool's CLI (lazily), so above them all
    "benchmarks": 99, "tests": 99,
}
DIAGRAM = ("tstl.core < pipeline | shard_tools < tstl.data | tstl.models < tstl.train < "
           "tstl.twostage < tstl.predict < tstl.cli")


def component(module: str) -> str | None:
    """The layered component a dotted module name belongs to (None: not ours, e.g. a third-party
    package)."""
    parts = module.split(".")
    if parts[0] == "tstl" and len(parts) > 1 and f"tstl.{parts[1]}" in LAYERS:
        return f"tstl.{parts[1]}"
    if parts[0] == "tstl" and len(parts) > 1:
        return f"tstl.{parts[1]}"  # a new subpackage: unknown, reported by rule()
    return parts[0] if parts[0] in LAYERS else None


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = module_of(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from tstl import data`` imports the subpackage: check each name as a module too
            out += [(node.lineno,
                     f"{mod}.{a.name}" if component(f"{mod}.{a.name}") in LAYERS and mod == "tstl"
                     else mod) for a in node.names]
    return out


def rule(src: str, dst: str) -> str | None:
    """Why ``src`` may not import ``dst`` (None: allowed)."""
    if src not in LAYERS:
        return (f"{src} is not in the layer table of tests/test_layers.py; add it there and to "
                "docs/architecture.md")
    if dst not in LAYERS:
        return (f"{dst} is not in the layer table of tests/test_layers.py; add it there and to "
                "docs/architecture.md")
    if src == dst or {src, dst} == {"tstl", "tstl.core"}:
        return None
    if LAYERS[dst] > LAYERS[src]:
        return (f"{src} (layer {LAYERS[src]}) may not import {dst} (layer {LAYERS[dst]}): imports "
                f"point down ({DIAGRAM})")
    if LAYERS[dst] == LAYERS[src]:
        return (f"{src} and {dst} are siblings on layer {LAYERS[src]} and may not import "
                f"each other ({DIAGRAM})")
    return None


def violations() -> list[str]:
    found = []
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            src = component(module_of(path))
            for line, mod in imports(path):
                dst = component(mod)
                if dst is None:
                    continue
                if (why := rule(src, dst)) is not None:
                    found.append(f"{path.relative_to(ROOT)}:{line}: imports {mod}: {why}")
    return found


def test_imports_point_down_the_layers() -> None:
    found = violations()
    assert not found, "layer violations (docs/architecture.md):\n" + "\n".join(found)


def test_the_checker_sees_up_across_and_nested_imports(tmp_path: Path, monkeypatch) -> None:
    assert (rule("shard_tools", "tstl.twostage")
            and "point down" in rule("shard_tools", "tstl.twostage"))
    assert rule("tstl.data", "tstl.models") and "siblings" in rule("tstl.data", "tstl.models")
    assert rule("tstl.core", "pipeline") and rule("tstl.train", "tstl.data") is None
    assert rule("pipeline", "tstl.core") is None and rule("tstl.twostage", "tstl.train") is None
    assert (rule("tstl.cli", "tstl.twostage") is None
            and "point down" in rule("tstl.twostage", "tstl.cli"))
    assert "not in the layer table" in rule("tstl.new", "tstl.core")
    # nested (function-level) and relative imports are seen
    fake = ROOT / "tstl" / "data" / "_layer_probe.py"
    code = "def f():\n    from ..twostage import groups\n    import tstl.train.engine\n"
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: code if self == fake else _read(self, *a, **k))
    assert imports(fake) == [(2, "tstl.twostage"), (3, "tstl.train.engine")]


_read = Path.read_text


def module_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (any depth). ``from pkg import name`` counts as an
    import of ``pkg.name`` where that is a module; a package's own ``__init__`` is not an edge of
    its submodules (Python has run it before them)."""
    files = {module_of(p): p for top in CHECKED for p in sorted((ROOT / top).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        graph[mod] = set()
        for _, dst in imports(path):
            while dst and dst not in files:
                dst = dst.rpartition(".")[0]
            if dst and dst != mod and not mod.startswith(dst + "."):
                graph[mod].add(dst)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = {f"{node.module}.{a.name}" for a in node.names}
                graph[mod] |= {name for name in names if name in files and name != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others() -> None:
    # issue 24: tstl.train.config <-> tstl.train.engine was the one circle; torchtitan validates in
    # its config manager instead. A circle makes import order matter and hides who owns a concept.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not cycles({"a": {"b"}, "b": set()})
    found = cycles(module_graph())
    assert not found, f"import circles: {found}"
