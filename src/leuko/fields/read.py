"""Reading smear fields: one image with a one-line reason when it cannot be used, a folder of
fields, and VOC-annotated fields (true boxes) for detection evaluation."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from leuko.data.imageio import check_image, is_image_name, load_rgb
from leuko.errors import LeukoError
from leuko.fields.find import Box


def read_field(path: str | Path) -> np.ndarray:
    """Decode one field to RGB ``uint8``.

    Raises:
        LeukoError: one line naming the file and why it cannot be read (not an image,
            truncated, over the decompression-bomb limit, unreadable).
    """
    p = Path(path)
    if not p.is_file():
        raise LeukoError(f"no such field image: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_rgb(p)
    except (LeukoError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, ValueError) as exc:
        reason = check_image(p, full_decode=True)[1] or _short(str(exc), p)
        raise LeukoError(f"cannot read field {p}: {reason}") from None


def _short(message: str, path: Path) -> str:
    prefix = f"cannot read image {path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def list_fields(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (not its sub-folders), sorted by name.

    Raises:
        LeukoError: the folder is missing or holds no image.
    """
    root = Path(folder)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise LeukoError(f"no such field folder: {root}")
    found = sorted(p for p in root.iterdir() if p.is_file() and is_image_name(p) and not p.name.startswith("."))
    if not found:
        raise LeukoError(f"no field images in {root} (looked for {', '.join(sorted({'.jpg', '.png', '.tif', '.bmp'}))} files)")
    return found


def read_voc_boxes(path: str | Path, label: str = "WBC") -> list[Box]:
    """The ``label`` boxes (case-insensitive) of one Pascal VOC annotation file."""
    from leuko.data.layouts.bccd import read_voc

    _, _, objects = read_voc(Path(path))
    want = label.strip().upper()
    return [tuple(float(v) for v in b) for name, b in objects if name.strip().upper() == want]  # type: ignore[misc]


def voc_fields(root: str | Path, *, split: str | None = None, label: str = "WBC") -> list[tuple[Path, list[Box]]]:
    """``(image, true boxes)`` of a Pascal VOC folder (``JPEGImages/``, ``Annotations/``), optionally
    only the images named in ``ImageSets/Main/<split>.txt`` (BCCD ships ``train``, ``val``,
    ``trainval`` and ``test``). Every annotated image is a field, those without a ``label`` box too.

    Raises:
        LeukoError: not a VOC folder, an unknown split, or no annotated image.
    """
    base = Path(root)
    images, ann = base / "JPEGImages", base / "Annotations"
    if not images.is_dir() or not ann.is_dir():
        raise LeukoError(f"no VOC fields under {base}: expected JPEGImages/ and Annotations/")
    stems: Sequence[str] | None = None
    if split:
        lst = base / "ImageSets" / "Main" / f"{split}.txt"
        if not lst.is_file():
            have = sorted(p.stem for p in (base / "ImageSets" / "Main").glob("*.txt")) if (base / "ImageSets" / "Main").is_dir() else []
            raise LeukoError(f"no split {split!r} in {base}/ImageSets/Main" + (f"; have: {', '.join(have)}" if have else ""))
        stems = [s.strip() for s in lst.read_text(encoding="utf-8").split() if s.strip()]
    by_stem = {p.stem: p for p in images.iterdir() if is_image_name(p)}
    out: list[tuple[Path, list[Box]]] = []
    for stem in (stems if stems is not None else sorted(by_stem)):
        xml = ann / f"{stem}.xml"
        if stem not in by_stem or not xml.is_file():
            continue
        out.append((by_stem[stem], read_voc_boxes(xml, label)))
    if not out:
        raise LeukoError(f"no annotated fields under {base}" + (f" in split {split!r}" if split else ""))
    return out
