"""Shared fixtures: tiny generated datasets of every layout, and the real shared datasets.

Generated images are small random "cells" (a coloured disc with texture on a
pinkish background) so that distinct files really differ, which matters for
audits and for training smoke tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

from cells import make_cell, make_tree  # noqa: E402  (tests/ is on the path: see pyproject)


@pytest.fixture
def shared_datasets() -> Path:
    """``../shared/datasets``; skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared datasets at {SHARED}")
    return SHARED


@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    """``root/<class>/*.png``: 3 classes x 6 images."""
    root = tmp_path / "folder"
    for ci, cls in enumerate(["eosinophil", "lymphocyte", "neutrophil"]):
        for i in range(6):
            make_cell(root / cls / f"img_{i}.png", seed=100 * ci + i, hue=60 * ci)
    return root


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    """Good images mixed with a truncated JPEG, a text file named .jpg, a zero-byte file and an empty class."""
    root = tmp_path / "bad"
    for ci, cls in enumerate(["a", "b"]):
        for i in range(3):
            make_cell(root / cls / f"ok_{i}.jpg", seed=10 * ci + i, hue=80 * ci)
    good = (root / "a" / "ok_0.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "b" / "notes.jpg").write_text("this is not an image\n")
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "c_empty").mkdir()
    return root


@pytest.fixture
def pbc_tree(tmp_path: Path) -> Path:
    """``PBC_dataset_normal_DIB/<class>/<PREFIX>_<id>.jpg`` with sub-type prefixes and a macOS stray file."""
    root = tmp_path / "pbc"
    inner = root / "PBC_dataset_normal_DIB"
    files = {
        "basophil": ["BA_1", "BA_2", "BA_3"],
        "eosinophil": ["EO_1", "EO_2", "EO_3"],
        "ig": ["MY_1", "MMY_2", "PMY_3", "IG_4"],
        "neutrophil": ["SNE_1", "SNE_2", "BNE_3", "NEUTROPHIL_4"],
    }
    for ci, (cls, names) in enumerate(files.items()):
        for i, name in enumerate(names):
            make_cell(inner / cls / f"{name}.jpg", size=(72, 72), seed=ci * 10 + i, hue=50 * ci)
    (inner / "neutrophil" / ".DS_1234.jpg").write_bytes(b"\x00\x05\x16\x07Bud1" + b"\x00" * 64)
    return root


@pytest.fixture
def mooney_tree(tmp_path: Path) -> Path:
    """``dataset2-master/images/{TRAIN,TEST,TEST_SIMPLE}/<CLASS>/*.jpeg``."""
    root = tmp_path / "mooney"
    base = root / "dataset2-master" / "images"
    for si, (split, n) in enumerate([("TRAIN", 4), ("TEST", 2), ("TEST_SIMPLE", 1)]):
        for ci, cls in enumerate(["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]):
            for i in range(n):
                make_cell(base / split / cls / f"_{i}_{1000 + i}.jpeg", size=(80, 60), seed=si * 100 + ci * 10 + i, hue=40 * ci, fmt="JPEG")
    return root


@pytest.fixture
def bccd_tree(tmp_path: Path) -> Path:
    """BCCD: 6 smear fields, VOC boxes and labels.csv with one/two/no types and a field without WBC box."""
    root = tmp_path / "bccd"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    # image number -> (labels.csv category, list of WBC boxes)
    fields = {
        0: ("NEUTROPHIL", [(260, 177, 491, 376)]),
        1: ("EOSINOPHIL", [(10, 10, 110, 120)]),  # near the corner: crop must stay inside
        2: ("NEUTROPHIL, NEUTROPHIL", [(100, 100, 200, 200), (400, 250, 520, 380)]),
        3: ("NEUTROPHIL, EOSINOPHIL", [(100, 100, 200, 200), (400, 250, 520, 380)]),
        4: ("", [(100, 100, 200, 200)]),
        5: ("LYMPHOCYTE", []),
        6: ("LYMPHOCYTE", [(300, 200, 380, 290)]),
    }
    rows = [",Image,Category"]
    for n, (cat, boxes) in fields.items():
        name = f"BloodImage_{n:05d}"
        make_cell(root / "JPEGImages" / f"{name}.jpg", size=(640, 480), seed=n, hue=30 * n)
        objs = "".join(
            f"<object><name>WBC</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for b in boxes
        )
        objs += "<object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>50</ymax></bndbox></object>"
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>640</width><height>480</height><depth>3</depth></size>{objs}</annotation>"
        )
        rows.append(f',{n},"{cat}"' if "," in cat else f",{n},{cat}")
    rows.append(",99,NEUTROPHIL")  # a row for an image that is not there
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def cnmc_tree(tmp_path: Path) -> Path:
    """C-NMC 2019: training_data/fold_<k>/{all,hem}/UID_<subject>_... plus validation_data with a labels CSV."""
    root = tmp_path / "cnmc" / "C-NMC_Leukemia"
    k = 0
    for fold in range(3):
        for cls, subjects in (("all", [f"{fold * 2 + 1}", f"{fold * 2 + 2}"]), ("hem", [f"H{fold * 2 + 1}", f"H{fold * 2 + 2}"])):
            for subj in subjects:
                for img in range(3):
                    k += 1
                    make_cell(root / "training_data" / f"fold_{fold}" / cls / f"UID_{subj}_{img}_1_{cls}.bmp",
                              size=(64, 64), seed=k, hue=0 if cls == "all" else 90, fmt="BMP")
    vdir = root / "validation_data" / "C-NMC_test_prelim_phase_data"
    lines = ["Patient_ID,new_names,labels"]
    for i, (orig, lab) in enumerate([("UID_57_1_1_all.bmp", 1), ("UID_H30_2_1_hem.bmp", 0), ("UID_57_3_1_all.bmp", 1)], start=1):
        make_cell(vdir / f"{i}.bmp", size=(64, 64), seed=500 + i, hue=0 if lab else 90, fmt="BMP")
        lines.append(f"{orig},{i}.bmp,{lab}")
    (root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "cnmc"


@pytest.fixture
def csv_manifest(tmp_path: Path) -> Path:
    """``manifest.csv`` with relative paths, groups and a missing file."""
    root = tmp_path / "manifest"
    lines = ["path,label,group"]
    for i in range(8):
        cls = "mono" if i % 2 else "lympho"
        make_cell(root / "imgs" / f"{i}.png", seed=i, hue=0 if cls == "mono" else 100)
        lines.append(f"imgs/{i}.png,{cls},patient{i // 2}")
    lines.append("imgs/missing.png,mono,patient9")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


@pytest.fixture
def tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """60 generated cells in three classes, with the decoded-image cache kept inside the test's folder."""
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))
    return make_tree(tmp_path / "cells")
