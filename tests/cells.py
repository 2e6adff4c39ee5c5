"""Synthetic cell images for tests (importable as ``cells`` from any test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_cell(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0, hue: int = 0, fmt: str | None = None,
              background: tuple[int, int, int] = (230, 200, 205)) -> Path:
    """Write a synthetic cell image (deterministic for ``seed``); ``background``: the smear's RGB (another lab's stain)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.float32)
    img[...] = background
    cx, cy = w / 2 + rng.uniform(-w / 8, w / 8), h / 2 + rng.uniform(-h / 8, h / 8)
    r = min(w, h) * rng.uniform(0.2, 0.35)
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    base = np.array([(120 + hue) % 256, 60, (170 + 2 * hue) % 256], dtype=np.float32)
    img[mask] = base + rng.normal(0, 25, size=(int(mask.sum()), 3))
    img += rng.normal(0, 6, size=img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format=fmt)
    return path


TINY_TRAIN = [
    "model.name=custom_cnn",
    "model.pretrained=none",
    "data.image_size=32",
    "data.num_workers=0",
    "train.epochs=2",
    "train.batch_size=8",
    "train.lr=0.01",
    "trainer.progress=false",
]
"""Overrides for a training run of seconds on :func:`make_tree`'s cells (the ``tiny_data`` fixture)."""

TINY_CLASSES = ("eosinophil", "lymphocyte", "neutrophil")


def make_tree(root: Path, per_class: int = 20) -> Path:
    """Three classes of ``per_class`` 48 px cells, each class its own hue, under ``root/<class>/``."""
    for ci, cls in enumerate(TINY_CLASSES):
        for i in range(per_class):
            make_cell(root / cls / f"{i}.png", size=(48, 48), seed=1000 * ci + i, hue=70 * ci)
    return root


TINY_RUN = [
    "model.name=custom_cnn",
    "model.pretrained=none",
    "data.image_size=32",
    "data.num_workers=0",
    "data.preprocess=[clahe]",
    "data.resize=pad",
    "model.freeze=backbone",
    "train.epochs=5",
    "train.batch_size=16",
    "train.lr=0.01",
    "trainer.progress=false",
]
"""Overrides for the inference tests' trained run: a custom_cnn at 32 px, head fitted on frozen features (seconds),
with CLAHE and ``pad`` resizing so exported metadata carries non-default preprocessing."""


def train_tiny(infer_base: Path, name: str, overrides: list[str]) -> Path:
    """``infer_base/name``: a run on ``infer_base/cells`` (the inference tests' ``tiny_run`` cells) with these
    overrides, trained unless it is there already (once per session)."""
    import pytest

    from leuko.train import train

    run = infer_base / name
    if not run.exists():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LEUKO_CACHE_DIR", str(infer_base / "cache"))
            train(None, run, overrides=overrides, data_path=infer_base / "cells", echo=lambda s: None)
    return run


def model_payload(path: "Path | str") -> dict:
    """A ``model.pt`` as the plain mapping stored on disk: its card's keys and ``state_dict`` (for assertions)."""
    from leuko.run.folder import read_model_file

    card, state = read_model_file(Path(path))
    return {**card.to_meta(), "state_dict": state}


def call(argv: list[str]) -> int:
    """Run the CLI in-process; return its exit code (Typer exits even on success)."""
    from leuko.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
