"""Running the steps: :class:`Preprocess`, :class:`Normalize`, and decoding a sample into pixels.

(Not :mod:`leuko.data.pipeline`, the input pipeline, which caches what this produces.)

* :class:`Preprocess` is *deterministic* (resize to the input size, optional
  centre crop or cell-centred crop, CLAHE, Reinhard stain normalisation), so
  the input pipeline caches its output under its :attr:`~Preprocess.fingerprint`.
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

from leuko.data.imageio import RESIZE_MODES, ResizeMode, _resize, load_rgb
from leuko.data.preprocess.cells import (
    CellBox,
    _as_rgb_uint8,
    cell_crop_window,
    crop_window,
    find_cell,
    rbc_crop_window,
    red_cell_diameter,
)
from leuko.data.preprocess.stain import clahe, reinhard, smear_norm
from leuko.data.preprocess.steps import (
    CELL_CROP_VERSION,
    RBC_CROP_VERSION,
    parse_preprocess,
)
from leuko.data.samples import Sample
from leuko.errors import LeukoError

CELL_CONTEXT = 2.0
"""With ``cell-crop``, a sample that is a box in a larger image (BCCD's annotated smear fields)
is decoded with its box grown this many times about its centre, so that the crop window is cut
from the real field around the cell. Without it the window of a tight box reaches past the box
and is filled with flat background, a frame no whole-image sample has (measured on BCCD with the
PBC-trained pbc-robust model: box margin 0.15 -> 64.0% accuracy, 0.4 -> 69.1%; docs/robustness.md).
The cell search weights components by closeness to the centre, so neighbours in the wider field
are not taken for the cell."""

_CELL_DECODE_FACTOR = 2
"""``cell-crop`` decodes at this many times the input size, so that after cropping a
cell that fills a third of a PBC frame the crop is still downscaled, never blown up."""


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


# --------------------------------------------------------------------------- #
# Deterministic preprocessing
# --------------------------------------------------------------------------- #


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


def build_preprocess(
    image_size: int, steps: Sequence[str] | str | None = (), *, resize: ResizeMode = "stretch"
) -> Preprocess:
    """Validated :class:`Preprocess` (a named constructor, to mirror :func:`build_transforms`)."""
    return Preprocess(image_size, parse_preprocess(steps), resize)


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
    "Normalize",
    "Preprocess",
    "Preprocessed",
    "available_cpus",
    "build_preprocess",
    "decode_raw",
    "decode_sample",
    "grow_box",
]
