"""``csv`` layout: a manifest ``path,label[,group][,subtype][,split]``.

Relative paths are resolved against the manifest's folder. This is the escape
hatch for any dataset the other layouts do not know.
"""

from __future__ import annotations

import csv
from pathlib import Path

from leuko.data.layouts import register_layout
from leuko.data.layouts._scan import verify_files
from leuko.data.samples import DatasetIndex, Sample, SkippedItem
from leuko.errors import LeukoError

REQUIRED = ("path", "label")


def _detect(root: Path) -> bool:
    return root.is_file() and root.suffix.lower() == ".csv"


@register_layout("csv", "a CSV manifest with columns path,label[,group][,subtype][,split]", _detect, priority=10)
def load_csv(root: Path, *, verify: str = "header") -> DatasetIndex:
    if not root.is_file():
        raise LeukoError(f"layout 'csv' needs a .csv file; {root} is a folder")
    base = root.parent
    try:
        with open(root, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise LeukoError(f"manifest {root} lacks column(s) {', '.join(missing)}; header is {header}")
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError:
        raise LeukoError(f"manifest {root} is not UTF-8 text") from None
    pending: list[Sample] = []
    skipped: list[SkippedItem] = []
    for i, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            skipped.append(SkippedItem(root, f"line {i}: empty path or label"))
            continue
        p = Path(row["path"]).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            skipped.append(SkippedItem(p, f"line {i}: file not found"))
            continue
        pending.append(
            Sample(
                path=p,
                label=row["label"],
                group=row.get("group") or None,
                subtype=row.get("subtype") or None,
                source_split=row.get("split") or None,
            )
        )
    bad = verify_files([s.path for s in pending], verify)
    samples = [s for s in pending if s.path not in bad]
    skipped.extend(SkippedItem(p, r) for p, r in bad.items())
    classes = sorted({s.label for s in samples})
    return DatasetIndex(root, "csv", samples, classes, skipped)
