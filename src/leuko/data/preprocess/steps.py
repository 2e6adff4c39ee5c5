"""The preprocessing step grammar: which steps exist, how a spec is spelled, which versions key caches.

A model's metadata, the decoded-image cache and the frozen-feature cache all name
their preprocessing by step specs (``"cell-crop:0.7"``, ``"reinhard:pbc"``), so this
module is the contract between training, caching and inference:
:func:`parse_preprocess` turns every accepted spelling into one canonical form (what
cache keys hash), and :func:`step_versions` adds the algorithm version of the steps
whose output depends on more than their spec.

It holds names and numbers only, and imports neither numpy nor OpenCV: the grammar
does not depend on how a step is carried out (:mod:`~leuko.data.preprocess.cells`,
:mod:`~leuko.data.preprocess.stain`, :mod:`~leuko.data.preprocess.pipeline`). The
named stain references live here, not with the stain steps, because a spec names
them and parsing checks the name. None of these values may change under an existing
name: model metadata and cache keys record the name, not the numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

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
"""Bumped when :func:`~leuko.data.preprocess.cells.red_cell_diameter` changes (caches of ``rbc-crop`` pixels are rebuilt)."""

CELL_CROP_VERSION = 2
"""Bumped when :func:`~leuko.data.preprocess.cells.find_cell` or what it searches changes, so caches of cell-cropped pixels
are rebuilt (2: box samples are searched with :data:`~leuko.data.preprocess.pipeline.CELL_CONTEXT` of their field around them)."""

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
:data:`REINHARD_TARGETS`, but of the pixels :func:`~leuko.data.preprocess.stain.smear_stats` keeps). Never change a name's values."""

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


__all__ = [
    "CELL_CROP_VERSION",
    "DEFAULT_CELL_SHARE",
    "DEFAULT_RBC_SPAN",
    "PREPROCESS_STEPS",
    "RBC_CROP_VERSION",
    "REINHARD_TARGETS",
    "SMEAR_TARGETS",
    "parse_preprocess",
    "step_versions",
]
