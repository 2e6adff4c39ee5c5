"""Fixtures for the field tests: a real (untrained, so instant) classifier run and synthetic samples.

The run is a ``custom_cnn`` with random weights saved as a run folder
(``cell-crop`` preprocessing, 32 px): the field code only needs a predictor that
classifies crops the way a trained one does; what the classes are is irrelevant.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fieldgen import cut, make_field

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]


@pytest.fixture(scope="session")
def field_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from leuko.models import build_model
    from leuko.run.card import ModelCard
    from leuko.run.folder import save_model

    torch.manual_seed(0)
    model = build_model("custom_cnn", len(CLASSES), pretrained="none")
    info = model.leuko_info
    card = ModelCard.from_meta({
        "model": {"name": "custom_cnn", "head": "linear", "dropout": None, "pretrained": "none"},
        "classes": CLASSES,
        "input": {"image_size": 32, "resize": "stretch", "preprocess": ["cell-crop"], "mean": list(info.mean), "std": list(info.std)},
        "temperature": 1.0,
    })
    run = tmp_path_factory.mktemp("fields-run") / "run"
    run.mkdir()
    save_model(run / "model.pt", model, card)
    return run


@pytest.fixture(scope="session")
def predictor(field_run: Path):
    from leuko.infer import load_predictor

    return load_predictor(field_run, num_workers=0)


@pytest.fixture(scope="session")
def smear():
    """One drawn smear (640 x 300) with five white cells; fields are windows of it. The cell at
    (450, 40) is cut by the top edge of every field below y = 30."""
    return make_field((640, 300), wbcs=[(120, 150, 34), (300, 90, 32), (330, 220, 30), (520, 150, 34), (450, 40, 30)],
                      seed=7, n_rbc=60, n_platelets=10)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory, smear) -> Path:
    """Three overlapping 320 x 240 fields of :func:`smear` (the stage moved 160 px, then 160 px
    more) and one field with no white cell, as JPEGs."""
    root = tmp_path_factory.mktemp("sample") / "S-001"
    for i, left in enumerate((0, 160, 320)):
        cut(smear, left, 30, (320, 240)).save(root / f"field_{i}.jpg")
    make_field((320, 240), wbcs=[], seed=3).save(root / "field_3_empty.jpg")
    return root


@pytest.fixture
def voc_dir(tmp_path: Path) -> Path:
    """A VOC folder of four generated fields (two in ImageSets/Main/test.txt), one without a white cell."""
    root = tmp_path / "voc"
    specs = [dict(wbcs=[(160, 120, 34)]), dict(wbcs=[(120, 120, 32), (190, 124, 32)], lobes=3),
             dict(wbcs=[(12, 120, 34), (210, 110, 30)]), dict(wbcs=[])]
    for i, kw in enumerate(specs):
        f = make_field(seed=20 + i, **kw)
        f.save(root / "JPEGImages" / f"F_{i}.jpg")
        f.voc(root / "Annotations" / f"F_{i}.xml", f"F_{i}.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("F_1\nF_3\n")
    return root
