"""The PyTorch predictor: batched, calibrated prediction from a run folder, for ``evaluate`` and ``predict``.

A :class:`Predictor` is built once from a run (``model.pt`` carries the
architecture, classes, input size, normalisation, preprocessing and the
fitted temperature) and maps images to class probabilities. Decoding,
batching, unreadable files, TTA and the temperature are shared with the ONNX
backend (:mod:`leuko.infer.backends`); this module only adds the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from leuko.data.samples import Sample
from leuko.data.transforms import Transform, build_transforms
from leuko.errors import LeukoError
from leuko.infer.backends import BasePredictor, LoadFn, ModelInput, Prediction, run_batches, sample_loader
from leuko.run.folder import load_model

__all__ = ["Prediction", "Predictor", "batched_logits"]


class Predictor(BasePredictor):
    """A trained PyTorch model ready for inference on CPU or GPU.

    Args:
        run: a run folder or its ``model.pt``.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (GPU when available).
        batch_size: images per forward pass.
        temperature: override the stored temperature (``1.0`` = uncalibrated).
        num_workers: image-decoding threads (default: the CPUs available).

    Attributes:
        model: the network, in eval mode, channels-last, on :attr:`device`.
    """

    backend = "pytorch"

    def __init__(
        self,
        run: str | Path,
        *,
        device: str | None = None,
        batch_size: int = 64,
        temperature: float | None = None,
        num_workers: int | None = None,
    ) -> None:
        model, card = load_model(run)
        super().__init__(card, batch_size=batch_size, temperature=temperature, num_workers=num_workers)
        self.model = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device, memory_format=torch.channels_last).eval()

    def transform(self) -> Transform:
        """The evaluation transform (uint8 image -> normalised tensor), e.g. for Grad-CAM inputs."""
        return build_transforms(
            self.image_size,
            train=False,
            preprocess=self.input.get("preprocess", []),
            mean=self.input["mean"],
            std=self.input["std"],
            resize=self.input.get("resize", "stretch"),
        )

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return _torch_logits(self.model, self.device, x)

    def logits_for(
        self, samples: Sequence[Sample], *, cache: bool = False, num_workers: int | None = None, tta: bool = False
    ) -> np.ndarray:
        """Raw logits (before temperature) of every sample, in order; an unreadable one raises."""
        return batched_logits(
            self.model, samples, self.transform(), self.image_size, device=self.device,
            batch_size=self.batch_size, cache=cache,
            num_workers=self.num_workers if num_workers is None else num_workers, tta=tta,
        )


@torch.inference_mode()
def _torch_logits(model: torch.nn.Module, device: torch.device | str, x: np.ndarray) -> np.ndarray:
    """One forward pass of a normalised ``N x 3 x S x S`` numpy batch (channels-last on the device)."""
    t = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
    return model(t).float().cpu().numpy()


def batched_logits(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    transform: Transform,
    image_size: int,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    cache: bool = False,
    num_workers: int | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Logits of ``model`` (put in eval mode) for every sample, in order; optional flip/rotation TTA.

    For callers that need one row per sample (calibration at the end of
    training): an unreadable image raises :class:`LeukoError` naming it.

    Args:
        transform: the evaluation transform (its preprocessing and
            normalisation are used; it must not augment).
        cache: read the samples through the decoded-image cache (built once,
            reused by later calls on the same files).
        num_workers: decoding threads (default: the CPUs available; 0 = none).
    """
    samples = list(samples)
    if not samples:
        return np.zeros((0, 0), dtype=np.float32)
    if transform.train and transform.augment != "none":
        raise ValueError("batched_logits needs an evaluation transform (train=False)")
    if transform.image_size != image_size:
        raise LeukoError(f"image_size {image_size} does not match the transform's {transform.image_size}")
    model_input = ModelInput(transform.preprocess, transform.normalize)
    load: LoadFn = sample_loader(samples, model_input)
    if cache:
        from leuko.data.pipeline import DecodedCache

        decoded = DecodedCache(samples, model_input.preprocess).build()

        def load(i: int, out: np.ndarray) -> str | None:  # noqa: F811 - the cached variant
            model_input.normalize(decoded.get(samples[i]), out)
            return None

    was_training = model.training
    model.eval()
    try:
        _, logits, failed = run_batches(
            lambda x: _torch_logits(model, device, x), len(samples), load, model_input,
            batch_size=batch_size, workers=num_workers, tta=tta,
        )
    finally:
        model.train(was_training)
    if failed:
        i, reason = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise LeukoError(f"cannot read image {samples[i].path}: {reason}{more}")
    return logits
