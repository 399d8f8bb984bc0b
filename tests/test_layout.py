"""The package's shape (issue 26, Deliver 4): result and plan models refuse unknown fields,
and the import graph of vramcalc has no circles."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from pydantic import BaseModel, ValidationError

import vramcalc
from vramcalc.memory.result import Components


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(vramcalc.__path__, "vramcalc.")
                  if not m.name.endswith("__main__"))


def test_a_misspelt_component_is_refused() -> None:
    with pytest.raises(ValidationError, match="activatons"):
        Components(activatons=7)  # type: ignore[call-arg]
    assert Components(activations=7).activations == 7


def test_every_model_of_the_package_forbids_unknown_fields() -> None:
    """Every pydantic model defined in vramcalc (results, plans, specs, records): a typo'd
    field is an error, never silently dropped."""
    models = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseModel) and cls.__module__ == name:
                models.append(cls)
    assert len(models) >= 30  # the walk found the package's models
    lax = [f"{c.__module__}.{c.__qualname__}" for c in models
           if c.model_config.get("extra") != "forbid"]
    assert lax == []


def _import_graph() -> dict[str, set[str]]:
    """vramcalc module -> the vramcalc modules it imports, read with ast from the source:
    every import statement, at module level or inside a function (a lazy import is still
    a dependency) or under TYPE_CHECKING."""
    import ast
    from pathlib import Path

    root = Path(vramcalc.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in files:
                        deps.add(sub)
                    elif node.module in files:
                        deps.add(node.module)
        deps.discard(name)
        # a package's own __init__ is imported with any of its modules: not an edge
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circles() -> None:
    """Issue 26: `commands/calibrate` <-> `calibrate_multi`, `commands/check` <->
    `task_options` and `specs` <-> `hf_config` <-> `hub` were circles, held together by
    imports inside functions; none is left, lazy imports included."""
    graph = _import_graph()
    assert "vramcalc.memory.estimate" in graph["vramcalc.sizing.search"]  # the walk works
    assert "vramcalc.models.spec" in graph["vramcalc.models.hub"]
    assert _cycles(graph) == []
