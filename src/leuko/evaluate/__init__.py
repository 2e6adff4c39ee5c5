"""Evaluation building blocks: metrics, calibration and figures on plain arrays.

Pure functions of ``(y_true, probs)`` or of a metrics dict, so the
``leuko evaluate`` command, reports and notebooks share one implementation.
This package never imports :mod:`leuko.train` or :mod:`leuko.cli`.

Figure functions are loaded on first use, so importing the metrics does not
pay for matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from leuko.evaluate.metrics import (
    bootstrap_ci,
    classification_report_text,
    compute_metrics,
    confusion_matrix,
    format_mean_std,
    predictions_frame,
    summarise_folds,
)
from leuko.run.calibration import (  # re-exported: evaluation reads calibration too
    ReliabilityBins,
    ece,
    fit_temperature,
    nll,
    reliability_bins,
    softmax,
)

if TYPE_CHECKING:
    from leuko.evaluate.figures import (
        plot_compare_bars,
        plot_confusion_matrix,
        plot_misclassified_gallery,
        plot_per_class_bars,
        plot_reliability,
        plot_roc_curves,
        plot_training_curves,
    )

_FIGURES = {
    "plot_compare_bars",
    "plot_confusion_matrix",
    "plot_misclassified_gallery",
    "plot_per_class_bars",
    "plot_reliability",
    "plot_roc_curves",
    "plot_training_curves",
}


def __getattr__(name: str) -> Any:
    if name in _FIGURES:
        return getattr(importlib.import_module("leuko.evaluate.figures"), name)
    raise AttributeError(f"module 'leuko.evaluate' has no attribute {name!r}")


__all__ = [
    "ReliabilityBins",
    "bootstrap_ci",
    "classification_report_text",
    "compute_metrics",
    "confusion_matrix",
    "ece",
    "fit_temperature",
    "format_mean_std",
    "nll",
    "predictions_frame",
    "reliability_bins",
    "softmax",
    "summarise_folds",
    *sorted(_FIGURES),
]
