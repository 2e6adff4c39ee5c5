"""Explanations: Grad-CAM heat maps of a trained model, as arrays, overlays and PNG files.

:mod:`leuko.explain.gradcam` is the core (usable by a web service on
decoded images); :mod:`leuko.explain.images` is what ``leuko explain`` runs
on files and folders.
"""

from __future__ import annotations

from leuko.explain.gradcam import (
    EXPLAINERS,
    Explanation,
    GradCAM,
    RoutedGradCAM,
    explainer_for,
    explanation_png,
    find_target_layer,
    overlay,
)
from leuko.explain.images import ExplainResult, ExplainedImage, explain_images

__all__ = [
    "EXPLAINERS",
    "ExplainResult",
    "ExplainedImage",
    "Explanation",
    "GradCAM",
    "RoutedGradCAM",
    "explain_images",
    "explainer_for",
    "explanation_png",
    "find_target_layer",
    "overlay",
]
