"""An ensemble of trained networks as one network: the mean of their calibrated logits.

Why one ``nn.Module`` and not a predictor that loops over runs: every
consumer of a run's ``model.pt`` (``Predictor``, test-time augmentation,
ONNX export, Grad-CAM, a routed run's robust network, a distillation
teacher) takes it unchanged, and the ensemble exports as one ONNX graph.

What it computes: each member's logits divided by its own fitted temperature
(so a sharper member does not outvote the others), averaged. The softmax of
that mean is the normalised geometric mean of the members' calibrated
probabilities; its energy (``-logsumexp``) stays meaningful, so the review
policy's "unlike the training data" check works as for one network. The
ensemble gets its own temperature and review thresholds on the validation
split when it is built (:func:`leuko.derive.ensemble.build_ensemble_run`).

Members must read images the same way (size, resize, preprocessing,
normalisation): one input tensor feeds them all.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from leuko.errors import LeukoError

ENSEMBLE = "ensemble"
"""``model.name`` of an ensemble in a ``model.pt``; its ``members`` list holds each member's model spec."""

__all__ = ["ENSEMBLE", "Ensemble", "build_ensemble", "is_ensemble_spec"]


class Ensemble(nn.Module):
    """Members' temperature-scaled logits, averaged.

    Args:
        members: trained networks with the same classes and input.
        temperatures: each member's fitted temperature (1.0: its raw logits).
    """

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float]) -> None:
        super().__init__()
        if len(members) < 2:
            raise LeukoError(f"an ensemble needs at least 2 members; got {len(members)}")
        if len(temperatures) != len(members):
            raise LeukoError(f"got {len(members)} members but {len(temperatures)} temperatures")
        if any(not t > 0 for t in temperatures):
            raise LeukoError(f"member temperatures must be > 0; got {list(temperatures)}")
        self.members = nn.ModuleList(members)
        # The registry's input description (mean, std, size) travels with a built network; the members share it.
        info = getattr(members[0], "leuko_info", None)
        if info is not None:
            self.leuko_info = info
        # A buffer, so the state dict carries it and a reloaded ensemble scales as the saved one did.
        self.register_buffer("inverse_temperatures", torch.tensor([1.0 / float(t) for t in temperatures]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv = self.inverse_temperatures.to(x.dtype)
        total = self.members[0](x) * inv[0]
        for i in range(1, len(self.members)):
            total = total + self.members[i](x) * inv[i]
        return total / len(self.members)


def is_ensemble_spec(spec: Mapping[str, Any]) -> bool:
    """Whether a ``model.pt``'s ``model`` entry describes an :class:`Ensemble`."""
    return spec.get("name") == ENSEMBLE


def build_ensemble(spec: Mapping[str, Any], num_classes: int) -> Ensemble:
    """An untrained :class:`Ensemble` of the architecture ``spec`` describes (its weights come from the state dict).

    ``spec["members"]`` lists each member's ``model`` entry (name, head, dropout).
    """
    from leuko.models.registry import build_model

    members = spec.get("members") or []
    if len(members) < 2:
        raise LeukoError(f"the ensemble's model entry lists {len(members)} member(s); it needs at least 2")
    nets = [
        build_model(m["name"], num_classes=num_classes, pretrained="none", head=m.get("head", "linear"),
                    dropout=m.get("dropout"))
        for m in members
    ]
    return Ensemble(nets, [1.0] * len(nets))
