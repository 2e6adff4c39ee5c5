"""Image preprocessing and augmentation: uint8 arrays in, normalised tensors out.

The work is split in two on purpose:

* :class:`Preprocess` is *deterministic* (resize to the input size, optional
  centre crop, CLAHE). Because the same file always gives the same result, the
  input pipeline (:mod:`leuko.data.pipeline`) runs it once and caches the
  uint8 output on disk.
* :class:`Transform` adds what changes from epoch to epoch: a named
  augmentation preset (albumentations, on uint8 at the final size, where it is
  cheapest), then conversion to a ``3 x H x W`` float tensor normalised with
  the backbone's ``mean``/``std``.

``mean``/``std`` are arguments and never defaults: they belong to the model
(timm's habit of resolving data config from the model), and this layer must
not import :mod:`leuko.models`.

Typical use::

    t = build_transforms(224, train=True, augment="cells", preprocess=["clahe"],
                         mean=model_cfg.mean, std=model_cfg.std)
    x = t(rgb_uint8)            # torch.float32, 3 x 224 x 224
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# albumentations asks PyPI for a newer version on import unless told not to;
# a library must not reach the network behind its user's back.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from leuko.data.imageio import RESIZE_MODES, ResizeMode, _resize  # noqa: E402
from leuko.errors import LeukoError  # noqa: E402

AUGMENT_PRESETS: dict[str, str] = {
    "none": "no augmentation",
    "study": "random horizontal reflection and translation (+-10%), as in the "
    "AlexNet/GoogLeNet/ResNet/VGG transfer-learning study",
    "cells": "flips and 90-degree rotations, small rotation/scale/shift, "
    "brightness/contrast, hue/saturation and stain-like colour jitter",
}
"""Augmentation presets by name, with a one-line description (shown by the CLI)."""

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


def check_augment(augment: str) -> str:
    """Return ``augment`` if it names a preset, else raise listing the presets."""
    if augment not in AUGMENT_PRESETS:
        raise LeukoError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}; got {augment!r}")
    return augment


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
# Augmentation
# --------------------------------------------------------------------------- #


class StainJitter(A.ImageOnlyTransform):
    """Stain-like colour jitter: scale and shift each channel's optical density.

    Stain amount and hue vary between smears and labs; in optical density
    (``OD = -log(I / 256)``) stain concentration is multiplicative, so jitter
    there looks like a differently stained slide rather than a tinted photo
    (a simplified form of the HED jitter of Tellez et al., 2018, done per RGB
    channel). The map is a per-channel function of the pixel value, so it is
    applied as a 256-entry lookup table: almost free on uint8.

    Args:
        alpha: OD scale is drawn from ``[1 - alpha, 1 + alpha]`` per channel.
        beta: OD shift is drawn from ``[-beta, beta]`` per channel.
    """

    def __init__(self, alpha: float = 0.05, beta: float = 0.05, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def get_params(self) -> dict[str, Any]:
        a = self.random_generator.uniform(1 - self.alpha, 1 + self.alpha, size=3)
        b = self.random_generator.uniform(-self.beta, self.beta, size=3)
        od = -np.log((np.arange(256, dtype=np.float64)[:, None] + 1.0) / 256.0)
        out = 256.0 * np.exp(-(od * a + b)) - 1.0
        lut = np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(256, 1, 3)
        return {"lut": lut}

    def apply(self, img: np.ndarray, lut: np.ndarray | None = None, **params: Any) -> np.ndarray:
        if lut is None:
            return img
        return cv2.LUT(np.ascontiguousarray(img), lut)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("alpha", "beta")


_BORDER = cv2.BORDER_REFLECT_101
"""Fill for geometric augmentation: continue the smear background rather than
add black borders, which are a cue that never occurs in real test images."""


def augment_transforms(augment: str) -> list[A.BasicTransform]:
    """The albumentations ops of preset ``augment`` (uint8 in, uint8 out, same size)."""
    check_augment(augment)
    if augment == "none":
        return []
    if augment == "study":
        return [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                translate_percent={"x": (-0.1, 0.1), "y": (-0.1, 0.1)},
                scale=1.0,
                rotate=0.0,
                shear=0.0,
                border_mode=_BORDER,
                p=1.0,
            ),
        ]
    # "cells": blood cells have no up, down, left or right.
    return [
        A.SquareSymmetry(p=1.0),
        A.Affine(
            scale=(0.9, 1.1),
            rotate=(-15.0, 15.0),
            translate_percent={"x": (-0.05, 0.05), "y": (-0.05, 0.05)},
            border_mode=_BORDER,
            p=0.7,
        ),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.HueSaturationValue(hue_shift_limit=6, sat_shift_limit=15, val_shift_limit=0, p=0.5),
        StainJitter(alpha=0.05, beta=0.05, p=0.5),
    ]


# --------------------------------------------------------------------------- #
# The full transform
# --------------------------------------------------------------------------- #


class Transform:
    """``uint8 H x W x 3`` -> normalised ``float32 3 x S x S`` tensor.

    Calling it runs everything. The input pipeline instead runs
    :attr:`preprocess` once (and caches it) and :meth:`from_preprocessed` per
    epoch, which is why the two halves are exposed.

    Augmentation randomness comes from one generator shared by all ops (seeded
    by ``seed``, or from the OS); :meth:`reseed` gives each DataLoader worker
    its own stream, which albumentations does not do by itself.
    """

    def __init__(
        self,
        preprocess: Preprocess,
        *,
        augment: str = "none",
        train: bool = False,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int | None = None,
    ) -> None:
        self.preprocess = preprocess
        self.augment = check_augment(augment)
        self.train = bool(train)
        self.mean = _check_stats("mean", mean, positive=False)
        self.std = _check_stats("std", std, positive=True)
        ops = augment_transforms(self.augment) if self.train else []
        self._ops = A.Compose(ops, p=1.0) if ops else None
        # x = (u8 / 255 - mean) / std  ==  u8 * scale - offset
        std_arr = np.asarray(self.std, dtype=np.float64)
        self._scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        self._offset = (np.asarray(self.mean, dtype=np.float64) / std_arr).astype(np.float32)
        self.reseed(seed)

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def reseed(self, seed: int | None) -> None:
        """Restart the augmentation stream from ``seed`` (``None``: fresh OS entropy).

        One generator is shared by all ops: ``Compose(seed=...)`` would give each
        op its own generator with the *same* seed, making e.g. two p=0.5 flips
        fire together.
        """
        if self._ops is not None:
            self._ops.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def augment_uint8(self, image: np.ndarray) -> np.ndarray:
        """Apply the augmentation preset only (identity when not training)."""
        if self._ops is None:
            return image
        return self._ops(image=image)["image"]

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """``uint8 H x W x 3`` -> normalised ``float32 3 x H x W`` (one fused pass)."""
        # Per-channel numpy writes straight into the CHW buffer: one pass, no
        # temporaries, and no torch intra-op threads (which cost more than they
        # save on one small image, and fight the training loop for cores).
        h, w = image.shape[:2]
        out = np.empty((3, h, w), dtype=np.float32)
        for c in range(3):
            np.multiply(image[..., c], self._scale[c], out=out[c], dtype=np.float32)
            out[c] -= self._offset[c]
        return torch.from_numpy(out)

    def from_preprocessed(self, image: np.ndarray) -> torch.Tensor:
        """The per-epoch half: augment (when training) and normalise an image at :attr:`image_size`."""
        if image.shape[0] != self.image_size or image.shape[1] != self.image_size:
            raise LeukoError(
                f"from_preprocessed expects {self.image_size}x{self.image_size} images; "
                f"got {image.shape[1]}x{image.shape[0]} (run .preprocess first)"
            )
        if not image.flags.writeable:  # a view on a read-only cache
            image = np.array(image)
        return self.to_tensor(self.augment_uint8(image))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.from_preprocessed(self.preprocess(image))

    def __repr__(self) -> str:
        return (
            f"Transform(image_size={self.image_size}, resize={self.preprocess.resize!r}, "
            f"preprocess={list(self.preprocess.steps)}, augment={self.augment!r}, train={self.train}, "
            f"mean={self.mean}, std={self.std})"
        )


def build_transforms(
    image_size: int,
    *,
    train: bool,
    augment: str = "none",
    preprocess: Sequence[str] | str | None = (),
    mean: Sequence[float],
    std: Sequence[float],
    resize: ResizeMode = "stretch",
    seed: int | None = None,
) -> Transform:
    """Build the image transform for a model input.

    Args:
        image_size: model input side (e.g. the backbone's ``input_size``).
        train: apply the augmentation preset; evaluation transforms ignore it
            (but the name is still validated, so a config typo fails early).
        augment: a name from :data:`AUGMENT_PRESETS`.
        preprocess: step specs from :data:`PREPROCESS_STEPS`, e.g.
            ``["clahe", "center-crop:0.875"]``.
        mean, std: the backbone's normalisation, on the 0-1 pixel scale.
        resize: how non-square inputs become square (``stretch``/``pad``/``crop``).
        seed: augmentation seed (``None``: OS entropy).

    Returns:
        A :class:`Transform`: ``np.ndarray`` uint8 ``H x W x 3`` -> ``torch.float32``
        ``3 x image_size x image_size``.

    Raises:
        LeukoError: an unknown preset or step, or bad ``mean``/``std``/size.
    """
    pre = build_preprocess(image_size, preprocess, resize=resize)
    return Transform(pre, augment=augment, train=train, mean=mean, std=std, seed=seed)


TransformFn = Callable[[np.ndarray], Any]
"""Anything that maps an ``H x W x 3`` uint8 array to a model input."""

__all__ = [
    "AUGMENT_PRESETS",
    "PREPROCESS_STEPS",
    "Preprocess",
    "StainJitter",
    "Transform",
    "TransformFn",
    "augment_transforms",
    "build_preprocess",
    "build_transforms",
    "check_augment",
    "clahe",
    "parse_preprocess",
]
