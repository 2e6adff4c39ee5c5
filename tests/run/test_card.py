"""The model card: typed, strict where it matters, and able to read every model.pt leuko has written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leuko.errors import LeukoError
from leuko.run.card import ModelCard, ModelKind, NetworkSpec

INPUT = {"image_size": 32, "resize": "pad", "preprocess": ["clahe"], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
REVIEW = {"threshold": 0.62, "energy_threshold": -1.5, "target_accuracy": 0.99, "chosen_on": "the validation split"}


def _old_payload(model, classes: list[str], spec: dict) -> dict:
    """A ``model.pt`` payload exactly as leuko wrote it before cards had a kind (commit 9e9c23b:
    ``runs.save_model`` stored ``{"format": 1, **meta, "state_dict": ...}`` with these keys)."""
    return {
        "format": 1,
        "model": spec,
        "classes": classes,
        "input": dict(INPUT),
        "temperature": 1.37,
        "review": dict(REVIEW),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def test_a_model_file_written_before_cards_loads_and_predicts(tmp_path: Path) -> None:
    import torch

    from leuko.infer import load_predictor
    from leuko.models import build_model
    from leuko.run.folder import kind_of, load_model, read_card

    classes = ["eosinophil", "lymphocyte", "neutrophil"]
    torch.manual_seed(0)
    net = build_model("custom_cnn", len(classes), pretrained="none").eval()
    spec = {"name": "custom_cnn", "head": "linear", "dropout": None, "pretrained": "none"}
    run = tmp_path / "old"
    run.mkdir()
    torch.save(_old_payload(net, classes, spec), run / "model.pt")
    card = read_card(run)
    assert card.kind is ModelKind.NETWORK and kind_of(run) is ModelKind.NETWORK
    assert card.classes == classes and card.temperature == 1.37 and card.input.resize == "pad"
    assert card.review == REVIEW and card.model.name == "custom_cnn"
    model, _ = load_model(run)
    for a, b in zip(model.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    pred = load_predictor(run).predict_arrays([np.full((40, 40, 3), 128, np.uint8)])
    assert pred.probs.shape == (1, 3) and np.isclose(pred.probs.sum(), 1.0)
    # an old ensemble: known by its members
    old_ens = {"name": "ensemble", "members": [spec, spec], "head": "linear", "pretrained": "none"}
    assert ModelCard.from_meta({k: v for k, v in _old_payload(net, classes, old_ens).items()}).kind is ModelKind.ENSEMBLE


def test_unknown_keys_survive_a_round_trip_and_cards_are_immutable() -> None:
    card = ModelCard.from_meta({"model": {"name": "x", "future_field": 3}, "classes": ["a", "b"], "input": INPUT,
                                "written_by": "leuko 9"})
    meta = card.to_meta()
    assert meta["written_by"] == "leuko 9" and meta["model"]["future_field"] == 3 and meta["kind"] == "network"
    assert ModelCard.from_meta(meta) == card
    changed = card.with_(temperature=2.0, finetuned={"cells": 25})
    assert (changed.temperature, changed.finetuned, card.temperature) == (2.0, {"cells": 25}, 1.0)
    with pytest.raises(Exception):
        card.temperature = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(("meta", "where"), [
    ({"model": {"name": "x"}, "input": INPUT}, "needs its classes"),
    ({"model": {"name": "x"}, "classes": ["a"]}, "needs its input"),
    ({"model": {"name": "x"}, "classes": ["a"], "input": INPUT, "temperature": 0}, "temperature"),
    ({"model": {"name": "x"}, "classes": ["a"], "input": {**INPUT, "image_size": -1}}, "input.image_size"),
    ({"classes": ["a"], "input": INPUT}, "model"),
    ({"model": {"name": "x"}, "classes": ["a"], "input": INPUT, "kind": "hologram"}, "kind"),
])
def test_a_bad_card_is_one_line_naming_the_field(meta: dict, where: str) -> None:
    with pytest.raises(LeukoError, match=where) as err:
        ModelCard.from_meta(meta, source="m.pt")
    assert str(err.value).startswith("m.pt: the model card is invalid") and "\n" not in str(err.value)


def test_a_detector_needs_no_classifier_input() -> None:
    card = ModelCard(kind=ModelKind.DETECTOR, model=NetworkSpec(name="wbc-finder"))
    assert card.kind == "detector" and card.input is None
    with pytest.raises(LeukoError, match="no classifier input size"):
        _ = card.image_size
