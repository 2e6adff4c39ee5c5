"""Image preprocessing and augmentation: uint8 arrays in, normalised tensors out.

The work is split in two on purpose:

* :class:`Preprocess` is *deterministic* (resize to the input size, optional
  centre crop, CLAHE). Because the same file always gives the same result, the
  input pipeline (:mod:`leuko.data.pipeline`) runs it once and caches the
  uint8 output on disk. It lives in :mod:`leuko.data.preprocess` (with
  :class:`~leuko.data.preprocess.Normalize`), which imports neither torch nor
  albumentations, so the ONNX predictor shares it; it is re-exported here.
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

import os
import random
from typing import Any, Callable, Sequence

# albumentations asks PyPI for a newer version on import unless told not to;
# a library must not reach the network behind its user's back.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from leuko.data.imageio import ResizeMode  # noqa: E402
from leuko.data.preprocess import (  # noqa: E402  (re-exported: the transform API predates the split)
    PREPROCESS_STEPS,
    Normalize,
    Preprocess,
    build_preprocess,
    clahe,
    parse_preprocess,
)
from leuko.errors import LeukoError  # noqa: E402

AUGMENT_PRESETS: dict[str, str] = {
    "none": "no augmentation",
    "study": "random horizontal reflection and translation (+-10%), as in the "
    "AlexNet/GoogLeNet/ResNet/VGG transfer-learning study",
    "cells": "flips and 90-degree rotations, small rotation/scale/shift, "
    "brightness/contrast, hue/saturation and stain-like colour jitter",
    "stain": "cells, with the colour and optics of other labs: strong optical-density stain "
    "jitter (down to half the stain), hue +-30 degrees, saturation/gamma, low contrast, blur or sharpen to a "
    "random target sharpness (SoftFocus), resampling, JPEG artefacts, 10% greyscale, wider scale "
    "jitter (for models that must work on other labs' slides)",
}
"""Augmentation presets by name, with a one-line description (shown by the CLI)."""

AUGMENT_VERSIONS: dict[str, int] = {"none": 1, "study": 1, "cells": 1, "stain": 4}
"""Version of each preset's ops, raised whenever they change (a config names a preset, not its ops).

``stain``: 1 the first stain jitter, 2 stronger density jitter and blur, 3
``SoftFocus`` (blur to a target sharpness), 4 ``SoftFocus`` sharpens too.
A run records the version it trained with (``data.json``), so a resumed or
re-run config can say when today's preset is not the one its numbers came from.
"""


# --------------------------------------------------------------------------- #
# Argument validation (once, at the boundary, naming the argument)
# --------------------------------------------------------------------------- #


def check_augment(augment: str) -> str:
    """Return ``augment`` if it names a preset, else raise listing the presets."""
    if augment not in AUGMENT_PRESETS:
        raise LeukoError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}; got {augment!r}")
    return augment


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
        density: range of one OD factor shared by the three channels: how much
            stain the whole smear took up (``(0.55, 1.15)``: down to roughly
            half as dark, as BCCD's pale lavender nuclei are next to PBC's).
            ``(1, 1)``: channel-wise jitter only.
    """

    def __init__(
        self, alpha: float = 0.05, beta: float = 0.05, p: float = 0.5, density: tuple[float, float] = (1.0, 1.0)
    ) -> None:
        super().__init__(p=p)
        self.alpha = float(alpha)
        self.beta = float(beta)
        lo, hi = (float(v) for v in density)
        if not 0.0 < lo <= hi:
            raise LeukoError(f"StainJitter density must be a range (low, high) with 0 < low <= high; got {density!r}")
        self.density = (lo, hi)

    def get_params(self) -> dict[str, Any]:
        a = self.random_generator.uniform(1 - self.alpha, 1 + self.alpha, size=3)
        a = a * self.random_generator.uniform(*self.density)
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
        return ("alpha", "beta", "density")


def detail(image: np.ndarray) -> float:
    """How sharp an image is: RMS of its grey detail band (image minus its 1-pixel Gaussian blur), in grey levels.

    Measured at the model's input size: after ``cell-crop`` at 128 px, PBC's
    granulocytes and monocytes sit at 4.6-5.8, its lymphocytes at 3.9, its
    platelets at 2.0 (blown up from a few pixels), and every BCCD class at 1.5-2.2.
    """
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    grey = grey.astype(np.float32)
    return float(np.sqrt(np.mean((grey - cv2.GaussianBlur(grey, (0, 0), 1.0)) ** 2)))


