"""``bccd`` layout: BCCD smear fields with Pascal VOC boxes and ``labels.csv``.

Each 640x480 field has boxes for RBC, WBC and platelets; ``labels.csv`` (from
Mooney's ``dataset-master``) gives the white-cell type(s) of each field. A
field yields one square crop per WBC box when its label names exactly one
cell type ("NEUTROPHIL, NEUTROPHIL" is one type, two cells). Fields with
several types, no type, no label row or no WBC box are skipped with the
reason: assigning a type to a box would be a guess. ``group`` is the field,
so two cells of one smear field never straddle a split.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

from leuko.data.layouts import register_layout
from leuko.data.layouts._scan import verify_files
from leuko.data.samples import Box, DatasetIndex, Sample, SkippedItem
from leuko.errors import LeukoError

DEFAULT_MARGIN = 0.15


def _detect(root: Path) -> bool:
    return root.is_dir() and (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir()


def square_crop(box: Box, width: int, height: int, margin: float) -> Box:
    """Square around ``box`` grown by ``margin`` (fraction of the longer side) on each
    side, shifted (not shrunk) to stay inside the image, and shrunk only when the
    square is larger than the image itself."""
    x0, y0, x1, y1 = box
    side = int(round(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)))
    side = max(1, min(side, width, height))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    left = min(max(0, left), width - side)
    top = min(max(0, top), height - side)
    return (left, top, left + side, top + side)


def read_voc(path: Path) -> tuple[int, int, list[tuple[str, Box]]]:
    """``(width, height, [(name, (xmin, ymin, xmax, ymax)), ...])`` from a VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise LeukoError(f"annotation {path} is not valid XML: {exc}") from None
    size = root.find("size")
    width = int(float(size.findtext("width", "0"))) if size is not None else 0
    height = int(float(size.findtext("height", "0"))) if size is not None else 0
    objects: list[tuple[str, Box]] = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        vals = [int(round(float(bb.findtext(k, "0")))) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append(((obj.findtext("name") or "").strip(), (vals[0], vals[1], vals[2], vals[3])))
    return width, height, objects


def read_labels(path: Path) -> dict[int, list[str]]:
    """Image number → list of cell types named in ``labels.csv`` (may be empty)."""
    out: dict[int, list[str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            raw_id = (row.get("Image") or "").strip()
            if not raw_id.isdigit():
                continue
            cats = [c.strip().lower() for c in (row.get("Category") or "").split(",") if c.strip()]
            out[int(raw_id)] = cats
    return out


@register_layout("bccd", "BCCD smears: JPEGImages/ + Annotations/ (VOC) + labels.csv; one crop per WBC box", _detect, priority=15)
def load_bccd(root: Path, *, verify: str = "header", margin: float = DEFAULT_MARGIN) -> DatasetIndex:
    if not _detect(root):
        raise LeukoError(f"no BCCD layout under {root}: expected JPEGImages/ and Annotations/")
    if not 0.0 <= margin <= 1.0:
        raise LeukoError(f"bccd margin must be between 0 and 1 (fraction of the box side); got {margin}")
    labels_path = root / "labels.csv"
    if not labels_path.is_file():
        raise LeukoError(f"BCCD layout needs {labels_path} (columns ,Image,Category)")
    labels = read_labels(labels_path)
    images = sorted(p for p in (root / "JPEGImages").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    bad = verify_files(images, verify)
    samples: list[Sample] = []
    skipped: list[SkippedItem] = []
    present: set[int] = set()
    for img in images:
        if img in bad:
            skipped.append(SkippedItem(img, bad[img]))
            continue
        try:
            number = int(img.stem.rsplit("_", 1)[-1])
        except ValueError:
            skipped.append(SkippedItem(img, "file name has no image number (BloodImage_NNNNN)"))
            continue
        present.add(number)
        ann = root / "Annotations" / (img.stem + ".xml")
        if not ann.is_file():
            skipped.append(SkippedItem(img, "no annotation file"))
            continue
        if number not in labels:
            skipped.append(SkippedItem(img, "no row in labels.csv"))
            continue
        types = sorted(set(labels[number]))
        if not types:
            skipped.append(SkippedItem(img, "labels.csv names no cell type"))
            continue
        if len(types) > 1:
            skipped.append(SkippedItem(img, f"several cell types ({', '.join(types)}): cannot tell which box is which"))
            continue
        width, height, objects = read_voc(ann)
        boxes = [b for name, b in objects if name.upper() == "WBC"]
        if not boxes:
            skipped.append(SkippedItem(img, "no WBC box in the annotation"))
            continue
        if width <= 0 or height <= 0:
            from PIL import Image

            with Image.open(img) as im:
                width, height = im.size
        for box in boxes:
            samples.append(
                Sample(
                    path=img,
                    label=types[0],
                    group=img.stem,
                    crop=square_crop(box, width, height, margin),
                )
            )
    classes = sorted({s.label for s in samples})
    notes = []
    orphan = sorted(set(labels) - present)
    if orphan:
        notes.append(f"labels.csv has {len(orphan)} rows for images not in JPEGImages/ (ignored)")
    return DatasetIndex(root, "bccd", samples, classes, skipped, [], notes)
