"""The package's structure, checked against its real import graph (issue #24).

Every ``import`` statement in ``curvature/`` counts, those inside functions too: the graph has no cycle, every
import goes to the same layer or a lower one of the block in ``docs/layout.md``, every module is listed there
exactly once and has a docstring, and nothing imports the repository's ``benchmarks`` package.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "curvature"


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is_package) for every module of the package."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def imported(name: str, is_pkg: bool, node: ast.AST, known: dict) -> list[str]:
    """The package modules one import statement loads (``from . import x`` → ``x`` alone when x is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in ("curvature", "benchmarks")]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] not in ("curvature", "benchmarks"):
        return []
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return subs + ([target] if len(subs) < len(node.names) else [])


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, (f, is_pkg) in known.items():
        targets = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in imported(name, is_pkg, node, known) if t != name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w in graph and w not in state and (c := visit(w)):
                return c
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def documented_layers() -> list[tuple[str, list[str]]]:
    """(layer, modules) from the ``layers`` block of docs/layout.md, bottom layer first."""
    text = (ROOT / "docs" / "layout.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/layout.md has no ```layers block"
    rows = []
    for line in block.group(1).strip().splitlines():
        layer, _, names = line.partition(":")
        rows.append((layer.strip(), ["curvature" if n == "curvature" else f"curvature.{n}" for n in names.split()]))
    return rows[::-1]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_is_in_one_documented_layer():
    listed = [m for _, ms in documented_layers() for m in ms]
    dupes = sorted({m for m in listed if listed.count(m) > 1})
    assert not dupes, f"listed twice in docs/layout.md: {dupes}"
    missing = sorted(set(modules()) - set(listed))
    assert not missing, f"modules missing from the layers block of docs/layout.md: {missing}"
    stale = sorted(set(listed) - set(modules()))
    assert not stale, f"docs/layout.md lists modules that do not exist: {stale}"


def test_imports_go_down_or_sideways_never_up():
    level = {m: i for i, (_, ms) in enumerate(documented_layers()) for m in ms}
    names = {i: layer for i, (layer, _) in enumerate(documented_layers())}
    upward = [f"{m} ({names[level[m]]}) imports {t} ({names[level[t]]})"
              for m, targets in import_graph().items() for t in sorted(targets)
              if m in level and t in level and level[t] > level[m]]
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)


def test_the_installed_package_does_not_import_the_repository_benchmarks():
    offenders = sorted(m for m, targets in import_graph().items() if any(t.startswith("benchmarks") for t in targets))
    assert not offenders, f"these modules import benchmarks/ (not installed with the package): {offenders}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_says_what_it_holds(name):
    f, _ = modules()[name]
    doc = ast.get_docstring(ast.parse(f.read_text()))
    assert doc and doc.strip(), f"{f.relative_to(ROOT)} has no module docstring"


def test_bench_names_the_install_command_for_a_missing_peer(monkeypatch):
    import importlib.util

    from curvature import bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pyhessian" else real(n, *a))
    import torch

    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    rows = bench.benchmark_solvers(model, torch.nn.functional.mse_loss, (x, y), solvers=(), scipy=False,
                                   peers=["pyhessian"], seeds=1)
    assert rows[-1]["note"] == "skipped: not installed (pip install --no-deps pyhessian)"
