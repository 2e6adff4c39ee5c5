"""The review policy: thresholds chosen on held-out logits, flags that follow them."""

from __future__ import annotations

import numpy as np
import pytest

from leuko.errors import LeukoError
from leuko.infer.review import FALLBACK_THRESHOLD, ReviewPolicy, energy, fit_review


def _logits(n: int, rng: np.random.Generator, margin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 3, n)
    z = rng.normal(0, 0.1, (n, 3))
    z[np.arange(n), y] += margin
    return z, y


def test_threshold_meets_target_on_the_split_it_was_chosen_on() -> None:
    rng = np.random.default_rng(0)
    # Confident and right for most; a low-margin tail where a third are wrong.
    z1, y1 = _logits(900, rng, np.full(900, 6.0))
    z2, y2 = _logits(100, rng, np.zeros(100))
    z, y = np.vstack([z1, z2]), np.concatenate([y1, y2])
    policy = fit_review(z, y, target_accuracy=0.99)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    accepted = probs.max(1) >= policy.threshold
    assert (probs.argmax(1)[accepted] == y[accepted]).mean() >= 0.99
    assert policy.accepted_accuracy == pytest.approx((probs.argmax(1)[accepted] == y[accepted]).mean())
    # The confident 900 are accepted, most of the uncertain tail is not.
    assert 0.88 <= policy.accepted_share <= 0.97
    flags = policy.flags(z, probs)
    assert flags.sum() == (~accepted).sum()


def test_energy_flags_images_with_uniformly_low_logits() -> None:
    rng = np.random.default_rng(1)
    z, y = _logits(500, rng, np.full(500, 8.0))
    policy = fit_review(z, y)
    odd = np.array([[0.1, 0.0, 0.05]])  # no class stands out: low logits everywhere
    probs = np.exp(odd) / np.exp(odd).sum()
    reasons = policy.reasons(odd, probs)[0]
    assert any("unlike the training data" in r for r in reasons)
    assert energy(odd)[0] > policy.energy_threshold
    # And ~1% of the split it was chosen on is above the energy threshold.
    assert np.mean(energy(z) > policy.energy_threshold) == pytest.approx(0.01, abs=0.005)


def test_policy_round_trips_through_meta_and_falls_back_without_one() -> None:
    rng = np.random.default_rng(2)
    z, y = _logits(200, rng, np.full(200, 3.0))
    policy = fit_review(z, y, temperature=1.7)
    assert ReviewPolicy.from_record(policy.to_dict()) == policy
    fallback = ReviewPolicy.from_record(None)
    assert fallback.threshold == FALLBACK_THRESHOLD and fallback.energy_threshold is None
    assert "default" in fallback.describe()


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(LeukoError, match="at least 10"):
        fit_review(np.zeros((3, 2)), np.zeros(3, int))
    with pytest.raises(LeukoError, match="target accuracy"):
        fit_review(np.zeros((20, 2)), np.zeros(20, int), target_accuracy=1.0)
