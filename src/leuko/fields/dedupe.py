"""The same cell once: repeats of one white cell in overlapping fields of a sample.

A lab that photographs a smear field by field moves the stage by less than a
field now and then, so a cell near one field's border shows again in the next.
Counting it twice biases the differential toward whatever sits where fields
overlap. Each found cell keeps a small grey *patch* of its surroundings (the
cell and the red cells around it, at a fixed number of pixels per red-cell
diameter, so both copies are at one scale) and which of its pixels lie inside
its field. Two cells of different fields of one sample are the same cell when

1. *hash* (the perceptual-hash signature :func:`leuko.data.audit.signatures`
   computes for ``leuko data audit``: the low DCT coefficients of a grey
   thumbnail) of their patches is close (cosine of the centred signatures,
   audit's candidate stage), or either copy is cut by its field's edge (a cut
   copy's patch is part background fill, so its hash cannot be trusted); and
2. *pixels*: after the best shift (up to :data:`MAX_SHIFT` red-cell diameters,
   the stage move's remainder after centring each copy on its own box), the
   normalised correlation of the pixels both patches hold is at least
   :data:`MIN_CORRELATION` over at least :data:`MIN_OVERLAP` of a patch.

The pixel check is what decides: a stage move only translates the picture, so
a repeat lines up pixel for pixel, red cells around it included, while two
cells of one type in different places do not (their neighbours differ).
Repeats form groups (a cell in three fields is one group); each group keeps
the copy whose cell is whole, then the best-scoring one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Collection, Sequence

import cv2
import numpy as np

from leuko.data.audit import signatures

PATCH_PER_D = 12.0
"""Patch pixels per red-cell diameter."""

PATCH_SPAN = 5.0
"""Patch side in red-cell diameters: the cell (1-2.5 D) and a ring of its neighbours."""

MAX_SHIFT = 1.6
"""Largest offset (D) between two copies' patches that the pixel check searches: box centres of
one cell differ by up to about half a cell where one copy is cut by its field's edge."""

MIN_CORRELATION = 0.9
"""Lowest normalised correlation (grey pixels both patches hold) of a repeat; see
:func:`repeat_score` and docs/fields.md for the measurement."""

MIN_OVERLAP = 0.5
"""Share of the smaller of two copies' in-field pixels that both must hold for a shift to count."""

MIN_SHARED = 1.5
"""...and at least a square this many red-cell diameters across (about one white cell)."""

MIN_BOX_OVERLAP = 0.5
"""At the aligning shift, the two copies' boxes must share this much of the smaller one."""

COARSE = 3
"""The first look at a pair compares patches this many times smaller..."""

COARSE_MIN_CORRELATION = 0.7
"""...and only pairs correlating at least this much there get the full check (measured on BCCD
test fields, benchmarks/bench_fields.py: every repeat correlates above 0.96 at full size and 0.84 at
a third; 90% of distinct pairs stay below 0.7 at a third, so the full check runs on a tenth)."""

HASH_MAX_DISTANCE = 0.35
"""Largest centred-signature cosine distance of a candidate pair (audit's candidate stage)."""


