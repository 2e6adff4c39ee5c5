"""Synthetic smear fields for the field tests: red cells, platelets and white cells with known boxes.

Drawn like a Romanowsky-stained smear photographed at 40x: a pale grey
background, pink red cells (a paler centre) about ``rbc`` pixels across,
small purple platelets, and white cells (lavender cytoplasm, a purple-blue
nucleus of one to three lobes). Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

BACKGROUND = (222, 220, 226)
RBC = (214, 150, 160)
CYTOPLASM = (200, 180, 222)
NUCLEUS = (110, 70, 170)
PLATELET = (140, 90, 180)


@dataclass
class Field:
    image: np.ndarray
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    """True white-cell boxes (whole cell, clipped to the frame)."""

    def save(self, path: Path, quality: int = 92) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.image).save(path, quality=quality) if path.suffix.lower() in (".jpg", ".jpeg") else Image.fromarray(self.image).save(path)
        return path

    def voc(self, path: Path, name: str) -> Path:
        h, w = self.image.shape[:2]
        objs = "".join(
            f"<object><name>WBC</name><bndbox><xmin>{int(b[0])}</xmin><ymin>{int(b[1])}</ymin>"
            f"<xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>"
            for b in self.boxes
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height>"
                        f"<depth>3</depth></size>{objs}</annotation>")
        return path


def make_field(
    size: tuple[int, int] = (320, 240),
    *,
    wbcs: list[tuple[float, float, float]] = (),
    rbc: float = 40.0,
    n_rbc: int = 18,
    n_platelets: int = 4,
    lobes: int = 1,
    seed: int = 0,
    canvas_offset: tuple[int, int] = (0, 0),
    canvas: np.ndarray | None = None,
) -> Field:
    """A field ``size`` (width, height) with white cells at ``wbcs`` = ``(x, y, radius)`` (pixels).

    ``canvas``/``canvas_offset``: cut the field out of a larger drawn smear (overlapping fields
    of one sample); see :func:`make_smear`.
    """
    w, h = size
    if canvas is not None:
        ox, oy = canvas_offset
        img = canvas[oy:oy + h, ox:ox + w].copy()
        return Field(img, [])
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[...] = BACKGROUND
    yy, xx = np.mgrid[0:h, 0:w]
    placed = [(x, y, r * 1.25) for x, y, r in wbcs]
    for _ in range(n_rbc * 20):
        if n_rbc <= 0:
            break
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rbc / 2 * rng.uniform(0.9, 1.1)
        if any((x - px) ** 2 + (y - py) ** 2 < (r + pr) ** 2 * 0.8 for px, py, pr in placed):
            continue
        placed.append((x, y, r))
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        disc = d2 < r * r
        img[disc] = RBC
        img[d2 < (0.35 * r) ** 2] = (np.asarray(RBC) + np.asarray(BACKGROUND)) / 2
        n_rbc -= 1
    for _ in range(n_platelets):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if any((x - px) ** 2 + (y - py) ** 2 < (pr + 6) ** 2 for px, py, pr in placed):
            continue
        img[(xx - x) ** 2 + (yy - y) ** 2 < (0.12 * rbc) ** 2] = PLATELET
    boxes = []
    for x, y, r in wbcs:
        img[(xx - x) ** 2 + (yy - y) ** 2 < r * r] = CYTOPLASM
        rn = 0.6 * r
        if lobes <= 1:
            img[((xx - x) / 1.0) ** 2 + ((yy - y) / 0.9) ** 2 < rn * rn] = NUCLEUS
        else:
            for k in range(lobes):
                a = 2 * np.pi * k / lobes + 0.3
                cx, cy = x + 0.35 * r * np.cos(a), y + 0.35 * r * np.sin(a)
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.3 * r) ** 2] = NUCLEUS
        boxes.append((max(0.0, x - r), max(0.0, y - r), min(float(w), x + r), min(float(h), y + r)))
    img += rng.normal(0, 3.0, img.shape)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    return Field(np.clip(img, 0, 255).astype(np.uint8), boxes)


def cut(smear: Field, left: int, top: int, size: tuple[int, int]) -> Field:
    """The window ``size`` at ``(left, top)`` of a larger drawn smear, its boxes clipped (those
    with at least a third of their width and height inside)."""
    w, h = size
    img = smear.image[top:top + h, left:left + w].copy()
    boxes = []
    for x0, y0, x1, y1 in smear.boxes:
        cx0, cy0, cx1, cy1 = max(x0 - left, 0), max(y0 - top, 0), min(x1 - left, w), min(y1 - top, h)
        if cx1 - cx0 > (x1 - x0) / 3 and cy1 - cy0 > (y1 - y0) / 3:
            boxes.append((float(cx0), float(cy0), float(cx1), float(cy1)))
    return Field(img, boxes)
