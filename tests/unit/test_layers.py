"""The package's layers: no module imports from a layer above its own, and no import cycles.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a lazy import is
still an arrow between two modules. The layers, from the bottom:
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "inferd"

LAYERS: list[tuple[str, ...]] = [
    # what everything uses: no knowledge of models, HTTP or databases
    # (and tracing: the tracer, W3C context in and out, the spans of a request and a batch)
    (
        "inferd.errors",
        "inferd.concurrency",
        "inferd.logs",
        "inferd.metrics",
        "inferd.s3url",
        "inferd.tracing",
    ),
    ("inferd.db",),  # every table, the engine, the migrations
    ("inferd.settings",),
    # the batcher; the registry and the runtimes; drift references and windows of their
    # inputs; continuous batching of text models
    ("inferd.batching", "inferd.models", "inferd.monitoring", "inferd.generation"),
    ("inferd.codec", "inferd.tenancy"),  # prediction bodies; keys and limits
    ("inferd.serving",),  # the one prediction procedure (the data plane)
    ("inferd.jobs",),  # long-running requests: store, queue, bus, workers
    ("inferd.http", "inferd.grpc", "inferd.console"),  # protocols: parse, call the core, render
    ("inferd.backends",),  # picks the embedded or the scale-out backend of each seam
    ("inferd.app", "inferd.worker_process"),  # composition roots of the two processes
    # the server process(es) of `inferd serve`, and the commands
    ("inferd.server",),
    ("inferd.cli", "inferd.cli_admin", "inferd.cli_client", "inferd.cli_monitoring"),
    ("inferd.__main__",),
]
# The client talks HTTP to a server and imports none of it (only the package's version).
STANDALONE = ("inferd.client",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> Iterator[str]:
    """The inferd modules ``name`` imports (a package, when the name is not a module)."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target.startswith("inferd.") or target == "inferd":
                yield target


def layer_of(name: str) -> int | None:
    for index, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return index
    return None


def test_every_module_has_a_layer() -> None:
    loose = [
        name
        for name in MODULES
        if name != "inferd"
        and layer_of(name) is None
        and not any(name == s or name.startswith(s + ".") for s in STANDALONE)
    ]
    assert not loose, f"place these modules in LAYERS: {loose}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) is not None))
def test_no_module_imports_from_a_layer_above(name: str) -> None:
    own = layer_of(name)
    assert own is not None
    upward = [
        f"{target} (layer {layer_of(target)})"
        for target in imports(name)
        if target != "inferd" and (layer_of(target) or 0) > own
    ]
    assert not upward, f"{name} (layer {own}) imports from above: {upward}"


def test_the_client_imports_nothing_of_the_server() -> None:
    for name in MODULES:
        if any(name == s or name.startswith(s + ".") for s in STANDALONE):
            for target in imports(name):
                assert target == "inferd" or target.startswith(STANDALONE), (name, target)


def test_no_two_modules_import_each_other() -> None:
    # The package root only imports the app lazily (create_app); it is nobody's dependency.
    graph = {
        name: {t for t in imports(name) if t in MODULES and t != "inferd"}
        for name in MODULES
        if name != "inferd"
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"modules that import each other: {cycles}"
