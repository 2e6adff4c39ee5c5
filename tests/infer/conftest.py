"""Fixtures for inference: one tiny trained run (and its ONNX export) per session, and image folders.

The run is a custom_cnn at 32 px on synthetic cells, its head trained on the
fast feature path (frozen backbone: a few seconds, no Lightning loop), with
CLAHE and ``pad`` resizing so the exported metadata carries non-default
preprocessing, and enough validation images for a fitted temperature.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cells import TINY_CLASSES, TINY_RUN, make_cell, train_tiny

CLASSES = list(TINY_CLASSES)


@pytest.fixture(scope="session")
def infer_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infer")


@pytest.fixture(scope="session")
def tiny_run(infer_base: Path) -> Path:
    """A trained run folder (3 classes x 40 synthetic cells; temperature fitted on 12 validation images)."""
    data = infer_base / "cells"
    for ci, cls in enumerate(CLASSES):
        for i in range(40):
            make_cell(data / cls / f"{i}.png", size=(48, 40), seed=1000 * ci + i, hue=70 * ci)
    return train_tiny(infer_base, "run", TINY_RUN)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run: Path) -> Path:
    """``tiny_run/model.onnx`` written by :func:`leuko.infer.export_onnx`."""
    from leuko.infer import export_onnx

    return export_onnx(tiny_run).path


@pytest.fixture(scope="session")
def new_images(infer_base: Path) -> Path:
    """Images the run never saw: PNGs and larger non-square JPEGs (JPEG draft decoding, padding)."""
    root = infer_base / "new"
    for ci in range(len(CLASSES)):
        for i in range(4):
            make_cell(root / f"png_{ci}_{i}.png", size=(44, 52), seed=9000 + 10 * ci + i, hue=70 * ci)
            make_cell(root / "jpg" / f"cell_{ci}_{i}.jpg", size=(150, 110), seed=9500 + 10 * ci + i, hue=70 * ci, fmt="JPEG")
    return root


@pytest.fixture
def folder_with_corrupt(new_images: Path, tmp_path: Path) -> Path:
    """A copy of :func:`new_images` plus a truncated JPEG and a text file named ``.png``."""
    root = tmp_path / "mixed"
    shutil.copytree(new_images, root)
    good = (root / "jpg" / "cell_0_0.jpg").read_bytes()
    (root / "jpg" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (root / "notes.png").write_text("not an image\n")
    return root


def _split_seed(run: Path) -> int:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed = cfg["data"].get("split_seed")
    return int(cfg["train"]["seed"] if seed is None else seed)


@pytest.fixture(scope="session")
def seed_one(infer_base: Path, tiny_run: Path) -> Path:
    """tiny_run's recipe and split with another training seed (another random backbone: other answers)."""
    return train_tiny(infer_base, "seed1", [*TINY_RUN, "train.seed=1", f"data.split_seed={_split_seed(tiny_run)}"])


@pytest.fixture(scope="session")
def ensemble(infer_base: Path, tiny_run: Path, seed_one: Path) -> Path:
    from leuko.derive.ensemble import build_ensemble_run

    out = infer_base / "ensemble"
    if not out.exists():
        build_ensemble_run([tiny_run, seed_one], out, echo=lambda s: None)
    return out


@pytest.fixture(scope="session")
def home_run(infer_base: Path, tiny_run: Path) -> Path:
    """A second run on tiny_run's cells and split: another size and no CLAHE, so its answers differ."""
    overrides = [o for o in TINY_RUN if not o.startswith(("data.image_size", "data.preprocess"))]
    return train_tiny(infer_base, "home", [*overrides, "data.image_size=40"])


@pytest.fixture(scope="session")
def routed(infer_base: Path, home_run: Path, tiny_run: Path) -> Path:
    from leuko.derive.route import build_route

    out = infer_base / "routed"
    if not out.exists():
        build_route(home_run, tiny_run, out, echo=lambda s: None)
    return out
