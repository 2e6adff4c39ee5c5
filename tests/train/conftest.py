"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from cells import make_tree


@pytest.fixture
def tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """60 generated cells in three classes, with the decoded-image cache kept inside the test's folder."""
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))
    return make_tree(tmp_path / "cells")
