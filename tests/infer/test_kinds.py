"""One contract over every registered model kind: the card's kind picks the predictor and the explainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leuko.errors import LeukoError
from leuko.explain import EXPLAINERS, explainer_for
from leuko.infer import load_predictor
from leuko.infer.load import PREDICTORS, predictor_class
from leuko.run.card import ModelKind
from leuko.run.folder import kind_of

RUN_OF_KIND = {ModelKind.NETWORK: "tiny_run", ModelKind.ENSEMBLE: "ensemble", ModelKind.ROUTED: "routed"}


def test_every_kind_with_a_predictor_has_an_explainer_and_a_test_run() -> None:
    assert set(PREDICTORS) == set(EXPLAINERS) == set(RUN_OF_KIND)
    with pytest.raises(LeukoError, match="no predictor for a detector"):
        predictor_class(ModelKind.DETECTOR)


@pytest.mark.parametrize("kind", list(RUN_OF_KIND), ids=str)
def test_each_kind_loads_predicts_reviews_and_explains(kind: ModelKind, request: pytest.FixtureRequest,
                                                      new_images: Path) -> None:
    run = request.getfixturevalue(RUN_OF_KIND[kind])
    assert kind_of(run) is kind
    p = load_predictor(run)
    assert p.kind is kind and p.card.kind is kind and type(p).__name__ == PREDICTORS[kind].split(":")[1]
    paths = sorted(new_images.rglob("*.png"))[:4]
    pred = p.predict_paths(paths)
    assert pred.probs.shape == (4, len(p.classes)) and np.allclose(pred.probs.sum(1), 1.0)
    low, unlike = p.review_checks(pred)
    assert low.shape == unlike.shape == (4,) and len(p.review_reasons(pred)) == 4
    assert p.describe() and p.describe_review()
    explainer = explainer_for(p)
    assert type(explainer) is EXPLAINERS[kind]
    ex = explainer.explain_path(paths[0])
    assert ex.cam.ndim == 2 and np.isfinite(ex.cam).all() and 0.0 <= ex.cam.min() <= ex.cam.max() <= 1.0
