"""Torch-free image preparation: deterministic preprocessing, normalisation, decoding.

Everything a trained model needs between an image file (or a decoded array)
and its input tensor, in numpy, OpenCV and PIL only. It lives apart from
:mod:`leuko.data.transforms` because that module needs albumentations, which
imports torch: the ONNX predictor (:mod:`leuko.infer.onnx`) must prepare
images exactly like the PyTorch path without paying for (or shipping) torch.

* :class:`Preprocess` is *deterministic* (resize to the input size, optional
  centre crop, CLAHE), so the input pipeline caches its output.
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
from leuko.data.samples import Sample
from leuko.errors import LeukoError

PREPROCESS_STEPS: dict[str, str] = {
    "clahe": "contrast-limited adaptive histogram equalisation of lightness; "
    "'clahe' or 'clahe:<clip limit>' (default 2.0)",
    "center-crop": "keep the central fraction of the image, decoded larger so the "
    "output keeps its size; 'center-crop:<fraction in (0, 1]>', e.g. center-crop:0.875",
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

    The centre crop, a geometric step, always runs first (it decides the
    decoding size); the pixel steps then run in the order given.

    Raises:
        LeukoError: unknown step, bad value, or more than one centre crop.
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
        else:
            raise LeukoError(
                f"unknown preprocess step {raw!r}; allowed: {', '.join(PREPROCESS_STEPS)} "
                "(e.g. clahe, clahe:3, center-crop:0.875)"
            )
    if len(crops) > 1:
        raise LeukoError(f"at most one center-crop step is allowed; got {', '.join(crops)}")
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


@dataclass(frozen=True)
class Preprocess:
    """The deterministic part: ``uint8`` array of any size -> ``image_size`` square ``uint8``.

    Picklable and hashable (:attr:`fingerprint`) so that the decoded-image cache
    can store its output and DataLoader workers can run it.

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _check_image_size(self.image_size))
        object.__setattr__(self, "resize", _check_resize(self.resize))
        object.__setattr__(self, "steps", parse_preprocess(self.steps))
        frac = 1.0
        for s in self.steps:
            if s.startswith("center-crop:"):
                frac = float(s.split(":", 1)[1])
        object.__setattr__(self, "_crop_fraction", frac)

    @property
    def crop_fraction(self) -> float:
        """Central fraction kept by ``center-crop`` (1.0 without it)."""
        return self._crop_fraction

    @property
    def decode_size(self) -> int:
        """Side to decode at, so the centre crop leaves exactly :attr:`image_size`."""
        if self._crop_fraction >= 1.0:
            return self.image_size
        return max(self.image_size, int(round(self.image_size / self._crop_fraction)))

    @property
    def fingerprint(self) -> str:
        """Short stable hash of everything that decides the output pixels."""
        text = f"v1|{self.image_size}|{self.decode_size}|{self.resize}|{';'.join(self.steps)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Apply resize (if not already at :attr:`decode_size`), centre crop, pixel steps."""
        image = _as_rgb_uint8(image)
        d, s = self.decode_size, self.image_size
        if image.shape[0] != d or image.shape[1] != d:
            pil = _resize(Image.fromarray(image), (d, d), self.resize, 0)
            image = np.asarray(pil, dtype=np.uint8)
        if d != s:
            top = (d - s) // 2
            image = image[top : top + s, top : top + s]
        for step in self.steps:
            name, _, value = step.partition(":")
            if name == "clahe":
                image = clahe(image, float(value))
        return np.ascontiguousarray(image)


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
    image = load(
        sample.path,
        preprocess.decode_size,
        crop=sample.crop,
        resize=preprocess.resize,
        draft=draft,
    )
    return preprocess(image)


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks and containers' cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS/Windows
        return max(1, os.cpu_count() or 1)


__all__ = [
    "PREPROCESS_STEPS",
    "Normalize",
    "Preprocess",
    "available_cpus",
    "build_preprocess",
    "clahe",
    "decode_sample",
    "parse_preprocess",
]
