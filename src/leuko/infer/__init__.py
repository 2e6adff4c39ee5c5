"""Inference: the batched, calibrated Predictor (PyTorch or ONNX), export and explanations."""

from __future__ import annotations

from leuko.infer.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
