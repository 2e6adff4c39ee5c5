"""Calibration: softmax with a temperature, fitting that temperature, ECE and reliability bins.

Fine-tuned CNNs are usually over-confident: their top-class probability is
higher than their accuracy. A single temperature ``T`` (logits / T) fitted on
validation logits fixes most of that without changing a single prediction
(argmax is invariant), which is why it is the calibration step ``leuko``
applies (Guo et al., 2017, "On Calibration of Modern Neural Networks").

Everything here is numpy on arrays, with no torch, scipy or training code, so a
notebook can call it on saved logits.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from leuko.errors import LeukoError

#: Temperatures are clipped to this range: outside it the fit is driven by a
#: degenerate validation set (all correct with huge margins, or near-random),
#: not by a calibration effect worth applying.
T_MIN, T_MAX = 0.05, 20.0

#: Bins of the expected calibration error, the common choice in the literature.
DEFAULT_BINS = 15


# --------------------------------------------------------------------------- validation


def _check_targets(y: object, n_classes: int | None = None, *, name: str = "y") -> np.ndarray:
    """``y`` as a 1-D int64 array of class indices in ``[0, n_classes)``."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise LeukoError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise LeukoError(f"{name} must hold integer class indices, got non-integer values")
    elif arr.size and arr.dtype.kind not in "iub":
        raise LeukoError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise LeukoError(f"{name} holds a negative class index ({int(arr.min())})")
    if n_classes is not None and arr.size and arr.max() >= n_classes:
        raise LeukoError(f"{name} holds class index {int(arr.max())} but there are only {n_classes} classes")
    return arr


def _check_matrix(x: object, *, name: str) -> np.ndarray:
    """``x`` as a finite float64 ``(n, C)`` array with at least one row and one column."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise LeukoError(f"{name} must be a non-empty (n_samples, n_classes) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise LeukoError(f"{name} contains NaN or infinite values")
    return arr


def _check_probs(probs: object, *, name: str = "probs", atol: float = 1e-3) -> np.ndarray:
    """Probabilities: non-negative rows that sum to 1 (a common slip is passing logits)."""
    arr = _check_matrix(probs, name=name)
    if arr.min() < -1e-9 or arr.max() > 1 + 1e-9:
        raise LeukoError(f"{name} must be probabilities in [0, 1] (logits? apply leuko.evaluate.softmax first)")
    sums = arr.sum(axis=1)
    bad = np.abs(sums - 1.0) > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise LeukoError(
            f"{name} rows must sum to 1, row {i} sums to {sums[i]:.6f} (logits? apply leuko.evaluate.softmax first)"
        )
    return np.clip(arr, 0.0, 1.0)


def _check_pair(probs_or_logits: np.ndarray, y: np.ndarray, *, name: str) -> None:
    if probs_or_logits.shape[0] != y.shape[0]:
        raise LeukoError(f"{name} has {probs_or_logits.shape[0]} rows but y has {y.shape[0]} labels")


def check_probs_targets(probs: object, y: object, *, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a ``(probs, y)`` pair once, at the boundary, and return clean arrays.

    Shared by metrics and figures so every entry point rejects the same bad
    inputs (wrong shapes, logits instead of probabilities, out-of-range labels)
    with the same one-line :class:`~leuko.errors.LeukoError`.
    """
    p = _check_probs(probs)
    if n_classes is not None and p.shape[1] != n_classes:
        raise LeukoError(f"probs has {p.shape[1]} columns but there are {n_classes} classes")
    t = _check_targets(y, p.shape[1])
    _check_pair(p, t, name="probs")
    return p, t


# --------------------------------------------------------------------------- softmax / temperature


def softmax(logits: object, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable: max is subtracted).

    Works on a single row (1-D) or a batch (last axis = classes).
    """
    if not np.isfinite(temperature) or temperature <= 0:
        raise LeukoError(f"temperature must be a positive number, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.ndim == 0 or z.shape[-1] == 0:
        raise LeukoError(f"logits must have a class axis, got shape {z.shape}")
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(probs: object, y: object, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at ``eps``)."""
    p, t = check_probs_targets(probs, y)
    return float(-np.mean(np.log(np.clip(p[np.arange(t.size), t], eps, 1.0))))


