"""Every layout, on generated trees of its on-disk form (and the real data when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from leuko.data import detect_layout, load_dataset
from leuko.data.layouts.bccd import square_crop
from leuko.data.layouts.cnmc import subject_of
from leuko.errors import LeukoError


def test_folder_layout(folder_tree: Path) -> None:
    index = load_dataset(folder_tree)
    assert index.layout == "folder"
    assert index.classes == ["eosinophil", "lymphocyte", "neutrophil"]
    assert index.class_counts() == {"eosinophil": 6, "lymphocyte": 6, "neutrophil": 6}
    assert all(s.group is None and s.crop is None for s in index.samples)
    assert index.targets()[:6] == [0] * 6


def test_pbc_layout_subtypes_and_stray_file(pbc_tree: Path) -> None:
    index = load_dataset(pbc_tree)
    assert index.layout == "pbc"
    assert index.class_counts() == {"basophil": 3, "eosinophil": 3, "ig": 4, "neutrophil": 4}
    assert index.subtype_counts() == {
        "ig": {"IG": 1, "MMY": 1, "MY": 1, "PMY": 1},
        "neutrophil": {"BNE": 1, "NEUTROPHIL": 1, "SNE": 2},
    }
    assert [(s.path.name, s.reason) for s in index.skipped] == [(".DS_1234.jpg", "not an image (unrecognised file content)")]
    assert all(s.subtype is None for s in index.samples if s.label in ("basophil", "eosinophil"))


def test_mooney_layout_keeps_source_split(mooney_tree: Path) -> None:
    index = load_dataset(mooney_tree)
    assert index.layout == "mooney"
    assert index.classes == ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert index.source_split_counts() == {"TEST": 8, "TEST_SIMPLE": 4, "TRAIN": 16}
    assert all(s.group is None for s in index.samples)  # file names do not identify the cell
    train_only = load_dataset(mooney_tree, source_splits=["TRAIN"])
    assert len(train_only) == 16
    with pytest.raises(LeukoError, match="VAL"):
        load_dataset(mooney_tree, source_splits=["VAL"])


def test_bccd_layout_crops_and_skips(bccd_tree: Path) -> None:
    index = load_dataset(bccd_tree)
    assert index.layout == "bccd"
    # fields 0, 1, 6 give one crop each; field 2 ("NEUTROPHIL, NEUTROPHIL") gives two
    assert index.class_counts() == {"eosinophil": 1, "lymphocyte": 1, "neutrophil": 3}
    reasons = {s.path.name: s.reason for s in index.skipped}
    assert reasons["BloodImage_00003.jpg"].startswith("several cell types")
    assert reasons["BloodImage_00004.jpg"] == "labels.csv names no cell type"
    assert reasons["BloodImage_00005.jpg"] == "no WBC box in the annotation"
    assert len(reasons) == 3
    assert any("not in JPEGImages" in n for n in index.notes)
    for s in index.samples:
        x0, y0, x1, y1 = s.crop  # type: ignore[misc]
        assert x1 - x0 == y1 - y0 > 0
        assert 0 <= x0 and 0 <= y0 and x1 <= 640 and y1 <= 480
        assert s.group == s.path.stem
    two = [s for s in index.samples if s.path.name == "BloodImage_00002.jpg"]
    assert len(two) == 2 and two[0].key != two[1].key


def test_square_crop_geometry() -> None:
    # centred square grown by the margin
    assert square_crop((100, 100, 200, 150), 640, 480, 0.0) == (100, 75, 200, 175)
    assert square_crop((100, 100, 200, 200), 640, 480, 0.1) == (90, 90, 210, 210)
    # shifted to stay inside, never outside
    assert square_crop((0, 0, 100, 100), 640, 480, 0.2) == (0, 0, 140, 140)
    assert square_crop((600, 440, 640, 480), 640, 480, 0.5) == (560, 400, 640, 480)
    # bigger than the image: shrunk to the short side
    assert square_crop((0, 0, 640, 480), 640, 480, 0.2) == (80, 0, 560, 480)


def test_bccd_margin_validated(bccd_tree: Path) -> None:
    with pytest.raises(LeukoError, match="margin must be between 0 and 1"):
        load_dataset(bccd_tree, "bccd", margin=2.0)
    wide = load_dataset(bccd_tree, "bccd", margin=0.3)
    tight = load_dataset(bccd_tree, "bccd", margin=0.0)
    side = lambda s: s.crop[2] - s.crop[0]  # noqa: E731
    assert sum(map(side, wide.samples)) > sum(map(side, tight.samples))


def test_cnmc_layout_groups_by_subject(cnmc_tree: Path) -> None:
    index = load_dataset(cnmc_tree)
    assert index.layout == "cnmc"
    assert index.classes == ["all", "hem"]
    counts = index.source_split_counts()
    assert counts == {"fold_0": 12, "fold_1": 12, "fold_2": 12, "validation": 3}
    groups = {s.group for s in index.samples}
    assert {"1", "2", "H1", "H6", "57", "H30"} <= groups
    val = [s for s in index.samples if s.source_split == "validation"]
    assert sorted((s.path.name, s.label, s.group) for s in val) == [
        ("1.bmp", "all", "57"), ("2.bmp", "hem", "H30"), ("3.bmp", "all", "57")]


def test_cnmc_subject_parsing() -> None:
    assert subject_of("UID_11_10_1_all.bmp") == "11"
    assert subject_of("UID_H10_43_1_hem.bmp") == "H10"
    assert subject_of("whatever.bmp") is None


def test_csv_layout(csv_manifest: Path) -> None:
    index = load_dataset(csv_manifest)
    assert index.layout == "csv"
    assert index.class_counts() == {"lympho": 4, "mono": 4}
    assert {s.group for s in index.samples} == {f"patient{i}" for i in range(4)}
    assert [s.reason for s in index.skipped] == ["line 10: file not found"]


def test_csv_missing_columns(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("file,class\nx.png,a\n")
    with pytest.raises(LeukoError, match="lacks column"):
        load_dataset(bad)


def test_detection(folder_tree: Path, pbc_tree: Path, mooney_tree: Path, bccd_tree: Path, cnmc_tree: Path, csv_manifest: Path) -> None:
    assert detect_layout(folder_tree) == "folder"
    assert detect_layout(pbc_tree) == "pbc"
    assert detect_layout(pbc_tree / "PBC_dataset_normal_DIB") == "pbc"
    assert detect_layout(mooney_tree) == "mooney"
    assert detect_layout(mooney_tree / "dataset2-master" / "images") == "mooney"
    assert detect_layout(bccd_tree) == "bccd"
    assert detect_layout(cnmc_tree) == "cnmc"
    assert detect_layout(csv_manifest) == "csv"


def test_bad_inputs(tmp_path: Path, folder_tree: Path) -> None:
    with pytest.raises(LeukoError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(LeukoError, match="unknown layout 'foo'; choose one of"):
        load_dataset(folder_tree, "foo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeukoError, match="cannot tell the layout"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(LeukoError):
        load_dataset(tmp_path / "empty", "folder")


def test_bad_files_skipped_or_strict(bad_tree: Path) -> None:
    index = load_dataset(bad_tree, "folder", verify="full", allow_empty_classes=True)
    reasons = {s.path.name: s.reason for s in index.skipped}
    assert reasons == {
        "truncated.jpg": "truncated image (file ends before the picture does)",
        "notes.jpg": "not an image (unrecognised file content)",
        "empty.jpg": "zero-byte file",
    }
    assert index.empty_classes == ["c_empty"]
    assert len(index) == 6
    with pytest.raises(LeukoError, match="empty"):
        load_dataset(bad_tree, "folder")  # empty class is an error for training
    with pytest.raises(LeukoError, match="unusable file"):
        load_dataset(bad_tree, "folder", strict=True, allow_empty_classes=True)


@pytest.mark.shared
def test_real_pbc(shared_datasets: Path) -> None:
    index = load_dataset(shared_datasets / "pbc")
    assert index.layout == "pbc"
    assert len(index) == 5966
    assert index.class_counts()["neutrophil"] == 1165
    assert index.subtype_counts()["neutrophil"] == {"BNE": 596, "NEUTROPHIL": 17, "SNE": 552}
    assert [s.path.name for s in index.skipped] == [".DS_169665.jpg"]


@pytest.mark.shared
def test_real_mooney_and_bccd(shared_datasets: Path) -> None:
    mooney = load_dataset(shared_datasets / "mooney")
    assert mooney.source_split_counts() == {"TEST": 2487, "TEST_SIMPLE": 71, "TRAIN": 1200}
    bccd = load_dataset(shared_datasets / "bccd", "bccd")
    assert len(bccd) > 300 and set(bccd.classes) == {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    assert len({s.group for s in bccd.samples}) < len(bccd)  # some fields hold two cells
