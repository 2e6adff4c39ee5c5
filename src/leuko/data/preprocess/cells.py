"""Finding the white cell and the window around it: what ``cell-crop`` and ``rbc-crop`` cut.

Sources frame their cells differently (PBC's frames hold the cell at 0.3-0.6 of the
side, BCCD's box crops at 0.7-0.8), and a model trained on one framing transfers
badly to another (docs/robustness.md). So the geometric steps find the cell and cut
a square around it whatever the source did:

* :func:`find_cell` locates the white cell by its stained nucleus and outlines its
  cytoplasm (:class:`CellBox`);
* :func:`cell_crop_window` sizes the square by the cell itself (``cell-crop``: the
  cell spans a fixed share of the side);
* :func:`red_cell_diameter` measures the red cells around it, the one object of known
  size in every smear, and :func:`rbc_crop_window` sizes the square in red-cell
  diameters (``rbc-crop``: a fixed physical field, so cell sizes stay comparable);
* :func:`crop_window` cuts either window, filling what lies past the image with the
  smear's background.

The pixels these produce are cached: a change to the search or to the ruler must bump
:data:`~leuko.data.preprocess.steps.CELL_CROP_VERSION` or
:data:`~leuko.data.preprocess.steps.RBC_CROP_VERSION`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from leuko.data.imageio import filled_window
from leuko.data.preprocess.steps import DEFAULT_CELL_SHARE
from leuko.errors import LeukoError

_CELL_WORK = 128
"""Side of the working copy the cell is searched in: enough to outline a nucleus in any
framing, and it makes the search cost the same (a few ms) for every source size."""

_NUCLEUS_MIN_SCORE = 20.0
"""Lowest blue-minus-green (0-255 units) that can be a stained nucleus: below it there is
no nucleus in the image whatever Otsu says (a blank or grey frame)."""

_NUCLEUS_MIN_AREA = 0.002
"""Smallest nucleus, as a share of the frame: smaller blobs are dye specks and debris."""

_CENTRE_SIGMA = 0.35
"""How strongly the search prefers the frame's centre (Gaussian width, share of the side):
datasets are framed around their cell, but a second cell or a neighbour's edge may be bigger."""

_CYTOPLASM_GROWTH = 1.5
"""The cell box may extend to this many times the nucleus's side: cytoplasm is found as
non-background pixels joined to the nucleus, and red cells touching it must not drag the box away."""

_FOREGROUND_DELTA = 16.0
"""How much darker than the background (grey level, 0-255) a pixel must be to count as cell."""


@dataclass(frozen=True)
class CellBox:
    """A white cell found by :func:`find_cell`, in pixels of the image searched.

    Attributes:
        nucleus: ``(x0, y0, x1, y1)`` of the stained nucleus (lobes joined).
        cell: ``(x0, y0, x1, y1)`` of nucleus plus cytoplasm.
        score: the nucleus's mean blue-minus-green (how clearly stained it is).
    """

    nucleus: tuple[float, float, float, float]
    cell: tuple[float, float, float, float]
    score: float

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.cell
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    @property
    def size(self) -> float:
        """The cell's longer side: what ``cell-crop`` scales to a fixed share of its output."""
        x0, y0, x1, y1 = self.cell
        return float(max(x1 - x0, y1 - y0))

    def scaled(self, fx: float, fy: float) -> "CellBox":
        sx = lambda b: (b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy)  # noqa: E731
        return CellBox(sx(self.nucleus), sx(self.cell), self.score)


