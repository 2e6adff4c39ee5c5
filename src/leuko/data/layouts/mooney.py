"""``mooney`` layout: Kaggle "Blood Cell Images" (``dataset2-master``).

``[dataset2-master/]images/{TRAIN,TEST,TEST_SIMPLE}/<CLASS>/*.jpeg``. The
images are augmented copies of ~350 source cells and the file names do not
identify the source cell, so the only leak-free split is the given one: each
sample keeps its ``source_split`` and no ``group`` (which would be a lie).
"""

from __future__ import annotations

from pathlib import Path

from leuko.data.layouts import register_layout
from leuko.data.layouts._scan import class_dirs, has_image_subfolders, scan_class_folders
from leuko.data.samples import DatasetIndex, Sample, SkippedItem
from leuko.errors import LeukoError

SPLIT_ROLES = {"TRAIN": "train", "TEST": "test", "TEST_SIMPLE": "exclude"}
"""How the ``source`` split preset uses each folder: TEST_SIMPLE holds the
source cells that TEST was augmented from, so it is neither train nor a second test."""


def _split_root(root: Path) -> Path | None:
    for cand in (root, root / "images", root / "dataset2-master" / "images"):
        if cand.is_dir() and (cand / "TRAIN").is_dir() and any((cand / s).is_dir() for s in ("TEST", "TEST_SIMPLE")):
            return cand
    return None


def _detect(root: Path) -> bool:
    sroot = _split_root(root)
    return sroot is not None and has_image_subfolders(sroot / "TRAIN")


@register_layout("mooney", "Kaggle blood-cells: [dataset2-master/]images/{TRAIN,TEST,TEST_SIMPLE}/<CLASS>/", _detect, priority=20)
def load_mooney(root: Path, *, verify: str = "header") -> DatasetIndex:
    sroot = _split_root(root)
    if sroot is None:
        raise LeukoError(f"no Mooney layout under {root}: expected dataset2-master/images/TRAIN and TEST")
    samples: list[Sample] = []
    skipped: list[SkippedItem] = []
    empty: set[str] = set()
    labels: set[str] = set()
    for split_dir in class_dirs(sroot):
        scan = scan_class_folders(split_dir, verify)
        skipped.extend(scan.skipped)
        empty.update(f"{split_dir.name}/{c}" for c in scan.empty_classes)
        for label, files in sorted(scan.files.items()):
            labels.add(label)
            samples.extend(Sample(path=p, label=label, source_split=split_dir.name) for p in files)
    classes = sorted({s.label for s in samples})
    notes = [
        "file names do not identify the source cell: only the given TRAIN/TEST split is leak-free",
    ]
    index = DatasetIndex(root, "mooney", samples, classes, skipped, sorted(empty), notes)
    index.source_roles = dict(SPLIT_ROLES)
    return index
