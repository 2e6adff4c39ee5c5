"""One dispatch from a model card's kind to the predictor that serves it.

``load_predictor(path)`` reads only what it must to choose: an exported ``.onnx`` runs in onnxruntime
(never importing torch); otherwise the card's :class:`~leuko.run.card.ModelKind` (one network, an
ensemble, a routed run) picks the class in :data:`PREDICTORS`. A new kind (a field detector) registers
its predictor here and nowhere else.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leuko.errors import LeukoError
from leuko.run.card import ModelKind
from leuko.run.folder import kind_of

if TYPE_CHECKING:
    from leuko.infer.backends import BasePredictor

PREDICTORS: dict[ModelKind, str] = {
    ModelKind.NETWORK: "leuko.infer.predictor:Predictor",
    ModelKind.ENSEMBLE: "leuko.infer.predictor:Predictor",
    ModelKind.ROUTED: "leuko.infer.route:RoutedPredictor",
}
"""The predictor class of each kind, as ``module:Class`` (imported on first use: torch only when needed)."""

ONNX_PREDICTOR = "leuko.infer.onnx:OnnxPredictor"
"""An exported graph (one network or an ensemble traced as one) in onnxruntime."""


def _resolve(ref: str) -> type:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def predictor_class(kind: ModelKind) -> type["BasePredictor"]:
    """The predictor class registered for ``kind``."""
    try:
        return _resolve(PREDICTORS[kind])
    except KeyError:
        raise LeukoError(f"leuko has no predictor for a {kind} model yet") from None


def load_predictor(path: str | Path, **kwargs: Any) -> "BasePredictor":
    """The predictor for a run folder, ``model.pt``, ``home.pt`` or exported ``.onnx``.

    All have the same interface (``card``, ``classes``, ``input``, ``temperature``, ``image_size``,
    ``predict_paths``, ``predict_samples``, ``predict_arrays``, the review checks).

    Args:
        kwargs: ``batch_size``, ``temperature``, ``num_workers`` and ``device``
            (``"cpu"``/``"cuda"``/``None``), for either backend.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise LeukoError(f"no such run folder or model file: {p}")
    if p.is_file() and p.suffix.lower() == ".onnx":
        return _resolve(ONNX_PREDICTOR)(p, **kwargs)
    return predictor_class(kind_of(p))(p, **kwargs)


__all__ = ["ONNX_PREDICTOR", "PREDICTORS", "load_predictor", "predictor_class"]
