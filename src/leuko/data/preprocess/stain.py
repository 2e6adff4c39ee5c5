"""The colour steps: CLAHE and stain normalisation (``clahe``, ``reinhard``, ``smear-norm``).

Labs differ most in colour: how much stain a slide took up, and the camera's white
balance (docs/robustness.md). These pixel steps run after the geometric step, on the
crop it cut. :func:`clahe` equalises lightness only, so that stain hue (a class cue)
is kept; :func:`reinhard` matches the crop's CIELAB mean and spread to a named
reference; :func:`smear_norm` takes the statistics from the red cells and background
around the white cell only (:func:`smear_mask`), so that the map depends on the lab
and not on which cell is in the middle. :func:`lab_stats` and :func:`smear_stats`
are also how routing (:mod:`leuko.infer.route`) and the benchmarks describe a lab's
stain. The named references are in :mod:`~leuko.data.preprocess.steps` (a step spec
names them).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from leuko.data.preprocess.cells import _NUCLEUS_MIN_SCORE, _as_rgb_uint8
from leuko.data.preprocess.steps import (
    _DEFAULT_CLAHE_CLIP,
    REINHARD_TARGETS,
    SMEAR_TARGETS,
)

_CLAHE_TILES = (8, 8)

_SMEAR_MAX_SCALE = 3.0
"""``smear-norm`` never stretches a channel's spread more than this (a rim that is mostly
flat fill, at the edge of a field, has almost no spread to match)."""


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


__all__ = [
    "clahe",
    "lab_stats",
    "reinhard",
    "smear_mask",
    "smear_norm",
    "smear_stats",
]
