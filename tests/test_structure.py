"""The package's import structure, read from the source with ``ast`` (every import counts: module level, inside
functions, and under ``if TYPE_CHECKING:``):

1. no import cycle between modules of ``src/loraplex``;
2. no ``_private`` name imported from another loraplex module (make it public with a good name, or move it);
3. no ``try: import <loraplex module> except ImportError`` (loraplex's own modules are always there);
4. the demo (``loraplex.demo``) is imported only by itself and by ``loraplex.cli``.

Edges: ``import loraplex.a.b`` and ``from loraplex.a import b`` with ``b`` a submodule point to ``loraplex.a.b``;
``from loraplex.a import name`` points to ``loraplex.a`` (its ``__init__``). Each failure prints the offending
chain or the file and line.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "loraplex"
DEMO = "loraplex.demo"
DEMO_USERS = ("loraplex.demo", "loraplex.cli")
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


@dataclass(frozen=True)
class Import:
    """One imported loraplex module (``target``) and the names taken from it, at ``line`` of ``source``."""

    source: str
    target: str
    names: tuple[str, ...]
    line: int
    guarded: bool  # inside a try whose handlers catch ImportError / ModuleNotFoundError


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    t = handler.type
    types = t.elts if isinstance(t, ast.Tuple) else [t] if t is not None else []
    return any(isinstance(x, (ast.Name, ast.Attribute)) and (x.id if isinstance(x, ast.Name) else x.attr)
               in IMPORT_ERRORS for x in types)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module of a ``from ... import`` (relative ones resolved against ``module``)."""
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a loraplex module in ``path`` (the file of ``module``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    guarded_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for stmt in node.body:
                guarded_nodes.update(id(n) for n in ast.walk(stmt))
    out: list[Import] = []
    for node in ast.walk(tree):
        guarded = id(node) in guarded_nodes
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    out.append(Import(module, alias.name, (), node.lineno, guarded))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            if not target or not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # a submodule: the edge points to it
                    out.append(Import(module, sub, (), node.lineno, guarded))
                else:
                    names.append(alias.name)
            if names:
                out.append(Import(module, target, tuple(names), node.lineno, guarded))
    return out


@functools.cache
def all_imports() -> tuple[dict[str, Path], list[Import]]:
    modules = module_files()
    found = [imp for mod, path in modules.items() for imp in imports_of(mod, path, modules)]
    return modules, found


def where(modules: dict[str, Path], imp: Import) -> str:
    return f"{modules[imp.source].relative_to(SRC)}:{imp.line}"


# --------------------------------------------------------------------------- cycles
def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    comps.append(sorted(comp))
    return comps


def shortest_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """The shortest cycle through ``start`` inside ``members`` (breadth-first), as a list ending at ``start``."""
    prev: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def import_cycles() -> list[str]:
    """One line per cycle: ``a (a.py:3) -> b (b.py:10) -> a``."""
    modules, found = all_imports()
    graph: dict[str, set[str]] = defaultdict(set)
    lines: dict[tuple[str, str], int] = {}
    for imp in found:
        if imp.target != imp.source and imp.target in modules:
            graph[imp.source].add(imp.target)
            lines.setdefault((imp.source, imp.target), imp.line)
    out = []
    for comp in strongly_connected(dict(graph)):
        if len(comp) < 2:
            continue
        cycle = shortest_cycle(graph, comp[0], set(comp))
        hops = [f"{a} ({modules[a].relative_to(SRC)}:{lines[(a, b)]})" for a, b in zip(cycle, cycle[1:])]
        out.append(" -> ".join(hops + [cycle[-1]]) + (f"   [{len(comp)} modules in this knot: {', '.join(comp)}]"
                                                       if len(comp) > len(cycle) - 1 else ""))
    return out


# --------------------------------------------------------------------------- the rules
def private_imports() -> list[str]:
    modules, found = all_imports()
    return [f"{where(modules, imp)}: {imp.source} imports {', '.join(n for n in imp.names if _private(n))} "
            f"from {imp.target}" for imp in found
            if imp.target != imp.source and any(_private(n) for n in imp.names)]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def guarded_imports() -> list[str]:
    modules, found = all_imports()
    return [f"{where(modules, imp)}: {imp.source} imports {imp.target} inside try/except ImportError"
            for imp in found if imp.guarded]


def demo_imports() -> list[str]:
    modules, found = all_imports()
    return [f"{where(modules, imp)}: {imp.source} imports {imp.target}" for imp in found
            if (imp.target == DEMO or imp.target.startswith(DEMO + "."))
            and not any(imp.source == u or imp.source.startswith(u + ".") for u in DEMO_USERS)]


def _fail(what: str, problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n  " + "\n  ".join(problems), pytrace=False)


def test_no_import_cycles() -> None:
    _fail("import cycle(s) between loraplex modules", import_cycles())


def test_no_private_names_imported_across_modules() -> None:
    _fail("private name(s) imported from another loraplex module", private_imports())


def test_no_import_error_guards_around_loraplex_modules() -> None:
    _fail("import(s) of loraplex's own modules guarded by except ImportError", guarded_imports())


def test_only_the_demo_and_the_cli_import_the_demo() -> None:
    _fail("import(s) of loraplex.demo from the library", demo_imports())


@pytest.mark.parametrize("package", ["loraplex.serve"])
def test_package_is_clean(package: str) -> None:
    """Every rule for the modules of ``package`` (cycles touching it, its imports)."""
    def mine(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    problems = [p for p in import_cycles() if any(mine(hop.split(" ")[0]) for hop in p.split(" -> "))]
    modules = module_files()
    rel = str(modules[package].parent.relative_to(SRC)) + "/"
    problems += [p for p in private_imports() + guarded_imports() + demo_imports() if p.startswith(rel)]
    _fail(f"structure problem(s) in {package}", problems)


# --------------------------------------------------------------------------- the walker itself
def test_walker_finds_each_kind_of_problem(tmp_path: Path) -> None:
    """The checks on a small made-up package: a cycle through a function-level and a TYPE_CHECKING import, a
    private name, a guarded import, a relative import, a demo import."""
    pkg = tmp_path / PACKAGE
    (pkg / "demo").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from loraplex.b import B\n",
        "b.py": "def f():\n    from . import c\n",
        "c.py": "import loraplex.a\nfrom loraplex.a import _hidden, __version__\n",
        "d.py": "try:\n    from loraplex.demo import data\nexcept (ModuleNotFoundError, OSError):\n    data = None\n",
        "demo/__init__.py": "",
        "demo/data.py": "from loraplex.a import thing\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    modules = module_files(tmp_path)
    assert set(modules) == {"loraplex", "loraplex.a", "loraplex.b", "loraplex.c", "loraplex.d", "loraplex.demo",
                            "loraplex.demo.data"}
    found = [imp for mod, path in modules.items() for imp in imports_of(mod, path, modules)]
    edges = {(i.source, i.target) for i in found}
    assert {("loraplex.a", "loraplex.b"), ("loraplex.b", "loraplex.c"), ("loraplex.c", "loraplex.a"),
            ("loraplex.d", "loraplex.demo.data"), ("loraplex.demo.data", "loraplex.a")} <= edges
    graph: dict[str, set[str]] = defaultdict(set)
    for s, t in edges:
        graph[s].add(t)
    assert [c for c in strongly_connected(dict(graph)) if len(c) > 1] == [["loraplex.a", "loraplex.b", "loraplex.c"]]
    assert shortest_cycle(graph, "loraplex.a", {"loraplex.a", "loraplex.b", "loraplex.c"}) == [
        "loraplex.a", "loraplex.b", "loraplex.c", "loraplex.a"]
    private = [(i.source, n) for i in found for n in i.names if _private(n)]
    assert private == [("loraplex.c", "_hidden")]
    assert [(i.source, i.target) for i in found if i.guarded] == [("loraplex.d", "loraplex.demo.data")]
