"""The package's layers (docs/development.md, "The architecture"), read from the source: every
import of every module (those under ``TYPE_CHECKING`` too) goes to its own layer or one below,
no import cycle, and an implementation file knows only the problem description, the options and
the layers below, never the front, the layouts, the table or another implementation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cct_loss"

#: Each module's layer, higher above lower (a folder stands for every module in it).
LAYERS = {
    "cct_loss": 6,  # __init__: the public names
    "cct_loss.clients": 5,  # the losses called as other libraries call theirs
    "cct_loss.front": 4,
    "cct_loss.implementations": 3,
    "cct_loss.problem": 2,
    "cct_loss.maths": 1,
    "cct_loss.options": 0,
    "cct_loss.checks": 0,
    "cct_loss.shortcuts": 0,
    "cct_loss.distributed": 0,
    # beside the layers: state and comparisons, on top of the base
    "cct_loss.queue": 1,
    "cct_loss.baselines": 1,
}

#: The implementation files and the modules of their own that each may import.
KERNELS = {
    "cct_loss.implementations.dense": {"cct_loss.implementations.dense_sides"},
    "cct_loss.implementations.dense_sides": set(),
    "cct_loss.implementations.dense_two_way": set(),
    "cct_loss.implementations.chunked": set(),
    "cct_loss.implementations.sdpa": set(),
    "cct_loss.implementations.triton_op": {
        "cct_loss.implementations.triton_kernels",
        "cct_loss.implementations.triton_tiles",
    },
    "cct_loss.implementations.triton_kernels": set(),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The package modules ``name`` imports (relative imports resolved; ``from . import x``
    names the module ``x`` where there is one)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def _layer(name: str) -> int:
    while name not in LAYERS:
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


GRAPH = {name: _imports(name) for name in MODULES}


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        _layer(name)  # raises KeyError at the top for a module outside the plan


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_from_a_layer_above(name: str) -> None:
    upward = [m for m in GRAPH[name] if _layer(m) > _layer(name)]
    assert not upward, f"{name} (layer {_layer(name)}) imports {upward} from above"


def test_no_import_cycle() -> None:
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_an_implementation_knows_only_the_problem_and_the_options(name: str) -> None:
    allowed_own = KERNELS[name]
    for target in GRAPH[name]:
        if target.startswith("cct_loss.implementations."):
            assert target in allowed_own, f"{name} imports another implementation: {target}"
        else:
            assert target == "cct_loss.problem.description" or _layer(target) <= 1, (
                f"{name} imports {target}: a kernel knows the problem description, the options "
                "and the shared maths only"
            )


def test_the_checker_sees_relative_and_type_checking_imports() -> None:
    """The reader resolves ``from ..x import y`` and finds imports under ``TYPE_CHECKING``."""
    assert "cct_loss.implementations.table" in GRAPH["cct_loss.front.route"]
    assert "cct_loss.options" in GRAPH["cct_loss.front.functional"]  # also TYPE_CHECKING there
    assert "cct_loss.problem.description" in GRAPH["cct_loss.implementations.chunked"]
    assert _layer("cct_loss.front.route") > _layer("cct_loss.implementations.table")
