"""The bundled ImageNet weights are real: frozen features separate PBC classes; random ones do not."""

from __future__ import annotations

from pathlib import Path

import pytest

from leuko.evaluate.run import evaluate_run
from leuko.train import train


@pytest.mark.shared
def test_frozen_bundled_backbone_beats_random_on_pbc(shared_datasets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))
    common = [
        "model.name=efficientnet_lite0",
        "model.freeze=backbone",
        "data.per_class=150",
        "data.split=holdout-66.67-33.33",  # 800 training images, 400 others
        "data.val_fraction=0.1",
        "data.image_size=128",
        "data.preprocess=[center-crop:0.6]",  # the cell fills the frame, as in ImageNet photos
        "train.epochs=60",
        "train.lr=0.003",
        "train.batch_size=64",
        "trainer.progress=false",
    ]
    scores = {}
    for weights in ("bundled", "none"):
        out = tmp_path / weights
        result = train(None, out, overrides=[*common, f"model.pretrained={weights}"], data_path=shared_datasets / "pbc", echo=lambda s: None)
        assert result.path == "features"
        m = evaluate_run(out, figures=False, echo=lambda s: None)
        assert m["n"] == 400
        scores[weights] = m["accuracy"]
    assert scores["bundled"] >= 0.80, scores
    assert scores["none"] < 0.6 and scores["bundled"] - scores["none"] >= 0.25, scores
