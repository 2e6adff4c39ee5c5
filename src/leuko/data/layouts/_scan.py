"""Scanning class folders: the part several layouts share.

``folder``, ``pbc``, ``mooney`` and ``cnmc`` all read ``<class>/<image>``
trees; they differ only in where those trees are and what extra fields a file
name carries. This module does the walking and the per-file checks once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable


from leuko.data.imageio import check_image, is_image_name
from leuko.data.samples import SkippedItem


@dataclass
class ScanResult:
    """Usable image files per class folder, plus what was skipped."""

    files: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[SkippedItem] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)


def verify_files(paths: list[Path], verify: str) -> dict[Path, str]:
    """Reasons for the unusable files among ``paths`` (``verify``: header/full/none)."""
    if verify == "none" or not paths:
        return {}
    if verify == "full":
        fn: Callable[[Path], str | None] = lambda p: check_image(p, full_decode=True)[1]  # noqa: E731
    else:
        fn = lambda p: check_image(p, full_decode=False)[1]  # noqa: E731
    with ThreadPoolExecutor(max_workers=4) as pool:
        reasons = list(pool.map(fn, paths, chunksize=64))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def list_images(folder: Path) -> tuple[list[Path], list[SkippedItem]]:
    """Image-named files directly in ``folder`` (sorted), and other files as skipped."""
    images: list[Path] = []
    skipped: list[SkippedItem] = []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            continue
        if is_image_name(p):
            images.append(p)
        elif not p.name.startswith("."):
            skipped.append(SkippedItem(p, f"not an image file suffix ({p.suffix or 'none'})"))
    return images, skipped


def class_dirs(root: Path) -> list[Path]:
    """Visible sub-folders of ``root``, sorted."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_folders(
    root: Path,
    verify: str,
    *,
    label_of: Callable[[str], str] = str.lower,
    dirs: Iterable[Path] | None = None,
) -> ScanResult:
    """Read ``root/<class>/<image>``; ``label_of`` maps a folder name to a label."""
    result = ScanResult()
    all_images: list[tuple[str, Path]] = []
    for d in dirs if dirs is not None else class_dirs(root):
        label = label_of(d.name)
        images, skipped = list_images(d)
        result.skipped.extend(skipped)
        result.files.setdefault(label, [])
        all_images.extend((label, p) for p in images)
    bad = verify_files([p for _, p in all_images], verify)
    for label, p in all_images:
        if p in bad:
            result.skipped.append(SkippedItem(p, bad[p]))
        else:
            result.files[label].append(p)
    result.empty_classes = sorted(label for label, files in result.files.items() if not files)
    return result


def has_image_subfolders(root: Path, min_classes: int = 1) -> bool:
    """True when ``root`` has at least ``min_classes`` sub-folders containing image files."""
    if not root.is_dir():
        return False
    n = 0
    for d in class_dirs(root):
        if any(is_image_name(p) for p in d.iterdir() if p.is_file()):
            n += 1
            if n >= min_classes:
                return True
    return False
