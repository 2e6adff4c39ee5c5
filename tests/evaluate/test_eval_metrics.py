"""Metrics: hand-computed numbers, agreement with sklearn, bootstrap CIs, reports and tables."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from leuko.errors import LeukoError
from leuko.evaluate import (
    classification_report_text,
    compute_metrics,
    format_mean_std,
    predictions_frame,
    softmax,
    summarise_folds,
)
from leuko.evaluate.metrics import binary_auc, bootstrap_ci

NAMES = ["a", "b", "c"]
# true:  a a a a b b b c c c ; pred: a a a b b b c c c a
Y_HAND = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PRED_HAND = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])


def one_hotish(pred: np.ndarray, n_classes: int, top: float = 0.8) -> np.ndarray:
    """Probabilities with ``top`` on the predicted class and the rest shared equally."""
    p = np.full((pred.size, n_classes), (1 - top) / (n_classes - 1))
    p[np.arange(pred.size), pred] = top
    return p


def synthetic(n: int = 600, n_classes: int = 5, seed: int = 0, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(logits): probabilities calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, n_classes)) * scale
    logits[np.arange(n), rng.integers(0, n_classes, n)] += 1.5
    p = softmax(logits)
    y = (p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return np.minimum(y, n_classes - 1), p


def test_hand_made_three_class_case() -> None:
    m = compute_metrics(Y_HAND, one_hotish(PRED_HAND, 3), NAMES, n_bootstrap=200)
    assert m["n"] == 10
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]  # rows = true
    assert sum(map(sum, m["confusion_matrix"])) == 10
    assert [sum(r) for r in m["confusion_matrix"]] == [4, 3, 3]  # row sums = support
    assert m["accuracy"] == pytest.approx(0.7)
    pc = m["per_class"]
    assert pc["a"] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    assert pc["b"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert pc["c"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["macro_f1"] == pytest.approx((0.75 + 4 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 4 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx(0.7)
    assert m["macro_avg"]["precision"] == pytest.approx((0.75 + 4 / 3) / 3)
    # every confidence is 0.8, accuracy 0.7 -> one bin, gap 0.1
    assert m["ece"] == pytest.approx(0.1)
    assert m["nll"] == pytest.approx((7 * -math.log(0.8) + 3 * -math.log(0.1)) / 10)
    assert m["brier"] == pytest.approx((7 * 0.06 + 3 * 1.46) / 10)
    assert m["notes"] == []
    json.dumps(m, allow_nan=False)  # JSON-ready as it is


def test_zero_support_class_is_zero_noted_and_can_be_left_out() -> None:
    names = [*NAMES, "d (absent)"]
    probs = np.hstack([one_hotish(PRED_HAND, 3) * 0.9, np.full((10, 1), 0.1)])
    m = compute_metrics(Y_HAND, probs, names, n_bootstrap=50)
    d = m["per_class"]["d (absent)"]
    assert d == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((0.75 + 4 / 3) / 4)  # sklearn, labels=range(C), zero_division=0
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 4 / 3) / 3)  # only classes present in y_true
    assert any("d (absent)" in n and "zero_division=0" in n for n in m["notes"])
    assert m["roc_auc_ovr"]["per_class"]["d (absent)"] is None
    assert m["roc_auc_ovr"]["macro"] is not None
    json.dumps(m, allow_nan=False)

    kept = compute_metrics(Y_HAND, probs, names, n_bootstrap=50, labels_present=["a", "b", "c"])
    assert kept["macro_f1"] == pytest.approx((0.75 + 4 / 3) / 3)
    assert kept["per_class"]["d (absent)"]["support"] == 0  # still reported


def test_never_predicted_class_is_noted() -> None:
    y = np.array([0, 1, 2, 2])
    m = compute_metrics(y, one_hotish(np.array([0, 1, 1, 1]), 3), NAMES, n_bootstrap=0)
    assert m["per_class"]["c"]["precision"] == 0.0
    assert any("'c' was never predicted" in n for n in m["notes"])
    assert m["ci95"] is None


def test_a_class_of_two_images_is_named_with_its_weight_in_macro_f1() -> None:
    """BCCD's case: 2 basophils among hundreds; one more right moves macro-F1 by what the note says."""
    y = np.array([0] * 20 + [1] * 15 + [2] * 2)
    pred = y.copy()
    pred[:3] = 1  # three a called b
    pred[20] = 2  # one b called c (a false positive of the small class)
    pred[35:] = 0  # neither c right
    m = compute_metrics(y, one_hotish(pred, 3), NAMES, n_bootstrap=0)
    small = m["small_classes"]
    assert small["classes"] == {"c": 2} and small["common_classes"] == ["a", "b"]
    assert small["macro_f1_common"] == pytest.approx(skm.f1_score(y, pred, labels=[0, 1], average="macro"))
    better = pred.copy()
    better[35] = 2  # one more c right
    own = skm.f1_score(y, better, labels=[2], average="macro") - skm.f1_score(y, pred, labels=[2], average="macro")
    assert small["one_more_right"]["c"] == pytest.approx(own / 3) and own / 3 > 0.1
    gain = skm.f1_score(y, better, average="macro") - skm.f1_score(y, pred, average="macro")
    assert gain >= own / 3  # the image it takes from another class's errors only adds
    assert any(n.startswith("few images: 'c' (2 images); each counts 1/3 of macro-F1") for n in m["notes"])
    assert "small_classes" not in compute_metrics(Y_HAND, one_hotish(PRED_HAND, 3), NAMES, n_bootstrap=0)
    json.dumps(m, allow_nan=False)  # metrics.json stays strict JSON


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_sklearn(seed: int) -> None:
    y, p = synthetic(seed=seed)
    names = [f"class {i}" for i in range(p.shape[1])]
    m = compute_metrics(y, p, names, n_bootstrap=0)
    pred = p.argmax(axis=1)
    labels = list(range(p.shape[1]))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0))
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, name in enumerate(names):
        assert m["per_class"][name] == pytest.approx({"precision": pr[i], "recall": rc[i], "f1": f1[i], "support": sup[i]})
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert m["roc_auc_ovr"]["macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for i, name in enumerate(names):
        assert m["roc_auc_ovr"]["per_class"][name] == pytest.approx(skm.roc_auc_score(y == i, p[:, i]))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p, labels=labels))