@dataclass(frozen=True)
class CellPatch:
    """What the repeat check keeps of one found cell (a few KB, not its field)."""

    pixels: np.ndarray
    """``float32`` grey patch, :data:`PATCH_SPAN` by :data:`PATCH_SPAN` red-cell diameters."""
    valid: np.ndarray
    """``bool``, same shape: the pixel lies inside the field."""
    edge: bool
    """The cell is cut by its field's edge."""
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """The cell's box in patch pixels."""

    @property
    def fft_size(self) -> int:
        """Side of the zero-padded FFTs (at least twice the patch: correlation without wrap-around)."""
        return 1 << int(math.ceil(math.log2(2 * self.pixels.shape[0])))

    @cached_property
    def spectra(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FFTs of the masked pixels, the mask and the squared masked pixels (computed once)."""
        f = np.where(self.valid, self.pixels, 0.0).astype(np.float64)
        s = (self.fft_size, self.fft_size)
        return np.fft.rfft2(f, s=s), np.fft.rfft2(self.valid.astype(np.float64), s=s), np.fft.rfft2(f * f, s=s)

    @property
    def per_d(self) -> float:
        """Patch pixels per red-cell diameter."""
        return self.pixels.shape[0] / PATCH_SPAN

    def coarse(self, factor: int = COARSE) -> CellPatch:
        """The same patch ``factor`` times smaller (the cheap first look of :func:`find_repeats`)."""
        side = self.pixels.shape[0] // factor
        valid = cv2.resize(self.valid.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA) > 0.999
        pix = cv2.resize(np.where(self.valid, self.pixels, 0.0).astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
        return CellPatch(np.where(valid, pix, 0.0), valid, self.edge, tuple(v / factor for v in self.box))  # type: ignore[arg-type]


def cell_patch(field: np.ndarray, box: Sequence[float], rbc_diameter: float, edge: bool) -> CellPatch:
    """The grey patch around ``box`` (field pixels) at :data:`PATCH_PER_D` pixels per red-cell diameter."""
    h, w = field.shape[:2]
    side = max(8, int(round(PATCH_SPAN * PATCH_PER_D)))
    scale = PATCH_PER_D / float(rbc_diameter)  # patch px per field px
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    # affine map from field to patch: centre of the box to the centre of the patch
    m = np.array([[scale, 0.0, side / 2.0 - scale * cx], [0.0, scale, side / 2.0 - scale * cy]], np.float32)
    grey = cv2.cvtColor(np.ascontiguousarray(field), cv2.COLOR_RGB2GRAY)
    if scale < 1.0:  # anti-alias before sampling down
        grey = cv2.GaussianBlur(grey, (0, 0), 0.5 / scale)
    pix = cv2.warpAffine(grey.astype(np.float32), m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
    # a patch pixel counts only when every field pixel it interpolates from is inside the field
    inside = cv2.warpAffine(np.ones((h, w), np.float32), m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0) > 0.999
    inside = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # and the blur's border too
    pix[~inside] = 0.0
    pbox = (scale * (box[0] - cx) + side / 2.0, scale * (box[1] - cy) + side / 2.0,
            scale * (box[2] - cx) + side / 2.0, scale * (box[3] - cy) + side / 2.0)
    return CellPatch(pix, inside, bool(edge), pbox)


def repeat_score(a: CellPatch, b: CellPatch, max_shift: float = MAX_SHIFT) -> float:
    """Best normalised correlation of the pixels ``a`` and ``b`` both hold, over shifts of up to
    ``max_shift`` red-cell diameters (0.0 where they never share enough pixels: :data:`MIN_OVERLAP`, :data:`MIN_SHARED`).

    Masked normalised cross-correlation (Padfield, IEEE TIP 2012) for every shift at once, by FFT:
    each shift's correlation uses only the pixels inside both fields, so a copy cut by its field's
    edge is compared on what it shows."""
    size = a.fft_size
    m1, m2 = a.valid, b.valid
    F1, M1, Q1 = a.spectra
    F2, M2, Q2 = b.spectra
    corr = lambda x, y: np.fft.irfft2(x * np.conj(y), s=(size, size))
    n = corr(M1, M2)
    s12 = corr(F1, F2)
    s1 = corr(F1, M2)
    s2 = corr(M1, F2)
    q1 = corr(Q1, M2)
    q2 = corr(M1, Q2)
    with np.errstate(invalid="ignore", divide="ignore"):
        num = s12 - s1 * s2 / n
        den = np.sqrt(np.maximum(q1 - s1 * s1 / n, 0.0) * np.maximum(q2 - s2 * s2 / n, 0.0))
        need = max(MIN_OVERLAP * min(float(m1.sum()), float(m2.sum())), (MIN_SHARED * a.per_d) ** 2)
        ncc = np.where((n >= need) & (den > 1e-3 * np.maximum(n, 1.0)), num / den, 0.0)
    r = int(round(max_shift * a.per_d))
    shifts = np.r_[0 : r + 1, size - r : size]
    window = ncc[np.ix_(shifts, shifts)]
    # A shift u puts b's pixel p on a's pixel p + u: the shift must also lay b's cell on a's
    # (two neighbouring cells of one field pair up at the shift between them, their
    # surroundings being the same picture; that is not a repeat).
    u = np.where(shifts <= r, shifts, shifts - size).astype(np.float64)
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    ix = np.clip(np.minimum(ax1, bx1 + u) - np.maximum(ax0, bx0 + u), 0.0, None)  # by x-shift
    iy = np.clip(np.minimum(ay1, by1 + u) - np.maximum(ay0, by0 + u), 0.0, None)  # by y-shift
    smaller = max(1e-6, min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0)))
    laid = (iy[:, None] * ix[None, :]) / smaller >= MIN_BOX_OVERLAP  # rows: y-shift, columns: x-shift
    window = np.where(laid, window, 0.0)
    return float(np.clip(window.max(), 0.0, 1.0)) if window.size else 0.0


def _hash_signatures(patches: Sequence[CellPatch]) -> np.ndarray:
    """Centred, unit-length identity signatures (n, 63) of the patches (audit's first stage)."""
    thumbs = np.stack([
        cv2.resize(np.where(p.valid, p.pixels, p.pixels[p.valid].mean() if p.valid.any() else 0.0), (64, 64), interpolation=cv2.INTER_AREA)
        for p in patches
    ]).astype(np.float32)
    sig = signatures(thumbs)[0]
    sig = sig / (np.linalg.norm(sig, axis=1, keepdims=True) + 1e-8)
    sig = sig - sig.mean(axis=0) * (len(sig) / (len(sig) + 100.0))
    return sig / (np.linalg.norm(sig, axis=1, keepdims=True) + 1e-8)


@dataclass(frozen=True)
class Repeat:
    """Two found cells that are one cell: indices into the cell list, and the pixel correlation."""

    a: int
    b: int
    correlation: float


def find_repeats(
    patches: Sequence[CellPatch],
    fields: Sequence[str],
    *,
    min_correlation: float = MIN_CORRELATION,
    pairs_with: Collection[int] | None = None,
) -> list[Repeat]:
    """Pairs of cells, in different fields (``fields[i]`` names cell ``i``'s), that are one cell.

    ``pairs_with``: only pairs with at least one of these cells are checked (the cells that just
    arrived, against each other and everything before; the pairs among the rest are known)."""
    n = len(patches)
    if n < 2 or len(set(fields)) < 2:
        return []
    wanted = None if pairs_with is None else set(pairs_with)
    if wanted is not None and not wanted:
        return []
    sig = _hash_signatures(patches)
    close = (sig @ sig.T) >= 1.0 - HASH_MAX_DISTANCE
    coarse = [p.coarse() for p in patches]
    out: list[Repeat] = []
    for i in range(n):
        for j in range(i + 1, n):
            if fields[i] == fields[j]:
                continue
            if wanted is not None and i not in wanted and j not in wanted:
                continue
            if not (close[i, j] or patches[i].edge or patches[j].edge):
                continue
            if repeat_score(coarse[i], coarse[j]) < COARSE_MIN_CORRELATION:
                continue
            c = repeat_score(patches[i], patches[j])
            if c >= min_correlation:
                out.append(Repeat(i, j, c))
    return out


def repeat_groups(n: int, repeats: Sequence[Repeat]) -> list[list[int]]:
    """Connected groups of cell indices (each cell once, singletons included), in index order."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in repeats:
        ra, rb = root(r.a), root(r.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [groups[k] for k in sorted(groups)]


__all__ = [
    "HASH_MAX_DISTANCE",
    "MAX_SHIFT",
    "MIN_CORRELATION",
    "MIN_OVERLAP",
    "CellPatch",
    "Repeat",
    "cell_patch",
    "find_repeats",
    "repeat_groups",
    "repeat_score",
]
