"""``pbc`` layout: Acevedo et al. 2020 peripheral blood cells (Barcelona).

``PBC_dataset_normal_DIB/<class>/<PREFIX>_<id>.jpg``, or the class folders
directly. The file-name prefix carries the sub-type for two classes:
neutrophils (``SNE`` segmented, ``BNE`` band, ``NEUTROPHIL`` unspecified) and
immature granulocytes (``MY``, ``MMY``, ``PMY``, ``IG``).
"""

from __future__ import annotations

from pathlib import Path

from leuko.data.layouts import register_layout
from leuko.data.layouts._scan import class_dirs, scan_class_folders
from leuko.data.samples import DatasetIndex, Sample
from leuko.errors import LeukoError

PBC_CLASSES = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
SUBTYPED_CLASSES = {"neutrophil", "ig"}
INNER = "PBC_dataset_normal_DIB"


def _class_root(root: Path) -> Path:
    inner = root / INNER
    return inner if inner.is_dir() else root


def _detect(root: Path) -> bool:
    if not root.is_dir():
        return False
    names = {d.name.lower() for d in class_dirs(_class_root(root))}
    return len(names & set(PBC_CLASSES)) >= 4 and names <= set(PBC_CLASSES)


def subtype_from_name(label: str, filename: str) -> str | None:
    """``SNE_123.jpg`` in ``neutrophil`` → ``"SNE"``; ``None`` for classes without sub-types."""
    if label not in SUBTYPED_CLASSES or "_" not in filename:
        return None
    return filename.split("_", 1)[0].upper()


@register_layout("pbc", "PBC (Acevedo 2020): [PBC_dataset_normal_DIB/]<class>/<PREFIX>_<id>.jpg", _detect, priority=30)
def load_pbc(root: Path, *, verify: str = "header") -> DatasetIndex:
    if not root.is_dir():
        raise LeukoError(f"layout 'pbc' needs a directory; {root} is a file")
    croot = _class_root(root)
    scan = scan_class_folders(croot, verify)
    if not scan.files:
        raise LeukoError(f"no class folders in {croot}: expected {INNER}/<class>/<image>")
    samples = [
        Sample(path=p, label=label, subtype=subtype_from_name(label, p.name))
        for label, files in sorted(scan.files.items())
        for p in files
    ]
    classes = sorted(label for label, files in scan.files.items() if files)
    unknown = sorted(set(scan.files) - set(PBC_CLASSES))
    notes = [f"class folders not in the PBC set: {', '.join(unknown)}"] if unknown else []
    return DatasetIndex(root, "pbc", samples, classes, scan.skipped, scan.empty_classes, notes)
