"""The import graph of the package runs one way (docs/design.md, code layout):

    compat, errors, metrics, global_vars, shapes, deepspeed_config, distributed, arguments   (foundation)
    model/, concepts/, data/                                                                   (library)
    training/                                                                                  (harness)

The library never imports the harness, and no set of modules imports itself round a circle. Lazy imports
inside functions count: they are how circles usually hide."""

import ast
import os
from typing import Dict, List, Set

from tests.helpers.paths import ROOT

PACKAGE = "megatron_cocomix"
LIBRARY = ("model", "concepts", "data")


def _modules() -> Dict[str, str]:
    found = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module[: -len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def _imports(module: str, path: str, known: Set[str]) -> Set[str]:
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                targets.add(name)
    return targets


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {module: _imports(module, path, set(modules)) for module, path in modules.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan). A package's __init__ importing its
    own submodules is not a circle of concern: edges from a package to its children are left out."""
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_library_never_imports_the_training_harness():
    upward = [(m, t) for m, ts in import_graph().items() for t in ts
              if m.split(".")[1:2] and m.split(".")[1] in LIBRARY and t.startswith(f"{PACKAGE}.training")]
    assert not upward, upward


def test_no_import_circles():
    assert not _cycles(import_graph())


def test_the_check_sees_circles_and_upward_imports():
    graph = {"megatron_cocomix.a": {"megatron_cocomix.b"}, "megatron_cocomix.b": {"megatron_cocomix.c"},
             "megatron_cocomix.c": {"megatron_cocomix.a"}, "megatron_cocomix.d": set()}
    assert _cycles(graph) == [["megatron_cocomix.a", "megatron_cocomix.b", "megatron_cocomix.c"]]
    assert "megatron_cocomix.training.loop" in import_graph()["megatron_cocomix.training"] or \
        any(t.startswith("megatron_cocomix.training") for t in import_graph()["megatron_cocomix.training.loop"])
