"""The model card: what ``model.pt`` and the ONNX metadata carry besides the weights, typed.

A card makes a network self-describing: its ``kind``, architecture, output classes, the input it expects
(size, resize mode, preprocessing, mean and std), its temperature and review policy, and what it was
trained, adapted or fine-tuned on. ``evaluate``, ``predict``, ``export``, ``serve`` and ``report`` need
nothing else.

The ``kind`` is the one place that says what a model is:

* ``network``: one classifier;
* ``ensemble``: several networks of one recipe as one (:mod:`leuko.models.ensemble`);
* ``routed``: a run folder of two networks and a per-image gate (:mod:`leuko.infer.route`); its
  ``model.pt`` is the robust network and, read on its own, is a ``network`` or an ``ensemble``;
* ``detector``: reserved for a model that finds cells in fields rather than classifying one cell.

Which predictor and which explainer serve a kind is decided by registries one layer up
(:data:`leuko.infer.load.PREDICTORS`, :data:`leuko.explain.EXPLAINERS`), keyed by :class:`ModelKind`;
nothing else asks "is this routed?".

Files written before cards had a ``kind`` still load: the kind is read off the architecture spec (an
ensemble lists ``members``) and the folder (a routed run holds ``route.json``); a test reads a
``model.pt`` written by the code of that time. Unknown keys are kept as they are, so a card read and
written again loses nothing a newer leuko put there.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from leuko.errors import LeukoError

CARD_FORMAT = 1
"""``model.pt``'s ``format``: the layout of the payload (card keys + ``state_dict``)."""

ROUTE_FILE = "route.json"
"""Marks a routed run: ``model.pt`` is its robust network, ``home.pt`` its home network."""
HOME_FILE = "home.pt"


class ModelKind(str, enum.Enum):
    """What a model is; picks its predictor and explainer (see the module docstring)."""

    NETWORK = "network"
    ENSEMBLE = "ensemble"
    ROUTED = "routed"
    DETECTOR = "detector"

    def __str__(self) -> str:
        return self.value


class _Open(BaseModel):
    """Typed fields, and any other key kept as written (cards from newer or older leuko versions)."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())


class NetworkSpec(_Open):
    """How to build the network again: a registry name and head, or an ensemble's ``members``."""

    name: str
    head: str = "linear"
    dropout: Optional[float] = None
    pretrained: Optional[str] = None
    members: Optional[list[dict[str, Any]]] = None

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def display_name(self) -> str:
        """``efficientnet_lite0`` or ``ensemble of 3 (efficientnet_lite0)``."""
        if self.members:
            names = ", ".join(dict.fromkeys(str(m.get("name")) for m in self.members))
            return f"ensemble of {len(self.members)} ({names})"
        return self.name


class InputSpec(_Open):
    """The input a network expects: every image is decoded, preprocessed, resized and normalised so."""

    image_size: int = Field(gt=0)
    resize: str = "stretch"
    preprocess: list[str] = Field(default_factory=list)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ModelCard(_Open):
    """Everything inference needs besides the weights (see the module docstring)."""

    format: int = CARD_FORMAT
    kind: ModelKind = ModelKind.NETWORK
    model: NetworkSpec
    classes: list[str] = Field(default_factory=list)
    input: Optional[InputSpec] = None
    temperature: float = Field(default=1.0, gt=0)
    review: Optional[dict[str, Any]] = None
    """The review policy's own record (:class:`leuko.infer.review.ReviewPolicy`), ``None`` when none was fitted."""
    adapted: Optional[dict[str, Any]] = None
    """Label-free adaptation to another lab (:mod:`leuko.derive.adapt`)."""
    ensemble: Optional[dict[str, Any]] = None
    """An ensemble's members (run folders) and their own temperatures."""
    route: Optional[dict[str, Any]] = None
    """A routed run's gate and home network, carried by its robust network's ``model.pt``."""
    finetuned: Optional[dict[str, Any]] = None
    """Supervised fine-tuning on another lab's labelled cells: the data, cells per class, source-lab scores."""

    @model_validator(mode="before")
    @classmethod
    def _infer_kind(cls, raw: Any) -> Any:
        """Cards written before ``kind`` existed: an ensemble is known by its members."""
        if isinstance(raw, Mapping) and "kind" not in raw:
            spec = raw.get("model")
            members = spec.get("members") if isinstance(spec, Mapping) else None
            raw = {**raw, "kind": ModelKind.ENSEMBLE if members else ModelKind.NETWORK}
        return raw

    @model_validator(mode="after")
    def _classifier_needs_classes(self) -> "ModelCard":
        if self.kind is not ModelKind.DETECTOR:
            if not self.classes:
                raise ValueError("a classifier's card needs its classes")
            if self.input is None:
                raise ValueError("a classifier's card needs its input (image_size, mean, std)")
        return self

    # ----------------------------------------------------------------- reading and writing
    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], *, source: str | Path = "model metadata") -> "ModelCard":
        """The card stored in ``meta`` (a ``model.pt`` payload without weights, or ONNX metadata), checked."""
        raw = {k: v for k, v in meta.items() if k != "state_dict"}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ())) or "card"
            raise LeukoError(f"{source}: the model card is invalid at {where}: {err.get('msg')}") from None

    def to_meta(self) -> dict[str, Any]:
        """The plain JSON-able mapping stored in ``model.pt`` and in the ONNX metadata."""
        return self.model_dump(mode="json", exclude_none=True)

    def with_(self, **changes: Any) -> "ModelCard":
        """A copy with some fields replaced, validated again (cards are immutable)."""
        return type(self).model_validate({**self.model_dump(mode="python", exclude_none=True), **changes})

    # ----------------------------------------------------------------- what it is
    @property
    def image_size(self) -> int:
        if self.input is None:
            raise LeukoError(f"a {self.kind} model has no classifier input size")
        return int(self.input.image_size)

    @property
    def is_ensemble(self) -> bool:
        return self.model.is_ensemble

    def describe(self) -> str:
        """One line: kind, architecture, classes, input, temperature."""
        size = f", {self.input.image_size}px {self.input.resize}" if self.input else ""
        return f"{self.kind}: {self.model.display_name}, {len(self.classes)} classes{size}, T={self.temperature:.3f}"


__all__ = ["CARD_FORMAT", "HOME_FILE", "ROUTE_FILE", "InputSpec", "ModelCard", "ModelKind", "NetworkSpec"]
