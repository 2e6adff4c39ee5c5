"""Which predictions a technologist should review: low confidence, or an image unlike the training data.

Digital-morphology analysers pre-classify every cell and leave the doubtful
ones to a person. ``leuko`` flags a prediction for review for two reasons,
both decided from the logits alone so the PyTorch and ONNX backends agree:

* **low confidence** — the calibrated top probability is below a threshold
  chosen on the validation split at the end of training: the lowest
  threshold at which the validation images *at or above* it were at least
  ``target_accuracy`` correct (99% by default). What is accepted without
  review is then about as reliable as the target says, on data like the
  validation split.
* **unlike the training data** — the energy score ``-T·logsumexp(z/T)``
  (Liu et al. 2020, "Energy-based Out-of-distribution Detection") is above
  its ``ood_quantile`` (99%) on the validation split. Images from another lab,
  another stain or not a white cell at all tend to give all classes low
  logits, which a softmax hides and the energy does not.

The policy is stored in ``model.pt`` (meta key ``review``) and copied into
ONNX metadata with the rest of the meta. Runs trained without a validation
split have no fitted policy; :meth:`ReviewPolicy.from_record` then falls back to
a 0.5 confidence threshold and no energy check, and says so in ``chosen_on``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from leuko.errors import LeukoError

if TYPE_CHECKING:
    from leuko.run.card import ModelCard

DEFAULT_TARGET_ACCURACY = 0.99
DEFAULT_OOD_QUANTILE = 0.99
FALLBACK_THRESHOLD = 0.5


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy score per row: ``-T * logsumexp(logits / T)``; higher = less like the training data."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = z.max(axis=1, keepdims=True)
    return -float(temperature) * (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


@dataclass(frozen=True)
class ReviewPolicy:
    """Thresholds that decide the ``review`` flag, and where they came from."""

    threshold: float
    energy_threshold: float | None
    target_accuracy: float
    chosen_on: str
    accepted_share: float | None = None
    accepted_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_card(cls, card: "ModelCard") -> "ReviewPolicy":
        """The policy stored with a model, or the documented fallback when it has none."""
        return cls.from_record(card.review)

    @classmethod
    def from_record(cls, raw: Mapping[str, Any] | None) -> "ReviewPolicy":
        """The policy from its own record (:meth:`to_dict`, a card's ``review``), or the fallback for ``None``."""
        if not raw:
            return cls(FALLBACK_THRESHOLD, None, DEFAULT_TARGET_ACCURACY, "default (the run had no validation split to choose on)")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def describe(self) -> str:
        """One line for ``/model``, reports and the CLI."""
        text = f"review when calibrated top probability < {self.threshold:.3f}"
        if self.energy_threshold is not None:
            text += f" or energy > {self.energy_threshold:.3f}"
        text += f"; chosen on {self.chosen_on}"
        if self.accepted_share is not None and self.accepted_accuracy is not None:
            text += f" ({self.accepted_share:.1%} accepted there, {self.accepted_accuracy:.2%} of them correct)"
        return text

    def checks(self, logits: np.ndarray, probs: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Per image, the two review conditions as boolean arrays: ``(low confidence, unlike the training data)``."""
        probs = np.asarray(probs)
        if len(probs) == 0:
            return np.zeros(0, bool), np.zeros(0, bool)
        low = probs.max(axis=1) < self.threshold
        if self.energy_threshold is None:
            return low, np.zeros(len(probs), bool)
        return low, energy(logits, temperature) > self.energy_threshold

    def reasons(self, logits: np.ndarray, probs: np.ndarray, temperature: float = 1.0) -> list[list[str]]:
        """Per image, why it needs review (an empty list: accept as predicted)."""
        low, unlike = self.checks(logits, probs, temperature)
        if not len(low):
            return []
        top = np.asarray(probs).max(axis=1)
        e = energy(logits, temperature) if unlike.any() else None
        out: list[list[str]] = []
        for i in range(len(low)):
            why = []
            if low[i]:
                why.append(f"low confidence ({top[i]:.2f} < {self.threshold:.2f})")
            if unlike[i]:
                why.append(f"unlike the training data (energy {e[i]:.2f} > {self.energy_threshold:.2f})")
            out.append(why)
        return out

    def flags(self, logits: np.ndarray, probs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Boolean review flag per image."""
        low, unlike = self.checks(logits, probs, temperature)
        return low | unlike


def fit_review(
    logits: np.ndarray,
    y: np.ndarray,
    temperature: float = 1.0,
    *,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    ood_quantile: float = DEFAULT_OOD_QUANTILE,
    split_name: str = "validation split",
) -> ReviewPolicy:
    """Choose the review thresholds on held-out logits and labels (see the module docstring)."""
    if not 0.5 <= target_accuracy < 1.0:
        raise LeukoError(f"target accuracy must be in [0.5, 1); got {target_accuracy}")
    if not 0.5 <= ood_quantile < 1.0:
        raise LeukoError(f"OOD quantile must be in [0.5, 1); got {ood_quantile}")
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    if logits.ndim != 2 or len(logits) != len(y) or len(y) < 10:
        raise LeukoError("fit_review needs at least 10 labelled held-out images (logits of shape N x C)")
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    # Sweep candidate thresholds from high to low confidence; accuracy of the accepted set at each.
    order = np.argsort(-conf, kind="stable")
    cum_acc = np.cumsum(correct[order]) / np.arange(1, len(y) + 1)
    ok = np.nonzero(cum_acc >= target_accuracy)[0]
    if len(ok):
        k = int(ok.max())  # accept the most images that still meet the target
        threshold = float(conf[order][k])
    else:
        k, threshold = -1, 1.0
    accepted = conf >= threshold
    n = len(y)
    return ReviewPolicy(
        threshold=threshold,
        energy_threshold=float(np.quantile(energy(logits, temperature), ood_quantile)),
        target_accuracy=float(target_accuracy),
        chosen_on=f"{split_name} ({n} images; energy at its {ood_quantile:.0%} quantile)",
        accepted_share=float(accepted.mean()),
        accepted_accuracy=float(correct[accepted].mean()) if accepted.any() else None,
    )