def test_agrees_with_sklearn_when_a_class_is_missing() -> None:
    y, p = synthetic(seed=3)
    keep = y != 2
    y, p = y[keep], p[keep]
    labels = list(range(p.shape[1]))
    pred = p.argmax(axis=1)
    m = compute_metrics(y, p, [str(i) for i in labels], n_bootstrap=0)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))


def test_binary_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        pos = rng.random(40) < 0.3
        pos[:2] = [True, False]
        score = np.round(rng.random(40), 1)  # many ties
        assert binary_auc(pos, score) == pytest.approx(skm.roc_auc_score(pos, score), abs=1e-12)


def test_bootstrap_ci_contains_estimate_narrows_and_is_reproducible() -> None:
    y_small, p_small = synthetic(n=200, seed=1)
    y_big, p_big = synthetic(n=4000, seed=1)
    small = compute_metrics(y_small, p_small, list("abcde"), n_bootstrap=500, seed=0)
    big = compute_metrics(y_big, p_big, list("abcde"), n_bootstrap=500, seed=0)
    for m in (small, big):
        for key in ("accuracy", "macro_f1"):
            lo, hi = m["ci95"][key]
            assert lo <= m[key] <= hi
    width = lambda m, k: m["ci95"][k][1] - m["ci95"][k][0]  # noqa: E731
    assert width(big, "accuracy") < width(small, "accuracy") / 2
    assert width(big, "macro_f1") < width(small, "macro_f1") / 2
    again = compute_metrics(y_small, p_small, list("abcde"), n_bootstrap=500, seed=0)
    assert again["ci95"] == small["ci95"]


def test_bootstrap_macro_f1_matches_sklearn_on_a_resample() -> None:
    """The vectorised per-resample F1 equals sklearn's on the same indices."""
    y, p = synthetic(n=300, seed=2)
    pred = p.argmax(axis=1)
    labels = np.arange(p.shape[1])
    # one resample, reproduced from the same generator draw
    idx = np.random.default_rng(9).integers(0, y.size, size=(1, y.size))[0]
    ci = bootstrap_ci(y, pred, p.shape[1], labels=labels, n_bootstrap=1, seed=9)
    expected = skm.f1_score(y[idx], pred[idx], labels=labels, average="macro", zero_division=0)
    assert ci["macro_f1"][0] == pytest.approx(expected)
    assert ci["accuracy"][0] == pytest.approx(np.mean(y[idx] == pred[idx]))


