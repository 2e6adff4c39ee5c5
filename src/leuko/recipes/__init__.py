"""Configs shipped with the package (the demo); the studies' configs live in the repository's ``configs/``."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).parent


def recipe_path(name: str) -> Path:
    """Path of a shipped recipe, e.g. ``recipe_path("demo")``."""
    return RECIPES_DIR / f"{name}.yaml"
