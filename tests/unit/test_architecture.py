"""docs/ARCHITECTURE.md kept true by a test: import floors, one home for hook names, one home for errors."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "circuitlab"

FLOORS = {
    "errors": 1, "atomic": 1, "progress": 1,
    "models": 2, "results": 2,
    "tasks": 3, "report": 3,
    "analysis": 4,
    "patching": 5, "lens": 5, "attribution": 5, "graph": 5, "discovery": 5, "verify": 5, "heads": 5,
    "studies": 6,
    "runner": 7,
    "cli": 8, "__init__": 8,
}
# Imports across one floor that the architecture allows, (importer, imported).
SIDEWAYS = {("attribution", "patching"), ("discovery", "graph"), ("discovery", "patching"), ("verify", "graph"), ("verify", "discovery"),
            ("heads", "patching"), ("heads", "graph"), ("heads", "attribution"), ("discovery", "heads")}


def unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def runtime_imports(path: Path) -> list[str]:
    """circuitlab modules imported at run time (imports under `if TYPE_CHECKING:` are annotations only)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    names = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("circuitlab."):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("circuitlab.")]
    return names


SOURCES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_go_down_the_floors(path):
    here = unit(path)
    for module in runtime_imports(path):
        there = module.split(".")[1]
        if there == here:
            continue
        assert FLOORS[there] < FLOORS[here] or (here, there) in SIDEWAYS, (
            f"{path.relative_to(SRC)} imports {module}: floor {FLOORS[here]} ({here}) may not import floor "
            f"{FLOORS[there]} ({there}); see docs/ARCHITECTURE.md"
        )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_hook_names_are_spelled_only_in_models_hooks(path):
    if path == SRC / "models" / "hooks.py":
        return
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            assert not re.match(r"^(blocks\.|hook_|ln_final\.hook|unembed\.hook)", text), (
                f"{path.relative_to(SRC)} spells the hook name {text!r}; use circuitlab.models.hooks.hook_name")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_error_classes_live_in_errors_py(path):
    if path == SRC / "errors.py":
        return
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            assert not any(b.endswith("Error") or b == "Exception" or b == "ValueError" for b in bases) or \
                node.name.startswith("_"), f"{path.relative_to(SRC)} defines error class {node.name}; put it in errors.py"


def test_package_data_globs_match_files():
    """Every package-data glob in pyproject.toml names at least one file that exists (nothing stale)."""
    import tomllib

    config = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["circuitlab"]
    for pattern in globs:
        assert list(SRC.glob(pattern)), f"package-data {pattern!r} matches no file under src/circuitlab"