def _bisect(short_of_goal: Callable[[float], bool], hi: float, steps: int = 7) -> tuple[float, float]:
    """``(lo, hi)`` bracketing where a monotone ``short_of_goal`` turns False on ``[0, hi]``, after ``steps`` halvings.

    SoftFocus's one search, for the blur sigma and the sharpening amount alike.
    """
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if short_of_goal(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


class SoftFocus(A.ImageOnlyTransform):
    """Blur an image down to a randomly drawn sharpness, so that sharpness says nothing about the class.

    In PBC (after ``cell-crop``) softness *is* a class cue: platelets are
    blown up from a few pixels and are soft, granulocytes are sharp
    (:func:`detail`). A model learns "soft = platelet" and a lab with softer
    optics falls into it: the 8-class model called 82 of BCCD's 356 white
    cells platelets (their accuracy after the class map: 58%, the rest 84%).
    A blur of random strength (the usual augmentation) keeps the ordering of
    the classes; drawing a *target* sharpness and blurring each image down to
    it gives every class the same range. Images softer than the target are
    left alone, or with ``sharpen`` > 0 sharpened up to it (an unsharp mask
    of at most that amount): blurring alone leaves the soft class (platelets)
    soft in every draw while the others are soft only sometimes, so softness
    stays a platelet cue; raising soft images as well makes every class's
    sharpness follow the drawn target.

    Args:
        target: range the target :func:`detail` is drawn from, in grey levels.
        sharpen: largest unsharp-mask amount for images softer than the
            target (0: never sharpen); the detail it adds is about 0.4 x amount x the
            image's own (3: a platelet from 2.0 to up to 4.4).
        p: probability of applying.
    """

    _MAX_SIGMA = 6.0

    def __init__(self, target: tuple[float, float] = (1.2, 5.0), sharpen: float = 0.0, p: float = 0.7) -> None:
        super().__init__(p=p)
        lo, hi = (float(v) for v in target)
        if not 0.0 < lo <= hi:
            raise LeukoError(f"SoftFocus target must be a range (low, high) with 0 < low <= high; got {target!r}")
        if not 0.0 <= float(sharpen) <= 10.0:
            raise LeukoError(f"SoftFocus sharpen must be between 0 and 10; got {sharpen!r}")
        self.target = (lo, hi)
        self.sharpen = float(sharpen)

    def get_params(self) -> dict[str, Any]:
        return {"goal": float(self.random_generator.uniform(*self.target))}

    def apply(self, img: np.ndarray, goal: float | None = None, **params: Any) -> np.ndarray:
        if goal is None:
            return img
        now = detail(img)
        if now <= goal:
            return self._sharpen(img, goal) if self.sharpen > 0 and now < goal else img
        # detail falls monotonically with sigma: the least sigma that gets down to the goal
        _, sigma = _bisect(lambda mid: detail(cv2.GaussianBlur(img, (0, 0), mid)) > goal, self._MAX_SIGMA)
        return cv2.GaussianBlur(img, (0, 0), sigma)

    def _sharpen(self, img: np.ndarray, goal: float) -> np.ndarray:
        """Unsharp mask (the detail band :func:`detail` measures, amplified) up to ``goal``, amount <= ``sharpen``."""
        x = img.astype(np.float32)
        band = x - cv2.GaussianBlur(x, (0, 0), 1.0)

        def out(amount: float) -> np.ndarray:
            return np.clip(x + amount * band, 0, 255).astype(np.uint8)

        if detail(out(self.sharpen)) <= goal:
            return out(self.sharpen)
        # detail rises monotonically with the amount: the largest amount that stays below the goal
        amount, _ = _bisect(lambda mid: detail(out(mid)) < goal, self.sharpen)
        return out(amount)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("target", "sharpen")


SOFT_FOCUS_REF_SIZE = 128
"""Input side at which the ``stain`` preset's :class:`SoftFocus` range (1.2-5.0) was measured."""


def soft_focus_target(image_size: int) -> tuple[float, float]:
    """:class:`SoftFocus`'s target range for the ``stain`` preset at ``image_size`` px.

    :func:`detail` is per pixel, so the same cell rendered larger reads softer:
    from 128 to 144 / 160 px every class's median drops by a factor of
    0.89-0.92 / 0.80-0.85 (PBC and BCCD after ``cell-crop``), about
    ``128 / image_size``. Scaling the range that way keeps the share of images
    blurred, and how far, the same at every input size.
    """
    f = SOFT_FOCUS_REF_SIZE / float(image_size)
    return (round(1.2 * f, 3), round(5.0 * f, 3))


_BORDER = cv2.BORDER_REFLECT_101
"""Fill for geometric augmentation: continue the smear background rather than
add black borders, which are a cue that never occurs in real test images."""


def augment_transforms(augment: str, image_size: int = SOFT_FOCUS_REF_SIZE) -> list[A.BasicTransform]:
    """The albumentations ops of preset ``augment`` (uint8 in, uint8 out, same size).

    ``image_size`` is the side the ops run at; only ``stain`` depends on it
    (:class:`SoftFocus`'s target sharpness is per pixel, see :func:`soft_focus_target`).
    """
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
    if augment == "stain":
        return _stain_transforms(image_size)
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


def _stain_transforms(image_size: int) -> list[A.BasicTransform]:
    """The ``stain`` preset: what differs between labs, beyond what one lab's slides vary by.

    Another lab's smears differ in stain uptake (optical density: strong
    :class:`StainJitter`), in the camera's white balance and gamma, in focus
    and optics (BCCD's fields are softer and lower in contrast than PBC's:
    :class:`SoftFocus` blurs sharp images and sharpens soft ones to a random
    sharpness, so that softness stops meaning "platelet"; resampling; contrast *reduction* weighted more than increase), in
    JPEG compression, and in how tightly a cell fills the crop even after
    ``cell-crop`` (scale 0.85-1.2). Stain density moves down to about half
    (BCCD's nuclei are pale lavender where PBC's are near black, and a
    PBC-trained model without this calls BCCD's neutrophils monocytes, whose
    nuclei are paler in PBC); hue moves up to +-30 degrees (BCCD's eosinophil
    granules are pink, PBC's orange); one image in ten is grey, so that the
    shape of the nucleus and the texture of the granules carry the decision
    when the colours are another lab's.
    """
    return [
        A.SquareSymmetry(p=1.0),
        A.Affine(
            scale=(0.85, 1.2),
            rotate=(-20.0, 20.0),
            translate_percent={"x": (-0.06, 0.06), "y": (-0.06, 0.06)},
            border_mode=_BORDER,
            p=0.8,
        ),
        StainJitter(alpha=0.2, beta=0.1, density=(0.55, 1.15), p=0.9),
        A.HueSaturationValue(hue_shift_limit=15, sat_shift_limit=35, val_shift_limit=10, p=0.7),
        A.ToGray(p=0.1),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=(-0.45, 0.2), p=0.8),
        A.RandomGamma(gamma_limit=(75, 133), p=0.3),
        SoftFocus(target=soft_focus_target(image_size), sharpen=3.0, p=0.8),
        A.Downscale(scale_range=(0.4, 0.8), p=0.15),
        A.ImageCompression(quality_range=(40, 95), p=0.3),
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
        self.normalize = Normalize(mean, std)
        self.mean = self.normalize.mean
        self.std = self.normalize.std
        ops = augment_transforms(self.augment, self.image_size) if self.train else []
        self._ops = A.Compose(ops, p=1.0) if ops else None
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
        """``uint8 H x W x 3`` -> normalised ``float32 3 x H x W`` (:class:`Normalize`, wrapped)."""
        return torch.from_numpy(self.normalize(image))

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
    "AUGMENT_VERSIONS",
    "PREPROCESS_STEPS",
    "Normalize",
    "Preprocess",
    "StainJitter",
    "Transform",
    "TransformFn",
    "augment_transforms",
    "soft_focus_target",
    "build_preprocess",
    "build_transforms",
    "check_augment",
    "clahe",
    "parse_preprocess",
]
