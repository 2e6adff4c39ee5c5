"""The shape of :mod:`leuko.data.preprocess`: its modules' layering, its re-exports, its cache keys.

The package was one module split by concern (steps, cells, stain, pipeline). These
tests keep the split honest: each module imports only those below it (no cycles), the
grammar stays free of numpy and OpenCV, every public name is still importable from the
package, and the fingerprints that key the decoded-image cache did not move.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import leuko.data.preprocess as pre

PACKAGE = Path(pre.__file__).parent
LAYERS = ["steps", "cells", "stain", "pipeline"]
"""Bottom first: a module may import only the ones before it."""


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_the_modules_are_exactly_the_layers() -> None:
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__") == sorted(LAYERS)


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_each_module_imports_only_the_layers_below_it(index: int) -> None:
    module = LAYERS[index]
    inside = {m.rsplit(".", 1)[1] for m in _imports(module) if m.startswith("leuko.data.preprocess.")}
    assert inside <= set(LAYERS[:index]), f"{module} imports {sorted(inside - set(LAYERS[:index]))}"
    assert "leuko.data.preprocess" not in _imports(module)  # not the package: it imports every layer


def test_the_grammar_needs_neither_numpy_nor_opencv() -> None:
    """Parsing a step spec does not depend on how the step is carried out."""
    heavy = {m for m in _imports("steps") if m.split(".")[0] in {"cv2", "numpy", "PIL", "torch"}}
    assert not heavy


def test_the_package_re_exports_every_public_name_of_its_modules() -> None:
    for module in LAYERS:
        mod = importlib.import_module(f"leuko.data.preprocess.{module}")
        for name in mod.__all__:
            assert name in pre.__all__, f"{module}.{name} is not re-exported"
            assert getattr(pre, name) is getattr(mod, name)
    assert sorted(pre.__all__) == sorted(n for m in LAYERS for n in importlib.import_module(f"leuko.data.preprocess.{m}").__all__)


@pytest.mark.parametrize(
    ("size", "steps", "fingerprint"),
    [
        (224, "", "0a5898a11341aab1"),
        (224, "cell-crop", "dfd89ce8caa66951"),
        (128, "rbc-crop:3,smear-norm", "f35416403a66d9ab"),
        (96, "center-crop:0.875,clahe,reinhard", "81cd85b36d08130e"),
    ],
)
def test_cache_fingerprints_are_unchanged(size: int, steps: str, fingerprint: str) -> None:
    """The decoded-image cache keys on these: a change here silently orphans every cache."""
    assert pre.build_preprocess(size, steps).fingerprint == fingerprint


def test_step_versions_are_unchanged() -> None:
    assert pre.step_versions("clahe") == {}
    assert pre.step_versions("cell-crop") == {"cell-crop": 2}
    assert pre.step_versions("rbc-crop") == {"cell-crop": 2, "rbc-crop": 1}
