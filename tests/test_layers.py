"""The layer rule written in ``devrep/__init__.py`` (``_LAYERS``), enforced on every import statement of the package.

Walks the source (AST), so an import inside a function counts as much as one at the top: a lazy import still
makes the lower layer depend on the upper one. Imports under ``if TYPE_CHECKING:`` are skipped (they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import devrep

PACKAGE = Path(devrep.__file__).resolve().parent
GENERATED = ("_gen",)  # protoc output: imports only its sibling module


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


MODULES: dict[str, Path] = {
    module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if not set(GENERATED) & set(p.relative_to(PACKAGE).parts)
}


def is_module(name: str) -> bool:
    return name in MODULES or any(m.startswith(name + ".") for m in MODULES)


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def imports_of(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """``(imported devrep module, line)`` for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_blocks(tree)
    package = package_of(module, path)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "devrep" or alias.name.startswith("devrep."):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if not (source == "devrep" or source.startswith("devrep.")):
                continue
            for alias in node.names:  # ``from pkg import submodule`` is an edge to the submodule
                target = f"{source}.{alias.name}"
                yield (target if is_module(target) else source), node.lineno


def layer_of(module: str) -> str:
    best, best_len = None, -1
    for layer, (prefixes, _) in devrep._LAYERS.items():
        for prefix in prefixes:
            exact_only = prefix == "devrep"  # the facade is one module, not a prefix of every module
            matches = module == prefix or (not exact_only and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to devrep._LAYERS (devrep/__init__.py)")
    return best


def edges() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, without edges to the module's own ancestors (already imported by
    the time the module runs) or to itself."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        out: dict[str, int] = {}
        for target, line in imports_of(module, path):
            if target == module or module.startswith(target + "."):
                continue
            out.setdefault(target, line)
        graph[module] = out
    return graph


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_import_goes_up_a_layer() -> None:
    bad = []
    for module, targets in edges().items():
        mine = layer_of(module)
        allowed = {mine, *devrep._LAYERS[mine][1]}
        for target, line in targets.items():
            theirs = layer_of(target)
            if theirs not in allowed:
                bad.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} ({mine}) imports "
                           f"{target} ({theirs})")
    assert not bad, "imports against the layer rule in devrep/__init__.py:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None`` (iterative DFS, three colours)."""
    colour: dict[str, int] = {}
    for root in graph:
        if colour.get(root):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(graph.get(root, {})))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return [*path[path.index(child):], child]
            elif not colour.get(child):
                colour[child] = 1
                stack.append((child, iter(graph.get(child, {}))))
                path.append(child)
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_what_they_claim() -> None:
    """The walker itself: an upward edge and a cycle in a made-up graph are found (the real graph has none, so the
    tests above cannot show they would fail)."""
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None
    assert layer_of("devrep.linux.uffd") == "linux" and layer_of("devrep.service.servicer") == "service"
    assert "service" not in devrep._LAYERS["client"][1] and "engine" not in devrep._LAYERS["client"][1]
    # The walker sees function-level imports: the client reaches the CUDA VMM binding only inside a method.
    client_edges = dict(imports_of("devrep.client._client", MODULES["devrep.client._client"]))
    assert "devrep.linux.cuda_vmm" in client_edges, sorted(client_edges)


@pytest.mark.parametrize("module, forbidden", [
    ("devrep.client", ("numba", "devrep.service", "devrep.engine", "devrep.region", "devrep.backends",
                       "devrep.tracking")),
    ("devrep", ("numpy", "numba", "grpc", "devrep.client", "devrep.engine")),
    ("devrep.tracking._handler", ("numpy", "numba", "grpc", "devrep.memory", "devrep.engine")),
])
def test_import_loads_only_its_layers(module: str, forbidden: tuple[str, ...]) -> None:
    """What an import really loads at run time (``sys.modules`` in a fresh interpreter), not just what the AST says:
    the client without the server and numba, ``import devrep`` lazy, the sync fault helper on the Linux layer only."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    found = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not found, f"import {module} loaded {found}"
