"""Calibration: softmax, ECE, reliability bins and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from leuko.errors import LeukoError
from leuko.evaluate import ece, fit_temperature, nll, reliability_bins, softmax
from leuko.run.calibration import T_MAX, T_MIN


def calibrated_logits(n: int = 4000, n_classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits), so T = 1 is right by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, n_classes)) * 2.0
    p = softmax(logits)
    y = np.minimum((p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1), n_classes - 1)
    return logits, y


def test_softmax_rows_sum_to_one_and_is_stable() -> None:
    z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    p = softmax(z)
    assert np.all(np.isfinite(p))
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(softmax(z + 7.0), p)  # shift-invariant
    assert np.allclose(softmax([1.0, 2.0]), softmax(np.array([[1.0, 2.0]]))[0])
    assert np.allclose(softmax(z[1:], temperature=1e6), 1 / 3, atol=1e-5)
    with pytest.raises(LeukoError, match="temperature"):
        softmax(z, temperature=0)


def test_ece_small_for_calibrated_and_large_for_over_confident() -> None:
    logits, y = calibrated_logits(n=20000)
    assert ece(softmax(logits), y) < 0.02
    assert ece(softmax(4 * logits), y) > 0.15


def test_reliability_bins() -> None:
    logits, y = calibrated_logits(n=500)
    p = softmax(logits)
    bins = reliability_bins(p, y)
    assert bins.centers.shape == (15,) and bins.edges.shape == (16,)
    assert bins.counts.sum() == 500
    used = bins.counts > 0
    assert np.all((bins.confidence[used] > bins.edges[:-1][used]) & (bins.confidence[used] <= bins.edges[1:][used]))
    assert np.all(np.isnan(bins.accuracy[~used]))
    # confidence exactly 1 lands in the last bin, not past it
    sure = reliability_bins(np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 0], n_bins=4)
    assert sure.counts.tolist() == [0, 0, 0, 2]
    assert sure.accuracy[-1] == 0.5
    with pytest.raises(LeukoError, match="n_bins"):
        reliability_bins(p, y, n_bins=0)


@pytest.mark.parametrize("scale", [4.0, 0.5])
def test_temperature_scaling_recovers_t_and_improves_nll_and_ece(scale: float) -> None:
    logits, y = calibrated_logits(n=4000, seed=1)
    scaled = scale * logits
    t = fit_temperature(scaled, y)
    assert t == pytest.approx(scale, rel=0.15)
    before, after = softmax(scaled), softmax(scaled, temperature=t)
    assert nll(after, y) < nll(before, y)
    assert ece(after, y) < ece(before, y)
    assert np.array_equal(after.argmax(axis=1), before.argmax(axis=1))  # predictions unchanged


def test_fit_temperature_is_optimal() -> None:
    """No temperature on a fine grid beats the fitted one."""
    logits, y = calibrated_logits(n=1000, seed=2)
    t = fit_temperature(3 * logits, y)
    best = nll(softmax(3 * logits, temperature=t), y)
    grid = [nll(softmax(3 * logits, temperature=g), y) for g in np.linspace(1, 6, 101)]
    assert best <= min(grid) + 1e-9


def test_fit_temperature_degenerate_cases() -> None:
    assert fit_temperature(np.array([[2.0, 0.0]]), [0]) == 1.0  # n < 2
    assert fit_temperature(np.array([[2.0, 0.0], [3.0, 1.0], [0.0, 1.0]]), [0, 0, 0]) == 1.0  # one class
    # separable with margins: NLL keeps falling as T -> 0, clipped at T_MIN
    z = np.array([[5.0, -5.0], [-5.0, 5.0]] * 10)
    assert fit_temperature(z, [0, 1] * 10) == T_MIN
    # logits unrelated to labels: the fit flattens them, clipped at most at T_MAX
    rng = np.random.default_rng(0)
    t = fit_temperature(rng.normal(size=(400, 4)) * 10, rng.integers(0, 4, 400))
    assert T_MIN <= t <= T_MAX and t > 5
    with pytest.raises(LeukoError, match="rows"):
        fit_temperature(np.zeros((3, 2)), [0, 1])
    with pytest.raises(LeukoError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0], [0.0, 1.0]]), [0, 1])
