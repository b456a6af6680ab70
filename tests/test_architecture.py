"""The import graph of haagenti/, pipelines/ and jobs/ has no cycles and never imports upward.

Every import counts: at module level, inside functions and under TYPE_CHECKING, since each
is a dependency the code needs to run or to type-check. docs/architecture.md explains the
floors.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("haagenti", "pipelines", "jobs")

# Low to high: a module may import modules on its own floor or lower ones. An entry names one
# module, or with ".*" a package and every module under it; each module matches one entry.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("utilities", ("haagenti.errors", "haagenti.hashing", "haagenti.parallel", "haagenti.lru", "haagenti.checkpoints",
                   "haagenti.extras", "haagenti.binary", "haagenti.fsio", "haagenti.groups", "haagenti.fragment", "haagenti.testing.*")),
    ("store", ("haagenti.store.*", "haagenti")),  # the package's own __init__ names the store's format version
    ("registries", ("haagenti.codecs.*", "haagenti.formats.*", "haagenti.signature", "haagenti.similarity", "haagenti.config",
                    "haagenti.index.*", "haagenti.manifest", "haagenti.records", "haagenti.tensors", "haagenti.encode")),
    ("core", ("haagenti.core",)),
    ("operations", ("haagenti.executors", "haagenti.matching", "haagenti.writer", "haagenti.ingest_steps", "haagenti.ingest",
                    "haagenti.restore", "haagenti.maintenance", "haagenti.loader", "haagenti.libraryfs")),
    ("adaptive", ("haagenti.adaptive.*",)),
    ("facade", ("haagenti.library", "haagenti.prelude", "haagenti.examples", "haagenti.exports")),
    ("pipelines", ("pipelines.*",)),
    ("jobs", ("jobs.*",)),
    ("entry points", ("haagenti.cli",)),  # `haagenti dedup` runs the pipeline and submits jobs
]

def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports anywhere in its source."""
    mods = modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names)
        graph[name] = {t for t in map(known, targets) if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def floors_of(module: str) -> list[int]:
    """The floors whose entries cover `module` (one, when FLOORS is right)."""
    def covers(entry: str) -> bool:
        package = entry.removesuffix(".*")
        return module == entry or (entry.endswith(".*") and (module == package or module.startswith(package + ".")))

    return [level for level, (_, entries) in enumerate(FLOORS) for entry in entries if covers(entry)]


def floor_of(module: str) -> int:
    return floors_of(module)[0]


def test_no_import_cycles():
    assert [sorted(c) for c in cycles(import_graph())] == []


def test_every_module_has_one_floor():
    assert {m: floors_of(m) for m in sorted(modules()) if len(floors_of(m)) != 1} == {}


def test_no_module_imports_a_higher_floor():
    upward = [
        f"{a} ({FLOORS[floor_of(a)][0]}) imports {b} ({FLOORS[floor_of(b)][0]})"
        for a, targets in sorted(import_graph().items())
        for b in sorted(targets)
        if floor_of(b) > floor_of(a)
    ]
    assert upward == []


def test_the_graph_sees_every_kind_of_import(tmp_path, monkeypatch):
    """Imports in functions, under TYPE_CHECKING and relative ones are edges too."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "haagenti" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from haagenti.b import x\n")
    (tmp_path / "haagenti" / "b.py").write_text("def f():\n    from . import c\n")
    (tmp_path / "haagenti" / "c.py").write_text("import haagenti.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = import_graph()
    assert graph["haagenti.a"] == {"haagenti.b"} and graph["haagenti.b"] == {"haagenti.c"} and graph["haagenti.c"] == {"haagenti.a"}
    assert cycles(graph) == {frozenset({"haagenti.a", "haagenti.b", "haagenti.c"})}


def test_only_init_local_ray_starts_a_local_cluster():
    """A bare `ray.init` writes ~/.ray/auth_token, which turns token auth on for every later
    head on the machine (a plain `ray job submit` then fails, and `make demo` warns):
    the package, the jobs and the benches start Ray through `init_local_ray` alone."""
    calls = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for folder in (*PACKAGES, "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "pipelines" / "executors.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
    ]
    assert calls == []