def fit_temperature(logits: object, y: object, *, tol: float = 1e-8, max_iter: int = 100) -> float:
    """Temperature ``T`` that minimises the NLL of ``softmax(logits / T)`` on ``(logits, y)``.

    Fit it on validation logits and apply it to test logits: it changes the
    confidences, never the predicted class. The NLL is convex in ``1/T``, so we
    find the root of its derivative with Newton steps kept inside a shrinking
    bracket (falling back to bisection): deterministic, a few milliseconds, no
    torch or scipy, and it cannot diverge. The result is clipped to
    ``[0.05, 20]``; ``T = 1`` (no change) when there are fewer than two
    samples or only one class in ``y``, because then there is nothing to
    calibrate against.
    """
    z = _check_matrix(logits, name="logits")
    t = _check_targets(y, z.shape[1])
    _check_pair(z, t, name="logits")
    if t.size < 2 or np.unique(t).size < 2 or z.shape[1] < 2:
        return 1.0
    z = z - z.mean(axis=1, keepdims=True)  # softmax is shift-invariant; keeps numbers small
    zy = z[np.arange(t.size), t]

    def grad(beta: float) -> tuple[float, float]:
        lp = _log_softmax(beta * z)
        p = np.exp(lp)
        ez = (p * z).sum(axis=1)
        var = (p * z * z).sum(axis=1) - ez * ez
        return float(np.mean(ez - zy)), float(np.mean(np.maximum(var, 0.0)))

    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN  # bracket on beta = 1/T
    g_lo, _ = grad(lo)
    if g_lo >= 0:  # NLL already increasing at the smallest beta: the largest T wins
        return T_MAX
    g_hi, _ = grad(hi)
    if g_hi <= 0:  # still decreasing at the largest beta: the smallest T wins
        return T_MIN
    beta = 1.0 if lo < 1.0 < hi else 0.5 * (lo + hi)
    for _ in range(max_iter):
        g, h = grad(beta)
        if abs(g) < tol:
            break
        if g > 0:
            hi = beta
        else:
            lo = beta
        step = beta - g / h if h > 0 else None
        beta = step if step is not None and lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-12 * max(1.0, beta):
            break
    return float(np.clip(1.0 / beta, T_MIN, T_MAX))


# --------------------------------------------------------------------------- ECE / reliability


class ReliabilityBins(NamedTuple):
    """Per-bin summary of top-class confidence vs accuracy (empty bins hold NaN)."""

    centers: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    counts: np.ndarray
    edges: np.ndarray


def reliability_bins(probs: object, y: object, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """Bin samples by top-class confidence into ``n_bins`` equal-width bins on ``[0, 1]``.

    Bins are right-closed ``(lo, hi]`` (a confidence of exactly 0 goes to the
    first bin), the convention of most ECE implementations. These are the bars
    of a reliability diagram and the terms of :func:`ece`.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise LeukoError(f"n_bins must be a positive integer, got {n_bins}")
    n_bins = int(n_bins)
    p, t = check_probs_targets(probs, y)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.digitize(conf, edges[1:-1], right=True)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
    return ReliabilityBins(
        centers=(edges[:-1] + edges[1:]) / 2,
        accuracy=acc,
        confidence=mean_conf,
        counts=counts.astype(np.int64),
        edges=edges,
    )


def ece(probs: object, y: object, n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error: ``sum_b (n_b / n) * |accuracy_b - confidence_b|``.

    Top-class confidence, equal-width bins. 0 means confidences match
    accuracies; an over-confident network scores high even when accurate.
    """
    bins = reliability_bins(probs, y, n_bins)
    n = bins.counts.sum()
    used = bins.counts > 0
    gaps = np.abs(bins.accuracy[used] - bins.confidence[used])
    return float(np.sum(gaps * bins.counts[used]) / n)


__all__ = [
    "DEFAULT_BINS",
    "ReliabilityBins",
    "T_MAX",
    "T_MIN",
    "check_probs_targets",
    "ece",
    "fit_temperature",
    "nll",
    "reliability_bins",
    "softmax",
]
