"""The layers of leuko import only downwards (``../shared/DESIGN.md``): a static check of every import.

Reading the source with ``ast`` is cheaper and stricter than importing: an import inside a function body
counts the same as one at the top, so a circle cannot hide in a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import leuko

SRC = Path(leuko.__file__).parent

LAYERS: dict[str, set[str]] = {
    # package: the leuko packages it may import (besides itself)
    "errors": set(),
    "paths": set(),
    "recipes": set(),
    "data": {"errors", "paths", "recipes"},
    "models": {"errors", "paths"},
    "run": {"errors", "paths", "recipes", "data", "models"},
    "infer": {"errors", "paths", "recipes", "data", "models", "run"},
    "fields": {"errors", "paths", "recipes", "data", "models", "run", "infer"},
    "train": {"errors", "paths", "recipes", "data", "models", "run", "infer"},
    "derive": {"errors", "paths", "recipes", "data", "models", "run", "infer", "train"},
    "evaluate": {"errors", "paths", "recipes", "data", "models", "run", "infer"},
    "explain": {"errors", "paths", "recipes", "data", "models", "run", "infer", "evaluate"},
    "reports": {"errors", "paths", "recipes", "data", "models", "run", "infer", "evaluate", "explain", "leuko"},
    "studies": {"errors", "paths", "recipes", "data", "models", "run", "infer", "train", "derive", "evaluate"},
    "serve": {"errors", "paths", "recipes", "data", "models", "run", "infer", "evaluate", "explain", "fields"},
}
"""What each layer may use; ``cli`` (and ``__main__``) may use everything, nothing may use ``cli`` or ``serve``."""


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "leuko"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return [n for n in out if n == "leuko" or n.startswith("leuko.")]


def _target(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "leuko"


FILES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_only(path: Path) -> None:
    pkg = _package(path)
    if pkg in ("cli", "__main__", "leuko"):
        for name in _imports(path):
            assert pkg == "cli" or _target(name) in ("errors", "cli"), f"{path.name} imports {name}"
        return
    assert pkg in LAYERS, f"{pkg} has no place in LAYERS: say which layers it may use"
    for name in _imports(path):
        target = _target(name)
        if target == pkg:
            continue
        assert target in LAYERS[pkg], f"{path.relative_to(SRC)} ({pkg}) imports {name}: {pkg} may not use {target}"


def test_the_run_layer_needs_no_trainer_evaluator_or_service() -> None:
    """``leuko.run`` is what everything downstream reads: importing it must not pull in a layer above."""
    assert not ({"train", "derive", "infer", "evaluate", "explain", "serve", "cli"} & LAYERS["run"])
