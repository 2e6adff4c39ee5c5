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
