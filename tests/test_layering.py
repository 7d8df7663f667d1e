"""The shape docs/architecture.md promises, read from the source (no import, no model):

- the floors: a module imports only its own floor or the floors below it (lazy imports inside functions
  included; imports under ``if TYPE_CHECKING:`` are annotations, not dependencies);
- no two modules import each other;
- no function in ``circuit_peft/`` over 50 body lines (docstring excluded);
- the benchmarks and examples import no private name of the library.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "circuit_peft"

# Bottom to top: the floors of docs/architecture.md ("Floors"). A top-level module or package of circuit_peft
# on each floor; a new one must be placed here (the test says so).
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "files", "runs", "stats", "distributed", "mixins"),
    ("arch", "compat", "validation", "fractions", "models", "interventions", "batching", "prefix", "tuner", "export"),
    ("taskdata",),
    ("circuit", "circuits"),
    ("evaluate", "locate"),
    ("cca", "select"),
    ("recipe", "compare"),
    ("cli", "commands", "research", "__init__", "data"),
)
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
MAX_BODY_LINES = 50


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return skip


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported circuit_peft module or name path) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "circuit_peft":
                base = node.module.split(".")
            else:
                continue
            out += [(node.lineno, ".".join(base + [a.name])) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "circuit_peft"]
    return out


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The longest circuit_peft module that ``target`` (a module or module.name path) names."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_import_stays_on_its_floor_or_goes_down():
    modules = _modules()
    unplaced = sorted({_top(m) for m in modules} - set(FLOOR))
    assert not unplaced, f"place these in FLOORS (tests/test_layering.py) and docs/architecture.md: {unplaced}"
    upward = []
    for name, path in modules.items():
        for line, target in _imports(name, path):
            dep = _resolve(target, modules)
            if dep and FLOOR[_top(dep)] > FLOOR[_top(name)]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {dep} (floor {FLOOR[_top(dep)]} > "
                              f"{FLOOR[_top(name)]})")
    assert not upward, "\n".join(upward)


def test_no_two_modules_import_each_other():
    modules = _modules()
    deps = {name: {d for _, t in _imports(name, path) if (d := _resolve(t, modules)) and d != name}
            for name, path in modules.items()}
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    pairs = sorted({tuple(sorted((a, b))) for a, ds in deps.items() for b in ds
                    if a in deps.get(b, ()) and a not in packages and b not in packages})
    assert not pairs, pairs


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _long_functions(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_BODY_LINES:
                out.append(f"{_shown(path)}:{node.lineno} {node.name} "
                           f"({body[-1].end_lineno - body[0].lineno + 1} body lines)")
    return out


def test_no_function_in_the_library_is_over_50_body_lines():
    long = [f for path in sorted(PACKAGE.rglob("*.py")) for f in _long_functions(path)]
    assert not long, "\n".join(long)


@pytest.mark.parametrize("folder", ["benchmarks", "examples"])
def test_drivers_import_no_private_name(folder):
    private = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for line, target in _imports("__main__", path):
            if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                private.append(f"{path.relative_to(ROOT)}:{line} {target}")
    assert not private, "\n".join(private)


def test_the_checks_can_fail(tmp_path):
    """The readers see what they must: a lazy upward import, a TYPE_CHECKING import (ignored), a long function."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from circuit_peft.recipe import x\n"
                   "def f():\n    from circuit_peft.compare import grid\n" + "    a = 1\n" * 51)
    assert [t for _, t in _imports("circuit_peft.m", src)] == ["circuit_peft.compare.grid"]
    assert len(_long_functions(src)) == 1
