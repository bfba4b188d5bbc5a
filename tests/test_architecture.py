"""The package's imports point one way (docs/architecture.md), read from the source with ast.

An import inside a function counts like any other (one placed there to dodge a cycle is
still a cycle); imports under ``if TYPE_CHECKING:`` don't run and don't count.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import blipserve

PACKAGE = Path(blipserve.__file__).parent
ROOT = PACKAGE.parents[1]
# Who may import whom, by top-level part of blipserve: a part may import only these.
INFERENCE = {
    "errors",
    "model",
    "processing",
    "engine",
    "weights",
    "resolve",
    "outputs",
    "generation_config",
    "api",
    "matching",
}
ALLOWED = {
    "errors": set(),
    "model": {"errors"},
    "processing": {"errors"},
    "engine": {"errors", "model"},
    "weights": {"errors", "model"},
    "resolve": {"errors"},
    "outputs": {"engine", "processing"},
    "generation_config": {"engine", "model"},
    "api": INFERENCE - {"api", "matching"},
    "matching": {"errors", "model", "processing", "weights", "resolve"},
    "flags": {"engine"},
    "server": INFERENCE | {"flags"},
    "batch": INFERENCE | {"flags"},
    "train": INFERENCE | {"flags"},
}
RUNTIME_ONLY = {"testing"}  # imported by tests and benchmarks, never by blipserve itself


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text())


def run_time_nodes(module: str) -> list[ast.AST]:
    """Every node of the module except those under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for sub in ast.walk(node))
    return [node for node in ast.walk(tree(module)) if id(node) not in skipped]


def imported(module: str) -> list[tuple[str, str | None]]:
    """(blipserve module imported, name taken from it or None), wherever the import is."""
    found = []
    for node in run_time_nodes(module):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("blipserve")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blipserve"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (node.module, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    """module -> the blipserve modules it imports (``blipserve`` itself imports lazily)."""
    return {
        m: {target for target, _ in imported(m) if target in MODULES and target != "blipserve"}
        for m in MODULES
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def part(module: str) -> str:
    """``blipserve.engine.generate`` -> ``engine``."""
    return module.split(".")[1] if "." in module else ""


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_crosses_a_module():
    crossings = [
        f"{m} imports {name} from {source}"
        for m in MODULES
        for source, name in imported(m)
        if name and name.startswith("_") and not name.startswith("__")
    ]
    assert crossings == []


def third_party_names(module: str) -> set[str]:
    """Names a module binds to other libraries (``torch``, ``argparse``...): their private
    attributes are those libraries' business, not a seam between ours."""
    names = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("blipserve"):
            names |= {a.asname or a.name for a in node.names}
    return {name for name in names if not name.startswith("blipserve")}


def root_name(node: ast.expr) -> str:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def test_no_private_attribute_of_another_module_is_used():
    """``pipe._engine_options()``-style calls: a private attribute, used on something other
    than ``self``/``cls`` or another library, that the module itself never defines."""
    used = []
    for m in MODULES:
        defined = {
            getattr(node, "name", None) or getattr(node, "attr", None) or getattr(node, "id", "")
            for node in ast.walk(tree(m))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            or (isinstance(node, ast.Attribute | ast.Name) and isinstance(node.ctx, ast.Store))
        }
        outside = third_party_names(m) | {"self", "cls"}
        for node in ast.walk(tree(m)):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and root_name(node.value) not in outside
                and node.attr not in defined
            ):
                used.append(f"{m}:{node.lineno} {ast.unparse(node)}")
    assert used == []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_is_below_them(layer):
    wrong = sorted(
        f"{m} -> {target}"
        for m, targets in graph().items()
        if part(m) == layer
        for target in targets
        if part(target) not in ALLOWED[layer] | {layer}
    )
    assert wrong == []


def test_inference_never_imports_training_and_nothing_imports_testing():
    wrong = sorted(
        f"{m} -> {target}"
        for m, targets in graph().items()
        for target in targets
        if (part(target) == "train" and part(m) not in ("train", "cli", "testing"))
        or (part(target) in RUNTIME_ONLY and part(m) not in RUNTIME_ONLY)
    )
    assert wrong == []


def test_the_command_line_module_imports_only_train_main():
    """``blipserve train`` is parsed in cli.py; the trainers load when it runs."""
    assert {t for t in graph()["blipserve.cli"] if part(t) == "train"} == {"blipserve.train.main"}


def test_benchmarks_import_no_tests():
    offenders = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert offenders == []


def test_tests_import_no_other_test_module():
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.test_"):
                offenders.append(f"{path.name}: {node.module}")
    assert offenders == []
