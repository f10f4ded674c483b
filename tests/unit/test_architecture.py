"""The package keeps its shape: imports go one way through the layers, no module imports itself back
through others (no cycle, even through an import inside a function), every package imports on its own,
and only rsmoe.distributed.collectives calls torch.distributed's collectives.

Layer order (a module may import its own package and any package of a LOWER layer, never one beside
or above it):

    cli -> ablation -> training | eval | serving -> inference -> io -> data | distributed -> models
        -> logs | assets | testing -> config -> errors
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = Path(REPO) / "rsmoe"
LAYERS = [
    {"", "errors"},                      # rsmoe/__init__.py (version) and the error classes
    {"config"},
    {"logs", "assets", "testing"},
    {"models"},
    {"data", "distributed"},
    {"io"},
    {"inference"},
    {"training", "eval", "serving"},
    {"ablation"},
    {"cli"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "gather_object", "scatter",
               "scatter_object_list", "send", "recv", "isend", "irecv"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def top_package(module: str) -> str:
    """'rsmoe.training.loop' -> 'training'; 'rsmoe.logs' -> 'logs'; 'rsmoe' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def internal_imports(module: str) -> list[tuple[str, int]]:
    """(imported rsmoe module, line) for every import in `module`, at top level or inside functions."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "rsmoe"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "rsmoe":
                target = node.module
            else:
                continue
            # `from rsmoe.io import adapters` imports the module rsmoe.io.adapters.
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            out += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return out


def test_every_package_is_in_a_layer():
    packages = {top_package(m) for m in MODULES}
    assert packages <= set(LAYER_OF), f"add these packages to LAYERS: {sorted(packages - set(LAYER_OF))}"


def test_imports_follow_the_layer_order():
    bad = []
    for module in MODULES:
        here = top_package(module)
        for target, line in internal_imports(module):
            there = top_package(target)
            if there == here:
                continue
            if LAYER_OF[there] >= LAYER_OF[here]:
                bad.append(f"{MODULES[module].relative_to(REPO)}:{line}: {module} ({here or 'rsmoe'}) imports {target} "
                           f"({there or 'rsmoe'}), which is not below it")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def import_graph() -> dict[str, set[str]]:
    """module -> the rsmoe modules importing it runs. Importing rsmoe.x.y from another package also
    runs rsmoe.x's __init__, so those edges count too (within a package they are Python's normal
    package-init order, not a cycle)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for t, _ in internal_imports(m):
            if t not in MODULES or t == m:
                continue
            graph[m].add(t)
            if top_package(t) != top_package(m):
                parent = t.rpartition(".")[0]
                while parent in MODULES and parent != "rsmoe":
                    graph[m].add(parent)
                    parent = parent.rpartition(".")[0]
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components with more than one module are the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
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
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycle_between_modules():
    cycles = strongly_connected(import_graph())
    assert not cycles, f"import cycles (counting imports inside functions): {cycles}"


def test_the_cycle_check_sees_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", sorted({top_package(m) for m in MODULES} - {""}))
def test_each_package_imports_on_its_own(package):
    """In a fresh interpreter, import every module of one package (first the package itself)."""
    mods = sorted(m for m in MODULES if top_package(m) == package and not m.endswith("__main__"))
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % mods
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_only_the_collectives_module_calls_collectives():
    allowed = PACKAGE / "distributed" / "collectives.py"
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == allowed:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in ("dist", "torch.distributed", "distributed"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {owner}.{node.func.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                found += [f"{path.relative_to(REPO)}:{node.lineno}: from torch.distributed import {a.name}"
                          for a in node.names if a.name in COLLECTIVES]
    assert not found, "collectives outside rsmoe/distributed/collectives.py:\n" + "\n".join(found)
