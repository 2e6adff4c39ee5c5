"""``cnmc`` layout: C-NMC 2019 leukemia (ALL vs normal "hem" cells), TCIA.

``[C-NMC_Leukemia/]training_data/fold_<k>/{all,hem}/UID_<subject>_<image>_<cell>_<all|hem>.bmp``
plus, when present, ``validation_data/`` with images renamed ``<n>.bmp`` and
a labels CSV (``Patient_ID,new_names,labels``; 1 = ALL, 0 = hem) that gives
the original name, hence the subject. ``group`` is the subject id (``H``
prefix for healthy donors), so no patient straddles train and test.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from leuko.data.layouts import register_layout
from leuko.data.layouts._scan import list_images, verify_files
from leuko.data.samples import DatasetIndex, Sample, SkippedItem
from leuko.errors import LeukoError

_UID = re.compile(r"^UID_(H?\d+)_", re.IGNORECASE)
LABELS = {"all": "all", "hem": "hem"}


def subject_of(filename: str) -> str | None:
    """``UID_11_10_1_all.bmp`` → ``"11"``; ``UID_H10_43_1_hem.bmp`` → ``"H10"``."""
    m = _UID.match(filename)
    return m.group(1).upper() if m else None


def _train_root(root: Path) -> Path | None:
    for cand in (root / "training_data", root / "C-NMC_Leukemia" / "training_data", root):
        if cand.is_dir() and any(p.is_dir() and p.name.startswith("fold_") for p in cand.iterdir()):
            return cand
    return None


def _detect(root: Path) -> bool:
    return root.is_dir() and _train_root(root) is not None


@register_layout("cnmc", "C-NMC 2019: training_data/fold_<k>/{all,hem}/UID_<subject>_*.bmp (+ validation_data)", _detect, priority=25)
def load_cnmc(root: Path, *, verify: str = "header") -> DatasetIndex:
    troot = _train_root(root)
    if troot is None:
        raise LeukoError(f"no C-NMC layout under {root}: expected training_data/fold_<k>/{{all,hem}}/")
    pending: list[Sample] = []
    skipped: list[SkippedItem] = []
    for fold in sorted(p for p in troot.iterdir() if p.is_dir() and p.name.startswith("fold_")):
        for cls_dir in sorted(p for p in fold.iterdir() if p.is_dir()):
            label = LABELS.get(cls_dir.name.lower())
            if label is None:
                skipped.append(SkippedItem(cls_dir, "unknown class folder (expected 'all' or 'hem')"))
                continue
            images, other = list_images(cls_dir)
            skipped.extend(other)
            for p in images:
                subject = subject_of(p.name)
                if subject is None:
                    skipped.append(SkippedItem(p, "file name has no UID_<subject>_ prefix"))
                    continue
                pending.append(Sample(path=p, label=label, group=subject, source_split=fold.name))
    pending.extend(_validation_samples(troot.parent, skipped))
    bad = verify_files([s.path for s in pending], verify)
    samples = [s for s in pending if s.path not in bad]
    skipped.extend(SkippedItem(p, r) for p, r in bad.items())
    classes = sorted({s.label for s in samples})
    empty = sorted(set(LABELS.values()) - set(classes)) if samples else []
    index = DatasetIndex(root, "cnmc", samples, classes, skipped, empty)
    roles = {s.source_split: "train" for s in samples if s.source_split and s.source_split.startswith("fold_")}
    roles["validation"] = "test"
    index.source_roles = roles
    return index


def _validation_samples(base: Path, skipped: list[SkippedItem]) -> list[Sample]:
    vroot = base / "validation_data"
    if not vroot.is_dir():
        return []
    csvs = sorted(vroot.rglob("*.csv"))
    if not csvs:
        skipped.append(SkippedItem(vroot, "validation_data has no labels CSV; its images are not used"))
        return []
    out: list[Sample] = []
    images = {p.name: p for p in vroot.rglob("*") if p.is_file() and p.suffix.lower() in (".bmp", ".png", ".jpg", ".jpeg")}
    with open(csvs[0], newline="") as fh:
        for row in csv.DictReader(fh):
            new_name = (row.get("new_names") or "").strip()
            original = (row.get("Patient_ID") or "").strip()
            raw = (row.get("labels") or "").strip()
            path = images.get(new_name)
            if path is None:
                skipped.append(SkippedItem(vroot / new_name, "listed in the labels CSV but missing"))
                continue
            if raw not in ("0", "1"):
                skipped.append(SkippedItem(path, f"label {raw!r} is not 0 (hem) or 1 (all)"))
                continue
            subject = subject_of(original)
            out.append(
                Sample(path=path, label="all" if raw == "1" else "hem", group=subject or f"val:{new_name}", source_split="validation")
            )
    return out
