"""A few real BCCD fields (../shared/datasets/bccd), and the package's place in the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "leuko" / "fields"

ALLOWED = ("leuko.data", "leuko.models", "leuko.run", "leuko.infer", "leuko.errors", "leuko.fields")


@pytest.mark.shared
def test_bccd_fields(shared_datasets: Path) -> None:
    from leuko.fields.evaluate import evaluate_fields
    from leuko.fields.read import voc_fields

    root = shared_datasets / "bccd"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"needs BCCD at {root}")
    fields = voc_fields(root, split="test")[:12]
    report = evaluate_fields(fields)
    assert report.n_truth >= 10
    assert report.recall >= 0.9 and report.precision >= 0.85
    assert report.ap >= 0.85


def test_fields_imports_only_lower_layers() -> None:
    for src in sorted(SRC.rglob("*.py")):
        tree = ast.parse(src.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("leuko"):
                    assert name.startswith(ALLOWED), f"{src.name} imports {name}"
