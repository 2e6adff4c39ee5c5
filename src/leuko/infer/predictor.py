"""Batched, calibrated prediction from a run folder: what ``evaluate`` and ``predict`` share.

A :class:`Predictor` is built once from a run (``model.pt`` carries the
architecture, classes, input size, normalisation, preprocessing and the
fitted temperature) and maps images to class probabilities. Unreadable
images are reported per file, never fatal for the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from leuko.data.imageio import check_image
from leuko.data.pipeline import SampleDataset, make_loader
from leuko.data.samples import Sample
from leuko.data.transforms import build_transforms
from leuko.evaluate.calibration import softmax
from leuko.runs import load_model

log = logging.getLogger("leuko.infer")


@dataclass
class Prediction:
    """Probabilities for a batch of images (rows follow ``keys``)."""

    keys: list[str]
    logits: np.ndarray
    probs: np.ndarray
    classes: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(1) if len(self.probs) else np.empty(0, dtype=int)


class Predictor:
    """A trained model ready for inference on CPU or GPU.

    Args:
        run: a run folder or its ``model.pt``.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (GPU when available).
        batch_size: images per forward pass.
        temperature: override the stored temperature (``1.0`` = uncalibrated).
    """

    def __init__(self, run: str | Path, *, device: str | None = None, batch_size: int = 64, temperature: float | None = None) -> None:
        self.model, self.meta = load_model(run)
        self.classes: list[str] = list(self.meta["classes"])
        self.input: dict[str, Any] = dict(self.meta["input"])
        self.temperature = float(self.meta.get("temperature", 1.0) if temperature is None else temperature)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.batch_size = batch_size

    @property
    def image_size(self) -> int:
        return int(self.input["image_size"])

    def transform(self) -> Any:
        return build_transforms(
            self.image_size,
            train=False,
            preprocess=self.input.get("preprocess", []),
            mean=self.input["mean"],
            std=self.input["std"],
            resize=self.input.get("resize", "stretch"),
        )

    def logits_for(self, samples: Sequence[Sample], *, cache: bool = False, num_workers: int | None = None, tta: bool = False) -> np.ndarray:
        """Raw logits (before temperature) of readable samples, in order."""
        return batched_logits(
            self.model, samples, self.transform(), self.image_size, device=self.device,
            batch_size=self.batch_size, cache=cache, num_workers=num_workers, tta=tta,
        )

    def predict_samples(self, samples: Sequence[Sample], *, check: bool = True, tta: bool = False, cache: bool = False) -> Prediction:
        """Probabilities for samples; unreadable ones go to ``failed`` with the reason."""
        good: list[Sample] = []
        failed: list[tuple[str, str]] = []
        for s in samples:
            reason = check_image(s.path, full_decode=True)[1] if check else None
            if reason:
                failed.append((str(s.path), reason))
            else:
                good.append(s)
        logits = self.logits_for(good, tta=tta, cache=cache)
        probs = softmax(logits, self.temperature) if len(logits) else np.zeros((0, len(self.classes)))
        return Prediction([s.key for s in good], logits, probs, self.classes, failed)

    def predict_paths(self, paths: Iterable[str | Path], *, tta: bool = False) -> Prediction:
        """Probabilities for image files (label-free)."""
        samples = [Sample(path=Path(p), label="?") for p in paths]
        return self.predict_samples(samples, tta=tta)


@torch.no_grad()
def batched_logits(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    transform: Any,
    image_size: int,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    cache: bool = False,
    num_workers: int | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Logits of ``model`` (put in eval mode) for ``samples``, batched; optional flip/rotation TTA."""
    if not samples:
        return np.zeros((0, 0), dtype=np.float32)
    was_training = model.training
    model.eval()
    c2i = {s.label: 0 for s in samples}
    ds = SampleDataset(samples, c2i, image_size, transform=transform, cache=cache)
    loader = make_loader(ds, batch_size, shuffle=False, num_workers=num_workers, persistent_workers=False)
    out: list[np.ndarray] = []
    try:
        for x, _ in loader:
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            logits = model(x)
            if tta:
                views = (torch.flip(x, dims=[3]), torch.flip(x, dims=[2]), torch.rot90(x, 1, dims=[2, 3]))
                for v in views:
                    logits = logits + model(v.contiguous(memory_format=torch.channels_last))
                logits = logits / (1 + len(views))
            out.append(logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)
