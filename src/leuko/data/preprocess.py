"""Torch-free image preparation: deterministic preprocessing, normalisation, decoding.

Everything a trained model needs between an image file (or a decoded array)
and its input tensor, in numpy, OpenCV and PIL only. It lives apart from
:mod:`leuko.data.transforms` because that module needs albumentations, which
imports torch: the ONNX predictor (:mod:`leuko.infer.onnx`) must prepare
images exactly like the PyTorch path without paying for (or shipping) torch.

* :class:`Preprocess` is *deterministic* (resize to the input size, optional
  centre crop or cell-centred crop, CLAHE, Reinhard stain normalisation), so
  the input pipeline caches its output.
* :class:`Normalize` turns a ``uint8 H x W x 3`` image into the normalised
  ``float32 3 x H x W`` array the network reads; :class:`~leuko.data.transforms.Transform`
  wraps its result in a tensor, the ONNX path feeds it to onnxruntime.
* :func:`decode_sample` is the single place that turns a :class:`Sample`
  into preprocessed pixels.

``mean``/``std`` are arguments and never defaults: they belong to the model.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from leuko.data.imageio import RESIZE_MODES, ResizeMode, _resize, filled_window, load_rgb
from leuko.data.samples import Sample
from leuko.errors import LeukoError

DEFAULT_CELL_SHARE = 0.7
"""Share of the crop side the white cell spans after ``cell-crop`` (chosen by measurement,
docs/robustness.md). PBC frames hold their cell at 0.3-0.6 of the side, BCCD's box crops at
0.7-0.8. A PBC-trained probe transferred to BCCD far better the less of the surroundings it saw
(share 0.45: 12%, 0.55: 26%, 0.7: 50%, 0.85: 51% accuracy): red cells and background differ more
between labs than white cells do. 0.7 keeps a thin rim of context at no cost on PBC."""

DEFAULT_RBC_SPAN = 3.6
"""Side of the ``rbc-crop`` window, in red-cell diameters. PBC's frames are 360 px wide with red
cells about 70 px across, so ``center-crop:0.7`` (the framing of ``pbc-best``) shows 3.6 red cells
across; the same physical field (about 27 um) in any lab keeps every white cell's size relative to
its red cells, which ``cell-crop`` (the cell always 70% of the side) throws away."""

RBC_CROP_VERSION = 1
"""Bumped when :func:`red_cell_diameter` changes (caches of ``rbc-crop`` pixels are rebuilt)."""

CELL_CROP_VERSION = 2
"""Bumped when :func:`find_cell` or what it searches changes, so caches of cell-cropped pixels
are rebuilt (2: box samples are searched with :data:`CELL_CONTEXT` of their field around them)."""

CELL_CONTEXT = 2.0
"""With ``cell-crop``, a sample that is a box in a larger image (BCCD's annotated smear fields)
is decoded with its box grown this many times about its centre, so that the crop window is cut
from the real field around the cell. Without it the window of a tight box reaches past the box
and is filled with flat background, a frame no whole-image sample has (measured on BCCD with the
PBC-trained pbc-robust model: box margin 0.15 -> 64.0% accuracy, 0.4 -> 69.1%; docs/robustness.md).
The cell search weights components by closeness to the centre, so neighbours in the wider field
are not taken for the cell."""

REINHARD_TARGETS: dict[str, tuple[float, float, float, float, float, float]] = {
    # mean over 300 PBC images (CellaVision, May-Grünwald-Giemsa) after cell-crop:0.55
    "pbc": (198.1, 140.1, 133.0, 45.6, 10.6, 16.8),
}
"""Reference CIELAB statistics for ``reinhard`` (OpenCV 8-bit LAB: mean L, a, b, then std L, a, b).

A name, not numbers, goes into a model's metadata, so these values must never change
under an existing name: add a new name instead."""

SMEAR_TARGETS: dict[str, tuple[float, float, float, float, float, float]] = {
    # mean over 300 PBC images (CellaVision, May-Grünwald-Giemsa) after cell-crop:0.7 at 128 px
    "pbc": (217.3, 135.7, 140.2, 19.8, 3.7, 4.4),
}
"""Reference CIELAB statistics of the smear around the cell for ``smear-norm`` (as
:data:`REINHARD_TARGETS`, but of the pixels :func:`smear_stats` keeps). Never change a name's values."""

_SMEAR_MAX_SCALE = 3.0
"""``smear-norm`` never stretches a channel's spread more than this (a rim that is mostly
flat fill, at the edge of a field, has almost no spread to match)."""

PREPROCESS_STEPS: dict[str, str] = {
    "clahe": "contrast-limited adaptive histogram equalisation of lightness; "
    "'clahe' or 'clahe:<clip limit>' (default 2.0)",
    "center-crop": "keep the central fraction of the image, decoded larger so the "
    "output keeps its size; 'center-crop:<fraction in (0, 1]>', e.g. center-crop:0.875",
    "cell-crop": "find the white cell (stained nucleus grown to its cytoplasm) and crop a square "
    "around it so the cell spans a fixed share of the side, whatever the source's framing; "
    f"'cell-crop' or 'cell-crop:<share in [0.2, 0.95]>' (default {DEFAULT_CELL_SHARE:g}); no cell found: "
    "the whole frame is kept and the image is reported",
    "rbc-crop": "find the white cell as cell-crop does, but size the square by the red cells around it: "
    "the side is a fixed number of red-cell diameters (a ruler every blood smear carries), so a lymphocyte "
    "stays smaller than a monocyte whatever the source's magnification; "
    f"'rbc-crop' or 'rbc-crop:<red-cell diameters in [2, 8]>' (default {DEFAULT_RBC_SPAN:g}); no red cells "
    f"measurable: the cell spans {DEFAULT_CELL_SHARE:g} of the side, as with cell-crop, and the image is reported",
    "reinhard": "stain normalisation (Reinhard et al. 2001): shift and scale each image's CIELAB "
    f"mean and spread to a reference's; 'reinhard' or 'reinhard:<reference>' ({', '.join(REINHARD_TARGETS)})",
    "smear-norm": "stain normalisation referenced to the smear, not the cell: Reinhard's CIELAB shift and scale, "
    "with the statistics taken from the red cells and background around the white cell (outside the cell-crop "
    "window's cell and any stained pixel), so a lymphocyte's large nucleus or an eosinophil's granules do not "
    f"change how its image is normalised; 'smear-norm' or 'smear-norm:<reference>' ({', '.join(SMEAR_TARGETS)})",
}
"""Deterministic preprocessing steps by name (``name`` or ``name:<value>``)."""

_DEFAULT_CLAHE_CLIP = 2.0
_CLAHE_TILES = (8, 8)


# --------------------------------------------------------------------------- #
# Argument validation (once, at the boundary, naming the argument)
# --------------------------------------------------------------------------- #


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise LeukoError(f"image_size must be an integer >= 8; got {image_size!r}")
    return int(image_size)


def _check_resize(resize: str) -> ResizeMode:
    if resize not in RESIZE_MODES:
        raise LeukoError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    return resize  # type: ignore[return-value]



def _check_stats(name: str, values: Sequence[float], *, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LeukoError(f"{name} must be three numbers (R, G, B); got {values!r}") from None
    if len(out) != 3:
        raise LeukoError(f"{name} must be three numbers (R, G, B); got {len(out)}")
    if any(not math.isfinite(v) for v in out) or any(v > 1.0 for v in out):
        raise LeukoError(
            f"{name} must be on the 0-1 pixel scale (e.g. ImageNet 0.485, 0.456, 0.406); got {out}"
        )
    if positive and any(v <= 0 for v in out):
        raise LeukoError(f"{name} must be > 0; got {out}")
    return out  # type: ignore[return-value]



def parse_preprocess(steps: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate preprocessing step specs and return them in canonical form.

    Accepts a sequence (``["clahe", "center-crop:0.8"]``) or one comma-separated
    string (``"clahe,center-crop:0.8"``, what a CLI flag gives). The canonical
    form (``"clahe:2"``, ``"center-crop:0.8"``) is what cache keys hash, so two
    spellings of the same preprocessing share one cache.

    The geometric step (``center-crop``, ``cell-crop`` or ``rbc-crop``, at most one) always
    runs first (it decides the decoding size and what the pixel steps see:
    ``reinhard`` after ``cell-crop`` matches the statistics of a cell and its
    surroundings, not of however much background the source framed); the
    pixel steps then run in the order given.

    Raises:
        LeukoError: unknown step, bad value, or more than one geometric step.
    """
    if steps is None:
        return ()
    if isinstance(steps, str):
        steps = [s for s in steps.split(",")]
    crops: list[str] = []
    pixel: list[str] = []
    for raw in steps:
        spec = str(raw).strip().lower()
        if not spec:
            continue
        name, _, value = spec.partition(":")
        name = name.strip().replace("_", "-")
        if name == "centre-crop":
            name = "center-crop"
        value = value.strip()
        if name == "clahe":
            clip = _parse_float(value, spec, default=_DEFAULT_CLAHE_CLIP)
            if not 0 < clip <= 40:
                raise LeukoError(f"preprocess step {spec!r}: CLAHE clip limit must be in (0, 40]")
            pixel.append(f"clahe:{clip:g}")
        elif name == "center-crop":
            if not value:
                raise LeukoError(f"preprocess step {spec!r} needs a fraction, e.g. center-crop:0.875")
            frac = _parse_float(value, spec, default=1.0)
            if not 0.1 <= frac <= 1.0:
                raise LeukoError(f"preprocess step {spec!r}: fraction must be in [0.1, 1]")
            crops.append(f"center-crop:{frac:g}")
        elif name in ("cell-crop", "cellcrop"):
            share = _parse_float(value, spec, default=DEFAULT_CELL_SHARE)
            if not 0.2 <= share <= 0.95:
                raise LeukoError(f"preprocess step {spec!r}: cell share must be in [0.2, 0.95] (e.g. cell-crop:0.7)")
            crops.append(f"cell-crop:{share:g}")
        elif name in ("rbc-crop", "rbccrop"):
            span = _parse_float(value, spec, default=DEFAULT_RBC_SPAN)
            if not 2.0 <= span <= 8.0:
                raise LeukoError(f"preprocess step {spec!r}: span must be in [2, 8] red-cell diameters (e.g. rbc-crop:3.6)")
            crops.append(f"rbc-crop:{span:g}")
        elif name in ("reinhard", "smear-norm"):
            ref = value or "pbc"
            known = REINHARD_TARGETS if name == "reinhard" else SMEAR_TARGETS
            if ref not in known:
                raise LeukoError(f"preprocess step {spec!r}: unknown {name} reference {ref!r}; known: {', '.join(known)}")
            pixel.append(f"{name}:{ref}")
        else:
            raise LeukoError(
                f"unknown preprocess step {raw!r}; allowed: {', '.join(PREPROCESS_STEPS)} "
                "(e.g. clahe, clahe:3, center-crop:0.875, cell-crop:0.7, rbc-crop:3.6, reinhard, smear-norm)"
            )
    if len(crops) > 1:
        raise LeukoError(f"at most one geometric step (center-crop, cell-crop or rbc-crop) is allowed; got {', '.join(crops)}")
    return tuple(crops + pixel)


def _parse_float(value: str, spec: str, *, default: float) -> float:
    if not value:
        return default
    try:
        out = float(value)
    except ValueError:
        raise LeukoError(f"preprocess step {spec!r}: {value!r} is not a number") from None
    if not math.isfinite(out):
        raise LeukoError(f"preprocess step {spec!r}: {value!r} is not a finite number")
    return out



# --------------------------------------------------------------------------- #
# Deterministic preprocessing
# --------------------------------------------------------------------------- #


def clahe(image: np.ndarray, clip_limit: float = _DEFAULT_CLAHE_CLIP) -> np.ndarray:
    """CLAHE on the L channel of CIELAB, so contrast changes and hue does not.

    Stain hue is a class cue (eosinophil granules, basophil granules);
    equalising R, G and B separately would shift it.
    """
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB)
    # A CLAHE object cannot be pickled into DataLoader workers; it is cheap to make.
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=_CLAHE_TILES)
    lab[..., 0] = op.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


# --------------------------------------------------------------------------- #
# Finding the white cell (for cell-crop)
# --------------------------------------------------------------------------- #

_CELL_WORK = 128
"""Side of the working copy the cell is searched in: enough to outline a nucleus in any
framing, and it makes the search cost the same (a few ms) for every source size."""

_CELL_DECODE_FACTOR = 2
"""``cell-crop`` decodes at this many times the input size, so that after cropping a
cell that fills a third of a PBC frame the crop is still downscaled, never blown up."""

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


# --------------------------------------------------------------------------- #
# Stain normalisation
# --------------------------------------------------------------------------- #


def lab_stats(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float, float, float, float, float]:
    """Mean and standard deviation of L, a, b (OpenCV 8-bit CIELAB) over all pixels, or those where ``mask`` is true."""
    lab = cv2.cvtColor(np.ascontiguousarray(_as_rgb_uint8(image)), cv2.COLOR_RGB2LAB).astype(np.float64)
    px = lab.reshape(-1, 3) if mask is None else lab[mask]
    m, s = px.mean(axis=0), px.std(axis=0)
    return (float(m[0]), float(m[1]), float(m[2]), float(s[0]), float(s[1]), float(s[2]))


def reinhard(image: np.ndarray, target: Sequence[float] | str = "pbc") -> np.ndarray:
    """Reinhard colour transfer: give ``image`` the CIELAB mean and spread of ``target``.

    Labs differ mostly in how much stain a slide took up and in the camera's
    white balance; per channel in CIELAB (decorrelated enough for a linear
    map) that is a shift and a scale, which this undoes against a fixed
    reference (Reinhard et al. 2001, the usual baseline of stain
    normalisation). ``target`` is a name from :data:`REINHARD_TARGETS` or six
    numbers (:func:`lab_stats` of a reference image).
    """
    ref = REINHARD_TARGETS[target] if isinstance(target, str) else tuple(float(v) for v in target)
    lab = cv2.cvtColor(np.ascontiguousarray(_as_rgb_uint8(image)), cv2.COLOR_RGB2LAB).astype(np.float32)
    flat = lab.reshape(-1, 3)
    return _lab_transfer(lab, flat.mean(axis=0), flat.std(axis=0), ref)


def _lab_transfer(lab: np.ndarray, mean: np.ndarray, std: np.ndarray, ref: Sequence[float], max_scale: float = np.inf) -> np.ndarray:
    """Map CIELAB ``lab`` (float) so that statistics ``mean``/``std`` become ``ref``'s; RGB ``uint8`` out."""
    # a flat channel (a blank frame) must not be blown up into noise
    scale = np.minimum(np.asarray(ref[3:], np.float32) / np.maximum(std, 1.0), max_scale)
    lab = (lab - mean) * scale + np.asarray(ref[:3], np.float32)
    return cv2.cvtColor(np.clip(np.rint(lab), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def smear_mask(image: np.ndarray, cell_share: float | None = None) -> np.ndarray:
    """Boolean mask of the *smear* pixels of ``image``: not the white cell, not any stained nucleus.

    After ``cell-crop`` the cell fills the central ``cell_share`` square, which is left out;
    anywhere, pixels whose blue-minus-green is a nucleus's (:data:`_NUCLEUS_MIN_SCORE`) are left
    out too (a neighbour's nucleus, a platelet; measured above the image's median, so a lab
    whose whole smear is bluish keeps its background). What remains is red cells and background, whose
    colour depends on the lab (stain, camera) and not on which white cell is in the middle.
    When less than a tenth of the image remains, the whole image is used.
    """
    image = _as_rgb_uint8(image)
    h, w = image.shape[:2]
    f = image.astype(np.int16)
    score = f[..., 2] - f[..., 1]
    mask = score - np.median(score) < _NUCLEUS_MIN_SCORE  # relative: a bluish lab's background stays in
    if cell_share is not None:
        m0, m1 = int(round(h * (1 - cell_share) / 2)), int(round(w * (1 - cell_share) / 2))
        mask[m0 : h - m0, m1 : w - m1] = False
    if mask.sum() < 0.1 * h * w:
        return np.ones((h, w), bool)
    return mask


def smear_stats(image: np.ndarray, cell_share: float | None = None) -> tuple[float, float, float, float, float, float]:
    """:func:`lab_stats` of the :func:`smear_mask` pixels (what ``smear-norm`` matches)."""
    return lab_stats(image, smear_mask(image, cell_share))


def smear_norm(image: np.ndarray, target: Sequence[float] | str = "pbc", cell_share: float | None = None) -> np.ndarray:
    """Reinhard colour transfer with statistics from the smear around the cell (:func:`smear_mask`).

    Per-image :func:`reinhard` matches the statistics of the whole crop, so its
    map depends on the cell: a lymphocyte (mostly dark nucleus) and a
    neutrophil from the same slide are shifted differently, and an
    eosinophil's red granules pull its colours toward the average. The red
    cells and background around a white cell are the same whatever the cell
    is, and differ between labs in exactly the stain uptake and white balance
    to be undone; this estimates the map from them and applies it to the
    whole image. Lightness is shifted and scaled (contrast, capped at
    :data:`_SMEAR_MAX_SCALE`); the colour channels a and b are only shifted
    (white balance and overall stain tint): their spread over red cells and
    background is a few units, and scaling by it would exaggerate the
    nucleus's colour, which lies far outside that range (BCCD's lavender
    nuclei turned bright blue).
    """
    image = _as_rgb_uint8(image)
    ref = SMEAR_TARGETS[target] if isinstance(target, str) else tuple(float(v) for v in target)
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB).astype(np.float32)
    px = lab[smear_mask(image, cell_share)]
    std = px.std(axis=0)
    std[1:] = ref[4:]  # a, b: shift only (see above)
    return _lab_transfer(lab, px.mean(axis=0), std, ref, _SMEAR_MAX_SCALE)


@dataclass(frozen=True)
class Preprocessed:
    """What :meth:`Preprocess.run` did to one image (for reports; training only needs the pixels).

    Attributes:
        image: the ``image_size`` square ``uint8`` output.
        cell: the white cell found by ``cell-crop``/``rbc-crop`` (in decoded pixels), ``None`` otherwise.
        fell_back: ``cell-crop``/``rbc-crop`` found no cell and kept the whole frame.
        window: ``(left, top, side)`` of the decoded frame the output was cut from (a cell-centred
            crop that found its cell), ``None`` otherwise.
        ruler: ``rbc-crop``'s red-cell diameter in decoded pixels; ``None`` when none was
            measurable (the crop then used ``cell-crop``'s share) or without ``rbc-crop`` (unless
            :meth:`Preprocess.run` was asked to measure it).
    """

    image: np.ndarray
    cell: CellBox | None = None
    fell_back: bool = False
    window: tuple[int, int, int] | None = None
    ruler: float | None = None


@dataclass(frozen=True)
class Preprocess:
    """The deterministic part: ``uint8`` array of any size -> ``image_size`` square ``uint8``.

    Picklable and hashable (:attr:`fingerprint`) so that the decoded-image cache
    can store its output and DataLoader workers can run it.

    With ``cell-crop`` the output is a square around the white cell (found by
    :func:`find_cell`) in which the cell spans a fixed share of the side. When
    no cell is found, the whole frame is used (what the model would see
    without the step) and :meth:`run` says so (``fell_back``), so reports can
    name those images (``leuko data crops``, ``leuko evaluate``).

    Attributes:
        image_size: output side in pixels.
        steps: canonical step specs (see :func:`parse_preprocess`).
        resize: how a non-square source becomes square (see
            :func:`leuko.data.imageio.load_rgb`).
    """

    image_size: int
    steps: tuple[str, ...] = ()
    resize: ResizeMode = "stretch"
    _crop_fraction: float = field(init=False, repr=False, compare=False)
    _cell_share: float | None = field(init=False, repr=False, compare=False)
    _rbc_span: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _check_image_size(self.image_size))
        object.__setattr__(self, "resize", _check_resize(self.resize))
        object.__setattr__(self, "steps", parse_preprocess(self.steps))
        frac, share, span = 1.0, None, None
        for s in self.steps:
            if s.startswith("center-crop:"):
                frac = float(s.split(":", 1)[1])
            elif s.startswith("cell-crop:"):
                share = float(s.split(":", 1)[1])
            elif s.startswith("rbc-crop:"):
                span = float(s.split(":", 1)[1])
        object.__setattr__(self, "_crop_fraction", frac)
        object.__setattr__(self, "_cell_share", share)
        object.__setattr__(self, "_rbc_span", span)

    @property
    def crop_fraction(self) -> float:
        """Central fraction kept by ``center-crop`` (1.0 without it)."""
        return self._crop_fraction

    @property
    def cell_share(self) -> float | None:
        """Share of the side the cell spans after ``cell-crop`` (``None`` without it)."""
        return self._cell_share

    @property
    def rbc_span(self) -> float | None:
        """Window side in red-cell diameters after ``rbc-crop`` (``None`` without it)."""
        return self._rbc_span

    @property
    def cell_centred(self) -> bool:
        """Whether the output is cut around a found white cell (``cell-crop`` or ``rbc-crop``)."""
        return self._cell_share is not None or self._rbc_span is not None

    @property
    def decode_size(self) -> int:
        """Side to decode at: the centre crop leaves exactly :attr:`image_size`; the cell crop
        gets :data:`_CELL_DECODE_FACTOR` times it, to cut its window from."""
        if self.cell_centred:
            return self.image_size * _CELL_DECODE_FACTOR
        if self._crop_fraction >= 1.0:
            return self.image_size
        return max(self.image_size, int(round(self.image_size / self._crop_fraction)))

    @property
    def fingerprint(self) -> str:
        """Short stable hash of everything that decides the output pixels."""
        text = f"v1|{self.image_size}|{self.decode_size}|{self.resize}|{';'.join(self.steps)}"
        if self.cell_centred:  # the search itself decides the pixels too
            text += f"|cell-v{CELL_CROP_VERSION}"
        if self._rbc_span is not None:
            text += f"|rbc-v{RBC_CROP_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def run(self, image: np.ndarray, *, measure_ruler: bool = False) -> Preprocessed:
        """Resize (if not already at :attr:`decode_size`), crop, pixel steps; and what the crop found.

        ``measure_ruler``: also measure the red cells (:attr:`Preprocessed.ruler`) when the crop is
        ``cell-crop`` (``rbc-crop`` always does): a routed run's gate reads the magnification from it.
        """
        image = _as_rgb_uint8(image)
        d, s = self.decode_size, self.image_size
        if image.shape[0] != d or image.shape[1] != d:
            pil = _resize(Image.fromarray(image), (d, d), self.resize, 0)
            image = np.asarray(pil, dtype=np.uint8)
        cell, fell_back, window, ruler, share = None, False, None, None, None
        if self.cell_centred:
            cell = find_cell(image)
            if cell is None:
                fell_back = True
                image = cv2.resize(image, (s, s), interpolation=cv2.INTER_AREA)
            else:
                if self._rbc_span is not None:
                    ruler = red_cell_diameter(image, cell)
                    window = rbc_crop_window(cell, ruler, self._rbc_span)
                    share = min(1.0, cell.size / window[2])
                else:
                    if measure_ruler:
                        ruler = red_cell_diameter(image, cell)
                    window = cell_crop_window(cell, self._cell_share)
                    share = self._cell_share
                image = crop_window(image, *window, s)
        elif d != s:
            top = (d - s) // 2
            image = image[top : top + s, top : top + s]
        for step in self.steps:
            name, _, value = step.partition(":")
            if name == "clahe":
                image = clahe(image, float(value))
            elif name == "reinhard":
                image = reinhard(image, value)
            elif name == "smear-norm":
                image = smear_norm(image, value, share)
        return Preprocessed(np.ascontiguousarray(image), cell, fell_back, window, ruler)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Apply resize, crop and pixel steps; only the pixels (see :meth:`run` for the rest)."""
        return self.run(image).image


def step_versions(steps: Sequence[str] | str | None) -> dict[str, int]:
    """Algorithm versions of the steps whose output depends on more than their spec (``cell-crop``).

    Caches keyed by step specs (e.g. frozen features) add this so that a
    change to the cell search invalidates them; empty for the other steps,
    so their keys stay as they were.
    """
    names = {s.partition(":")[0] for s in parse_preprocess(steps)}
    versions: dict[str, int] = {}
    if names & {"cell-crop", "rbc-crop"}:  # rbc-crop runs the cell search too
        versions["cell-crop"] = CELL_CROP_VERSION
    if "rbc-crop" in names:
        versions["rbc-crop"] = RBC_CROP_VERSION
    return versions


def build_preprocess(
    image_size: int, steps: Sequence[str] | str | None = (), *, resize: ResizeMode = "stretch"
) -> Preprocess:
    """Validated :class:`Preprocess` (a named constructor, to mirror :func:`build_transforms`)."""
    return Preprocess(image_size, parse_preprocess(steps), resize)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise LeukoError(f"expected a uint8 RGB image; got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise LeukoError(f"expected an H x W x 3 RGB image; got shape {tuple(arr.shape)}")
    return arr


# --------------------------------------------------------------------------- #
# Normalisation
# --------------------------------------------------------------------------- #


class Normalize:
    """``uint8 H x W x 3`` -> ``float32 3 x H x W``, ``(x / 255 - mean) / std`` per channel.

    One fused pass per channel straight into the CHW buffer: no float
    temporaries, and no torch intra-op threads (which cost more than they save
    on one small image, and fight the model for cores).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = _check_stats("mean", mean, positive=False)
        self.std = _check_stats("std", std, positive=True)
        # x = (u8 / 255 - mean) / std  ==  u8 * scale - offset
        std_arr = np.asarray(self.std, dtype=np.float64)
        self._scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        self._offset = (np.asarray(self.mean, dtype=np.float64) / std_arr).astype(np.float32)

    def __call__(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise ``image``; write into ``out`` (``float32 3 x H x W``) when given."""
        h, w = image.shape[:2]
        if out is None:
            out = np.empty((3, h, w), dtype=np.float32)
        for c in range(3):
            np.multiply(image[..., c], self._scale[c], out=out[c], dtype=np.float32)
            out[c] -= self._offset[c]
        return out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #


def decode_sample(
    sample: Sample, preprocess: Preprocess, *, draft: bool = True, load: Callable[..., np.ndarray] = load_rgb
) -> np.ndarray:
    """Decode one sample (honouring its crop box) and run the deterministic steps.

    The single place that turns a :class:`Sample` into pixels, so the cached,
    uncached and ONNX paths cannot drift apart. ``load`` is the decoder
    (:func:`~leuko.data.imageio.load_rgb`; the input pipeline passes its own
    reference so tests can count decodes).
    """
    return preprocess(decode_raw(sample, preprocess, draft=draft, load=load))


def decode_raw(
    sample: Sample, preprocess: Preprocess, *, draft: bool = True, load: Callable[..., np.ndarray] = load_rgb
) -> np.ndarray:
    """Decode one sample at ``preprocess.decode_size``, before any step (what :meth:`Preprocess.run` takes)."""
    crop = sample.crop
    if crop is not None and preprocess.cell_centred:
        crop = grow_box(crop, CELL_CONTEXT)
    return load(
        sample.path,
        preprocess.decode_size,
        crop=crop,
        resize=preprocess.resize,
        draft=draft,
    )


def grow_box(box: tuple[int, int, int, int], factor: float) -> tuple[int, int, int, int]:
    """``box`` (left, top, right, bottom) scaled by ``factor`` about its centre; it may reach
    past the image, which :func:`~leuko.data.imageio.load_rgb` fills with background."""
    left, top, right, bottom = box
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    hw, hh = (right - left) * factor / 2.0, (bottom - top) * factor / 2.0
    return (int(round(cx - hw)), int(round(cy - hh)), int(round(cx + hw)), int(round(cy + hh)))


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks and containers' cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS/Windows
        return max(1, os.cpu_count() or 1)


__all__ = [
    "CELL_CONTEXT",
    "CELL_CROP_VERSION",
    "DEFAULT_CELL_SHARE",
    "DEFAULT_RBC_SPAN",
    "RBC_CROP_VERSION",
    "PREPROCESS_STEPS",
    "REINHARD_TARGETS",
    "SMEAR_TARGETS",
    "CellBox",
    "Normalize",
    "Preprocess",
    "Preprocessed",
    "available_cpus",
    "build_preprocess",
    "cell_crop_window",
    "clahe",
    "crop_window",
    "decode_raw",
    "decode_sample",
    "find_cell",
    "grow_box",
    "lab_stats",
    "parse_preprocess",
    "rbc_crop_window",
    "red_cell_diameter",
    "reinhard",
    "smear_mask",
    "smear_norm",
    "smear_stats",
    "step_versions",
]
