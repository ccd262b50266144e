"""The package's import graph, read from the source with ast (nothing is imported): the layering of
DESIGN.md holds. Data flows recipe -> train -> export -> serve through files, so export and serve
never import train; no module imports itself back through others (a cycle, even through a function's
own import, means two modules that are really one); no stage reaches into another package's private
(``_name``) helpers: a shared helper belongs in a shared module."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "prunedlora"
STAGES = ("train", "export", "serve", "bench", "rank", "salr", "loraprune")
# which stages a stage may not import (bench sits above all of them and may import them)
FORBIDDEN = {
    "export": ("train", "serve", "bench", "rank", "salr", "loraprune"),
    "serve": ("train", "export", "bench", "rank", "salr", "loraprune"),
    "train": ("export", "serve", "bench"),
    # train reads a sparsify folder and keeps SALR's residual frozen through salr's own loader and
    # callback (a recipe's salr: section); salr itself knows no stage
    "salr": ("train", "export", "serve", "bench", "loraprune"),
    # the three methods are siblings: none imports another, none knows a stage
    "rank": ("train", "export", "serve", "bench", "salr", "loraprune"),
    # train drives LoRAPrune's pruner through a callback; the method itself knows no stage
    "loraprune": ("train", "export", "serve", "bench", "rank", "salr"),
}
# the core: tensors, configs and files only; it imports no stage
CORE = (
    "answers",
    "errors",
    "figures",
    "iofaults",
    "lazy",
    "loralayers",
    "metadata",
    "method",
    "modelfacts",
    "registry",
    "staging",
    "tasks",
    "vllm_compat",
)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (a submodule when ``from package import submodule``)
    name: str | None  # the name taken from it, if any
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for rest in child.orelse:
                    visit(rest)
                continue  # annotations only: never run
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, None, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:
                        found.append(Import(module, sub, None, child.lineno))
                    else:
                        found.append(Import(module, base, alias.name, child.lineno))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return [i for i in found if i.target.split(".")[0] == "prunedlora"]


GRAPH = {module: imports_of(module) for module in MODULES}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def module_graph() -> dict[str, set[str]]:
    return {m: {i.target for i in imports if i.target in MODULES and i.target != m} for m, imports in GRAPH.items()}


def test_the_walk_sees_the_package():
    # guards the walk itself: a parser that found nothing would pass every rule below
    assert {"prunedlora.metadata", "prunedlora.export.exporter", "prunedlora.serve.validate"} <= set(MODULES)
    exporter = {i.target for i in GRAPH["prunedlora.export.exporter"]}
    assert {"prunedlora.metadata", "prunedlora.staging", "prunedlora.export.verify"} <= exporter
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(module_graph())
    assert not found, "import cycles (split the shared part into its own module): " + "; ".join(
        " <-> ".join(c) for c in found
    )


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_stages_import_only_what_the_data_flow_allows(stage):
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for imports in GRAPH.values()
        for i in imports
        if stage_of(i.source) == stage and stage_of(i.target) in FORBIDDEN[stage]
    ]
    assert not bad, f"{stage} must not import {', '.join(FORBIDDEN[stage])} (they talk through files): {bad}"


def test_the_core_imports_no_stage():
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for name in CORE
        for i in GRAPH[f"prunedlora.{name}"]
        if stage_of(i.target) is not None
    ]
    assert not bad, f"the core must not know the stages: {bad}"


def test_no_private_helper_crosses_a_package():
    def package(module: str) -> str:
        return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]

    bad = []
    for imports in GRAPH.values():
        for i in imports:
            private = i.name if i.name is not None else i.target.rsplit(".", 1)[-1]
            if not private.startswith("_") or private.startswith("__"):
                continue
            owner = i.target if i.name is not None else i.target.rpartition(".")[0]
            if owner in MODULES and package(owner) != package(i.source):
                bad.append(f"{i.source}:{i.line} imports {private} from {owner}")
    assert not bad, f"private helpers used across packages (make them public in a shared module): {bad}"


def test_train_names_no_method():
    """The runner reaches the methods through ``prunedlora.method``'s registry: train/ imports no method
    package, except ``rank.config``, whose PrunedLoraConfig is also the record of the LoRA every method
    trains (r0, alpha, targets)."""
    allowed = {"prunedlora.rank.config"}
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for imports in GRAPH.values()
        for i in imports
        if stage_of(i.source) == "train"
        and stage_of(i.target) in ("rank", "loraprune", "salr")
        and i.target not in allowed
    ]
    assert not bad, f"train must reach methods through prunedlora.method: {bad}"
