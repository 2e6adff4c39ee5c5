"""Calibration of a trained network on its validation split: a temperature and the review policy.

Training (:mod:`leuko.train.runner`) and every run derived from runs (:mod:`leuko.derive`: an ensemble, an
adapted or fine-tuned network) fit them the same way, so the numbers ``model.pt`` carries mean one thing.
The maths on arrays is :mod:`leuko.run.calibration`; the review thresholds are :mod:`leuko.infer.review`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from leuko.infer.review import fit_review
from leuko.run.calibration import ece, fit_temperature, nll, softmax
from leuko.run.data import PreparedData, run_transform

if TYPE_CHECKING:
    import torch

    from leuko.run.config import RunConfig


def calibrate(model: "torch.nn.Module", cfg: "RunConfig", data: PreparedData, info: Any) -> dict[str, Any] | None:
    """Fit a temperature and the review policy on the validation split (Guo et al. 2017); None without one.

    Temperature scaling changes confidence, never the predicted class, so it
    is always safe to apply; ``predict`` and ``evaluate`` use the stored value.
    The review thresholds (:mod:`leuko.infer.review`) are chosen on the same
    calibrated validation outputs.
    """
    if len(data.val) < 10:
        return None
    from leuko.infer.predictor import batched_logits  # torch: only when a PyTorch network is calibrated

    transform = run_transform(cfg.data, info, train=False)
    logits = batched_logits(model, data.val, transform, cfg.data.image_size, num_workers=cfg.data.num_workers)
    c2i = {c: i for i, c in enumerate(data.classes)}
    return calibrate_logits(logits, np.array([c2i[s.label] for s in data.val]))


def calibrate_logits(logits: Any, y: Any) -> dict[str, Any]:
    """:func:`calibrate` from validation logits already computed (an ensemble combines its members')."""
    t = fit_temperature(logits, y)
    before, after = softmax(logits), softmax(logits, t)
    review = fit_review(logits, y, t, split_name="the validation split")
    return {
        "n": len(y),
        "temperature": float(t),
        "ece_before": float(ece(before, y)),
        "ece_after": float(ece(after, y)),
        "nll_before": float(nll(before, y)),
        "nll_after": float(nll(after, y)),
        "review": review.to_dict(),
    }
