"""``folder`` layout: ``ROOT/<class>/<image>``, the generic case."""

from __future__ import annotations

from pathlib import Path

from leuko.data.layouts import register_layout
from leuko.data.layouts._scan import has_image_subfolders, scan_class_folders
from leuko.data.samples import DatasetIndex, Sample
from leuko.errors import LeukoError


def _detect(root: Path) -> bool:
    return has_image_subfolders(root)


@register_layout("folder", "one sub-folder per class: ROOT/<class>/<image>", _detect, priority=90)
def load_folder(root: Path, *, verify: str = "header") -> DatasetIndex:
    if not root.is_dir():
        raise LeukoError(f"layout 'folder' needs a directory; {root} is a file")
    scan = scan_class_folders(root, verify)
    if not scan.files:
        raise LeukoError(f"no class sub-folders in {root}: expected ROOT/<class>/<image>")
    samples = [Sample(path=p, label=label) for label, files in sorted(scan.files.items()) for p in files]
    classes = sorted(label for label, files in scan.files.items() if files)
    return DatasetIndex(root, "folder", samples, classes, scan.skipped, scan.empty_classes)