def find_cell(image: np.ndarray) -> CellBox | None:
    """Locate the white cell of an RGB ``uint8`` image; ``None`` when there is none.

    Romanowsky stains (May-Grünwald-Giemsa, Wright, Leishman) colour a
    leukocyte nucleus purple-blue while red cells and background stay pink,
    beige or grey. So, on a small blurred copy:

    1. *nucleus score* = blue minus green: high on nuclei (and basophil
       granules), near zero or negative on red cells and background, in every
       stain of that family (PBC's and BCCD's included) whatever the brightness;
    2. *threshold* = the larger of Otsu's and half the 99th percentile (Otsu
       alone splits lavender cytoplasm from background in pale, blurred smears),
       never below :data:`_NUCLEUS_MIN_SCORE` (so a blank frame finds nothing);
    3. *morphology*: an opening drops specks, a closing joins the lobes of a
       segmented nucleus into one component;
    4. *which component*: the largest after weighting by closeness to the
       centre (datasets frame their cell, neighbours sit at the edges), at least
       :data:`_NUCLEUS_MIN_AREA` of the frame;
    5. *cytoplasm*: non-background pixels joined to the nucleus, outlined
       along rays from the nucleus (:func:`_star_extent`), so touching red
       cells or a neighbour do not drag the box away.

    Returns the boxes in the pixels of ``image``.
    """
    image = _as_rgb_uint8(image)
    h, w = image.shape[:2]
    n = _CELL_WORK
    small = cv2.resize(image, (n, n), interpolation=cv2.INTER_AREA)
    f = cv2.GaussianBlur(small.astype(np.float32), (3, 3), 0)
    score = f[..., 2] - f[..., 1]
    otsu, _ = cv2.threshold(np.clip(score, 0, 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(float(otsu), 0.5 * float(np.percentile(score, 99)), _NUCLEUS_MIN_SCORE)
    mask = (score > thr).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    k = max(3, int(round(n * 0.055)) | 1)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    best, best_weight = 0, 0.0
    for i in range(1, count):
        area = float(stats[i, cv2.CC_STAT_AREA])
        if area < _NUCLEUS_MIN_AREA * n * n:
            continue
        dist = math.hypot(centroids[i, 0] - n / 2, centroids[i, 1] - n / 2) / n
        weight = area * math.exp(-((dist / _CENTRE_SIGMA) ** 2))
        if weight > best_weight:
            best, best_weight = i, weight
    if best == 0:
        return None
    nucleus = labels == best
    x, y, bw, bh = (int(v) for v in stats[best, :4])
    if float(score[nucleus].mean()) < _NUCLEUS_MIN_SCORE:
        return None
    # Cytoplasm: pixels clearly darker than the background, joined to the nucleus.
    grey = f.mean(axis=2)
    background = float(np.percentile(grey, 95))
    fg = (background - grey > _FOREGROUND_DELTA).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    fg[(labels > 0) & ~nucleus] = 0  # another cell's nucleus is never this cell's cytoplasm
    fg[nucleus] = 1
    _, fg_labels = cv2.connectedComponents(fg, connectivity=8)
    ids = np.unique(fg_labels[nucleus])
    region = np.isin(fg_labels, ids[ids > 0])
    region |= nucleus
    cell = _star_extent(region, nucleus, (x, y, x + bw, y + bh))
    box = CellBox((float(x), float(y), float(x + bw), float(y + bh)), cell, float(score[nucleus].mean()))
    return box.scaled(w / n, h / n)


_RAYS = 32


def _star_extent(region: np.ndarray, nucleus: np.ndarray, nbox: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    """Box of the cell outline seen from the nucleus along :data:`_RAYS` rays.

    Along each ray the cell reaches as far as the region (nucleus + joined
    cytoplasm) does, at most :data:`_CYTOPLASM_GROWTH` nucleus half-sides.
    A neighbouring cell or red cell touching the cytoplasm lengthens a few
    rays only, so each ray is capped at 1.25 times the median ray: the box
    follows the cell, not what leans on it. The nucleus is always inside.
    """
    n = region.shape[0]
    ys, xs = np.nonzero(nucleus)
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    x0, y0, x1, y1 = nbox
    reach = _CYTOPLASM_GROWTH * max(x1 - x0, y1 - y0) / 2.0 + math.hypot(cx - (x0 + x1) / 2, cy - (y0 + y1) / 2)
    t = np.arange(0.0, reach, 0.5)
    a = np.linspace(0.0, 2 * math.pi, _RAYS, endpoint=False)
    px, py = cx + np.cos(a)[:, None] * t, cy + np.sin(a)[:, None] * t
    ok = (px >= 0) & (px < n) & (py >= 0) & (py < n)
    inside = np.zeros(px.shape, bool)
    inside[ok] = region[py[ok].astype(int), px[ok].astype(int)]
    # how far each ray stays in the region: its last inside sample
    last = np.where(inside.any(axis=1), inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1), 0)
    ext = t[last] + 0.5
    ext = np.minimum(ext, 1.25 * float(np.median(ext)))
    ex, ey = cx + np.cos(a) * ext, cy + np.sin(a) * ext
    return (
        float(max(0.0, min(ex.min(), x0))),
        float(max(0.0, min(ey.min(), y0))),
        float(min(float(n), max(ex.max(), x1))),
        float(min(float(n), max(ey.max(), y1))),
    )


def cell_crop_window(cell: CellBox, share: float) -> tuple[int, int, int]:
    """``(left, top, side)`` of the square that makes ``cell`` span ``share`` of its side.

    The window may reach past the image (a tight crop from another lab): see
    :func:`crop_window` for how that part is filled.
    """
    cx, cy = cell.center
    side = max(8, int(round(cell.size / share)))
    return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side


_RBC_WORK = 256
"""Side of the working copy red cells are measured in: a PBC red cell is ~50 px across there."""

_RBC_MIN_DIFF = 14.0
"""How far (CIELAB units) from the background's colour a pixel must be to belong to a cell."""

_RBC_MIN_PEAKS = 3
"""Fewer distance-transform peaks than this outside the white cell: no ruler (a tight crop)."""

_RBC_WBC_RATIO = (0.8, 4.0)
"""Plausible white-cell size in red-cell diameters (a small lymphocyte ~1, a large monocyte ~3):
outside it the measurement is taken for a failure and ``rbc-crop`` falls back to ``cell-crop``'s share."""


def red_cell_diameter(image: np.ndarray, cell: CellBox | None = None) -> float | None:
    """Typical red-cell diameter in pixels of ``image`` (RGB ``uint8``); ``None`` if there are too few red cells,
    or, given the white ``cell``, when its size is not a white cell's in that ruler (:data:`_RBC_WBC_RATIO`).

    Red cells are the one object of known size in every blood smear (about
    7.5 um), so they measure a source's magnification without a calibration
    slide. On a working copy: pixels far (CIELAB) from the background colour
    (the median of the brightest tenth) are cells; holes are filled (central
    pallor); stained pixels and the white cell, grown, are left out. The
    distance to the background peaks at a red cell's centre at about its
    radius, even where red cells touch (the peaks stay apart), so the 75th
    percentile of the local maxima, doubled, is the diameter (the upper part,
    because a cell cut by the frame or overlapped peaks lower).
    Measured against BCCD's red-cell boxes (356 crops, as decoded for ``rbc-crop``): 0.80 of the
    boxes' longer side (10th-90th percentile 0.63-1.06; a box includes what overlaps its cell); on
    PBC ~70 px (quartiles 66-75) in its 360 px frames; none in 8% of PBC and 16% of BCCD images.
    Known weak spot: where a box's context reaches past its field, the flat fill can pass for the
    background and a crowded field reads about 2x too large (26 of BCCD's 356).
    """
    image = _as_rgb_uint8(image)
    h, w = image.shape[:2]
    k = _RBC_WORK / max(h, w)
    small = cv2.resize(image, (max(8, round(w * k)), max(8, round(h * k))), interpolation=cv2.INTER_AREA)
    lab = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32), (3, 3), 0)
    light = lab[..., 0]
    background = np.median(lab[light >= np.percentile(light, 90)], axis=0)
    fg = (np.sqrt(((lab - background) ** 2).sum(-1)) > _RBC_MIN_DIFF).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    fg = _fill_holes(fg)
    rgb = small.astype(np.float32)
    stained = ((rgb[..., 2] - rgb[..., 1]) > _NUCLEUS_MIN_SCORE + 5).astype(np.uint8)
    grow = max(3, int(round(_RBC_WORK * 0.1)) | 1)
    out = cv2.dilate(stained, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow, grow))) > 0
    if cell is not None:
        x0, y0, x1, y1 = (int(round(v * k)) for v in cell.cell)
        out[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    dist = cv2.distanceTransform(fg, cv2.DIST_L2, 5)
    peaks = (dist == cv2.dilate(dist, np.ones((9, 9), np.uint8))) & (dist >= 4) & ~out
    values = dist[peaks]
    if len(values) < _RBC_MIN_PEAKS:
        return None
    diameter = 2.0 * float(np.percentile(values, 75)) / k
    if cell is not None and not _RBC_WBC_RATIO[0] <= cell.size / diameter <= _RBC_WBC_RATIO[1]:
        return None
    return diameter


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (0/1 ``uint8``) with every region of 0s that does not reach the border set to 1
    (a red cell's pale centre); 4-connected background, as ``scipy.ndimage.binary_fill_holes``."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    flood = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(padded, flood, (0, 0), 2, flags=4)
    return (padded[1:-1, 1:-1] != 2).astype(np.uint8)


def rbc_crop_window(cell: CellBox, diameter: float | None, span: float) -> tuple[int, int, int]:
    """``(left, top, side)``: a square of ``span`` red-cell diameters centred on ``cell``.

    Without a ``diameter`` the square is :func:`cell_crop_window`'s at :data:`DEFAULT_CELL_SHARE`.
    """
    if diameter is None:
        return cell_crop_window(cell, DEFAULT_CELL_SHARE)
    cx, cy = cell.center
    side = max(8, int(round(span * diameter)))
    return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side


def crop_window(image: np.ndarray, left: int, top: int, side: int, out: int) -> np.ndarray:
    """The ``side`` square at ``(left, top)`` of ``image``, resized to ``out`` x ``out``.

    Parts outside the image (a tight crop from another lab) are filled with
    the smear's :func:`~leuko.data.imageio.background_colour` of the whole image
    (:func:`~leuko.data.imageio.filled_window`).
    """
    window = filled_window(image, (left, top, left + side, top + side), fill_from=image)
    interp = cv2.INTER_AREA if side > out else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(window, (out, out), interpolation=interp))


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise LeukoError(f"expected a uint8 RGB image; got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise LeukoError(f"expected an H x W x 3 RGB image; got shape {tuple(arr.shape)}")
    return arr


__all__ = [
    "CellBox",
    "cell_crop_window",
    "crop_window",
    "find_cell",
    "rbc_crop_window",
    "red_cell_diameter",
]
