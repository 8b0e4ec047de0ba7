"""The package's shape: core modules flat, one subpackage per workflow, no import cycles,
imports at module top (an optional third-party dependency may load where it is used)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "draftlm"

CORE_MODULES = {
    "__init__", "attention", "cli", "compile", "config", "errors", "generate", "load", "model",
    "options", "output", "sampling", "tokenizer",
}
SUBPACKAGES = {"bench", "data", "eval", "formats", "quant", "serving", "speculative", "training"}
# draftlm modules that may be imported inside a function: they need an optional extra.
LAZY_ALLOWED = {("draftlm.serving.command", "draftlm.serving.app")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def draftlm_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported draftlm module, imported at module top?) for every import in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("draftlm"):
            for alias in node.names:
                # `from draftlm.pkg import module` imports a module; otherwise a name.
                candidate = f"{node.module}.{alias.name}"
                target = candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(
                    ".py").exists() else node.module
                found.append((target, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("draftlm")]
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        graph[module_name(path)] = {target for target, _ in draftlm_imports(path)}
    return graph


def test_root_holds_only_the_core() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == CORE_MODULES
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == SUBPACKAGES


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports among the package's modules, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # Importing draftlm.a.b runs draftlm.a's __init__ first.
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and nxt in graph:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 40
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_draftlm_imports_at_module_top(path: Path) -> None:
    lazy = {target for target, at_top in draftlm_imports(path) if not at_top}
    assert lazy <= {t for m, t in LAZY_ALLOWED if m == module_name(path)}