def test_bootstrap_is_fast() -> None:
    y, p = synthetic(n=2000, n_classes=8, seed=4)
    t0 = time.perf_counter()
    compute_metrics(y, p, [str(i) for i in range(8)], n_bootstrap=1000)
    assert time.perf_counter() - t0 < 2.0


def test_report_text_matches_sklearn() -> None:
    y, p = synthetic(seed=6)
    names = ["basophil", "eosinophil", "immature granulocyte", "lymphocyte", "monocyte"]
    m = compute_metrics(y, p, names, n_bootstrap=0)
    text = classification_report_text(m, names)
    expected = skm.classification_report(y, p.argmax(axis=1), target_names=names, digits=4, zero_division=0)
    assert text == expected
    assert any(line.strip().startswith("macro avg") for line in text.splitlines())
    assert classification_report_text(m) == text  # class names default to metrics["classes"]


def test_predictions_frame() -> None:
    y, p = synthetic(n=50, seed=7)
    p32 = p.astype(np.float32)
    names = list("abcde")
    df = predictions_frame([f"img_{i}.png" for i in range(50)], y, p32, names)
    assert list(df.columns) == ["path", "true", "pred", "confidence", *[f"p_{c}" for c in names]]
    probs = df[[f"p_{c}" for c in names]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert list(df["true"]) == [names[i] for i in y]
    assert list(df["pred"]) == [names[i] for i in p.argmax(axis=1)]
    assert np.allclose(df["confidence"], probs.max(axis=1))
    unlabelled = predictions_frame(None, None, p, names)
    assert unlabelled["true"].isna().all() and len(unlabelled) == 50
    with pytest.raises(LeukoError, match="paths has 3"):
        predictions_frame(["x"] * 3, y, p, names)


def test_summarise_folds_matches_numpy() -> None:
    folds = [compute_metrics(*synthetic(n=150, seed=s), list("abcde"), n_bootstrap=0) for s in range(5)]
    s = summarise_folds(folds)
    assert s["n_folds"] == 5
    for key, get in {
        "accuracy": lambda m: m["accuracy"],
        "balanced_accuracy": lambda m: m["balanced_accuracy"],
        "macro_f1": lambda m: m["macro_f1"],
        "weighted_f1": lambda m: m["weighted_f1"],
        "macro_precision": lambda m: m["macro_avg"]["precision"],
        "macro_recall": lambda m: m["macro_avg"]["recall"],
    }.items():
        vals = np.array([get(m) for m in folds])
        assert s[key]["mean"] == pytest.approx(vals.mean())
        assert s[key]["std"] == pytest.approx(vals.std(ddof=1))
    assert summarise_folds(folds[:1])["accuracy"]["std"] is None
    json.dumps(s, allow_nan=False)
    with pytest.raises(LeukoError):
        summarise_folds([])
    with pytest.raises(LeukoError, match="fold 0"):
        summarise_folds([{"accuracy": 1.0}])


def test_format_mean_std() -> None:
    assert format_mean_std(0.95123, 0.00812) == "0.9512 ± 0.0081"
    assert format_mean_std({"mean": 0.95123, "std": 0.00812}, digits=2, percent=True) == "95.12 ± 0.81 %"
    assert format_mean_std(0.5, None) == "0.5000"


@pytest.mark.parametrize(
    ("y", "probs", "names", "match"),
    [
        ([0, 1], [[2.0, -1.0], [0.1, 0.3]], ["a", "b"], "probabilities"),  # logits
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a"], "class_names has 1"),
        ([0, 3], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "class index 3"),
        ([0], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "2 rows"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "integer"),
    ],
)
def test_bad_inputs_raise_leuko_error(y: list, probs: list, names: list, match: str) -> None:
    with pytest.raises(LeukoError, match=match):
        compute_metrics(y, np.asarray(probs), names)


def test_unknown_labels_present() -> None:
    with pytest.raises(LeukoError, match="unknown class 'z'"):
        compute_metrics(Y_HAND, one_hotish(PRED_HAND, 3), NAMES, labels_present=["z"])
