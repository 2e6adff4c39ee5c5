"""What a model expects from the data pipeline: its input size, normalisation and weight choices.

timm keeps a model's pretrained config apart from its builder; leuko does the same, so that the weight
loaders (:mod:`leuko.models.weights`) and the registry (:mod:`leuko.models.registry`) both read
:class:`ModelInfo` without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LITE_MEAN", "LITE_STD", "ModelInfo"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: EfficientNet-Lite (TF) preprocessing is ``(pixel - 127) / 128``; in 0..1 units:
LITE_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE_STD: tuple[float, float, float] = (128 / 255,) * 3


@dataclass(frozen=True)
class ModelInfo:
    """What a model expects from the data pipeline, and which weights it can start from.

    Attributes:
        name: leuko name (registry key, or the timm name for pass-through models).
        arch: timm/torchvision architecture name used to build it.
        source: ``"timm"``, ``"torchvision"`` or ``"leuko"``.
        family: architecture family, for tables and plots.
        input_size: ``(3, H, W)`` the model was designed/pretrained for.
        mean, std: per-channel normalisation of 0..1 RGB inputs.
        interpolation: resize interpolation of the pretrained recipe.
        crop_pct: centre-crop fraction of the pretrained eval recipe.
        default_pretrained: what ``pretrained=None`` means (imagenet/bundled/none).
        bundled: whether weights ship with an installed package (work offline).
        imagenet: whether ImageNet weights can be downloaded.
        registered: False for timm pass-through names.
    """

    name: str
    arch: str
    source: str
    family: str
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    default_pretrained: str = "imagenet"
    bundled: bool = False
    imagenet: bool = True
    registered: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists) for run folders and the CLI."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
