"""Inference: the batched, calibrated Predictor (PyTorch or ONNX), export and explanations.

``load_predictor(path)`` picks the backend: a run folder or ``model.pt`` runs
in PyTorch (:class:`Predictor`), an exported ``.onnx`` in onnxruntime
(:class:`OnnxPredictor`). Names that need torch are loaded on first use, so
``from leuko.infer import load_predictor`` followed by ONNX prediction never
imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from leuko.infer.backends import BasePredictor, ModelInput, Prediction
from leuko.infer.load import load_predictor

if TYPE_CHECKING:
    from leuko.infer.onnx import ExportResult, OnnxPredictor, export_onnx, read_onnx_card
    from leuko.infer.predictor import Predictor, batched_logits

_LAZY = {
    "Predictor": "leuko.infer.predictor",
    "batched_logits": "leuko.infer.predictor",
    "OnnxPredictor": "leuko.infer.onnx",
    "ExportResult": "leuko.infer.onnx",
    "export_onnx": "leuko.infer.onnx",
    "read_onnx_card": "leuko.infer.onnx",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leuko.infer' has no attribute {name!r}")


__all__ = ["BasePredictor", "ModelInput", "Prediction", "load_predictor", *sorted(_LAZY)]
