"""Classification metrics on arrays: one JSON-ready dict per evaluation.

:func:`compute_metrics` turns ``(y_true, probs)`` into everything a report
needs (accuracy, balanced accuracy, per-class precision/recall/F1, confusion
matrix, one-vs-rest AUC, calibration, bootstrap confidence intervals) so that
the CLI, the HTML report and a notebook all read the same numbers. Precision,
recall and F1 follow scikit-learn's definitions with ``zero_division=0``; the
tests check agreement with :mod:`sklearn.metrics`.

Nothing here imports training or CLI code: inputs are numpy arrays, outputs
are plain Python types (``float``, ``int``, ``list``, ``dict``, ``None``) that
``json.dumps`` accepts as they are (no NaN: undefined values are ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from leuko.errors import LeukoError
from leuko.run.calibration import DEFAULT_BINS, _check_probs, check_probs_targets, ece

if TYPE_CHECKING:
    import pandas

#: Resamples are drawn in chunks of at most this many indices to bound memory
#: (1000 resamples of 20,000 images would otherwise hold 160 MB of indices).
_BOOTSTRAP_CHUNK = 4_000_000

SMALL_CLASS = 10
"""A class with fewer evaluated images than this has an F1 that one image swings; macro-F1 weighs it like the
largest class. :func:`compute_metrics` says by how much, and gives macro-F1 over the other classes beside it."""

#: Metrics averaged by :func:`summarise_folds`, with where each lives in a metrics dict.
FOLD_METRICS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "balanced_accuracy": ("balanced_accuracy",),
    "macro_f1": ("macro_f1",),
    "weighted_f1": ("weighted_f1",),
    "macro_precision": ("macro_avg", "precision"),
    "macro_recall": ("macro_avg", "recall"),
}


# --------------------------------------------------------------------------- small helpers


def _num(x: float) -> float | None:
    """A JSON-safe float: ``None`` for NaN/inf, which JSON cannot hold."""
    x = float(x)
    return x if math.isfinite(x) else None


def _check_class_names(class_names: Sequence[str], n_classes: int) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != n_classes:
        raise LeukoError(f"class_names has {len(names)} names but probs has {n_classes} columns")
    if len(set(names)) != len(names):
        raise LeukoError(f"class_names must be unique, got {names}")
    return names


def _resolve_labels(labels_present: Sequence[int | str] | None, class_names: list[str]) -> np.ndarray:
    """Indices of the classes that macro/weighted averages run over (all by default)."""
    if labels_present is None:
        return np.arange(len(class_names))
    out: list[int] = []
    for lab in labels_present:
        if isinstance(lab, str):
            if lab not in class_names:
                raise LeukoError(f"labels_present names unknown class {lab!r}; classes are {class_names}")
            out.append(class_names.index(lab))
        else:
            i = int(lab)
            if not 0 <= i < len(class_names):
                raise LeukoError(f"labels_present holds index {i}, outside 0..{len(class_names) - 1}")
            out.append(i)
    if not out:
        raise LeukoError("labels_present must name at least one class")
    return np.unique(np.asarray(out, dtype=np.int64))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class (sklearn's orientation)."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _prf(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 per class (last axis) with 0 where a ratio is undefined.

    Works on one row of counts or a ``(B, C)`` stack from the bootstrap. F1 is
    ``2 tp / (n_pred + n_true)``, which is sklearn's formula and equals the
    harmonic mean of P and R whenever both are defined.
    """
    tp = tp.astype(np.float64)
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    recall = np.divide(tp, n_true, out=np.zeros_like(tp), where=n_true > 0)
    denom = n_pred + n_true
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    *,
    labels: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]] | None:
    """Percentile bootstrap intervals of accuracy and macro-F1, resampling images.

    All resamples are drawn at once and scored with ``bincount`` over
    ``resample * C + class`` keys, so 1000 resamples of 2,000 images take tens
    of milliseconds instead of the seconds a loop over sklearn calls needs.
    Images are treated as independent; when several come from one patient the
    interval is optimistic (resample groups instead to be strict). Returns
    ``None`` when ``n_bootstrap`` is 0.
    """
    if n_bootstrap <= 0:
        return None
    if not 0 < level < 1:
        raise LeukoError(f"level must be in (0, 1), got {level}")
    n = y_true.size
    labels = np.arange(n_classes) if labels is None else labels
    correct = y_true == y_pred
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK // max(n, 1))
    accs: list[np.ndarray] = []
    f1s: list[np.ndarray] = []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        ok = correct[idx]
        accs.append(ok.mean(axis=1))
        offset = (np.arange(b, dtype=np.int64) * n_classes)[:, None]
        kt = (y_true[idx] + offset).ravel()
        kp = (y_pred[idx] + offset).ravel()
        size = b * n_classes
        n_true = np.bincount(kt, minlength=size).reshape(b, n_classes)
        n_pred = np.bincount(kp, minlength=size).reshape(b, n_classes)
        tp = np.bincount(kt[ok.ravel()], minlength=size).reshape(b, n_classes)
        _, _, f1 = _prf(tp, n_pred, n_true)
        f1s.append(f1[:, labels].mean(axis=1))
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    acc_ci = np.percentile(np.concatenate(accs), q)
    f1_ci = np.percentile(np.concatenate(f1s), q)
    return {"accuracy": [float(acc_ci[0]), float(acc_ci[1])], "macro_f1": [float(f1_ci[0]), float(f1_ci[1])]}


# --------------------------------------------------------------------------- AUC


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counted as half.

    Equal to :func:`sklearn.metrics.roc_auc_score` but a plain numpy sort, so
    computing metrics does not pay sklearn's multi-second import. Needs at
    least one positive and one negative.
    """
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise LeukoError("AUC needs at least one positive and one negative sample")
    order = np.argsort(score, kind="mergesort")
    _, inverse, counts = np.unique(score[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = (ends - counts + 1 + ends) / 2.0  # 1-based mean rank of each run of ties
    rank_sum = avg_rank[inverse][positive[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _roc_auc_ovr(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], labels: np.ndarray, notes: list[str]
) -> dict[str, Any]:
    """One-vs-rest AUC per class, and their mean over ``labels`` where defined.

    AUC needs positives and negatives: it is ``None`` for a class absent from
    ``y_true`` (or the only class present) and such classes are left out of the
    macro mean, with a note.
    """
    n = y_true.size
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(class_names):
        pos = int(np.sum(y_true == c))
        if pos == 0 or pos == n:
            per_class[name] = None
            why = "has no images in y_true" if pos == 0 else "is the only class in y_true"
            notes.append(f"ROC AUC for class {name!r} is undefined ({why}) and left out of the macro AUC")
        else:
            per_class[name] = _num(binary_auc(y_true == c, probs[:, c]))
    defined = [per_class[class_names[c]] for c in labels if per_class[class_names[c]] is not None]
    macro = float(np.mean(defined)) if defined else None
    return {"macro": macro, "per_class": per_class}


# --------------------------------------------------------------------------- main entry point


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    labels_present: Sequence[int | str] | None = None,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Every metric of one evaluation as a JSON-ready dict.

    Parameters
    ----------
    y_true:
        True class index per image, ``0 <= y < len(class_names)``.
    probs:
        ``(n, C)`` class probabilities (rows sum to 1); the prediction is the
        argmax, the confidence its probability.
    class_names:
        Names of the ``C`` columns, in order; keys of ``per_class`` and the
        order of the confusion matrix.
    n_bootstrap, seed:
        Percentile-bootstrap resamples for ``ci95`` (0 turns it off) and the
        seed that makes the intervals reproducible.
    labels_present:
        Class indices or names that macro/weighted averages (and macro AUC)
        run over. ``None`` means all classes, as sklearn does with
        ``labels=range(C)``: a class with no test images then counts as F1 = 0
        (``zero_division=0``). Pass the classes the test set really has to
        leave such classes out instead. Per-class numbers are always reported
        for every class.
    n_bins:
        Bins of the expected calibration error.

    Returns
    -------
    dict with ``n``, ``classes``, ``accuracy``, ``balanced_accuracy``,
    ``macro_f1``, ``weighted_f1``, ``per_class``, ``macro_avg``,
    ``weighted_avg``, ``confusion_matrix``, ``roc_auc_ovr``, ``ece``, ``nll``,
    ``brier``, ``ci95``, ``n_bootstrap``, ``notes``.
    """
    p, y = check_probs_targets(probs, y_true)
    names = _check_class_names(class_names, p.shape[1])
    labels = _resolve_labels(labels_present, names)
    n, n_classes = p.shape
    pred = p.argmax(axis=1)
    notes: list[str] = []

    cm = confusion_matrix(y, pred, n_classes)
    support = cm.sum(axis=1)
    n_pred = cm.sum(axis=0)
    tp = np.diag(cm)
    precision, recall, f1 = _prf(tp, n_pred, support)

    for c, name in enumerate(names):
        if support[c] == 0:
            counted = " and counts as 0 in the macro averages (pass labels_present to leave it out)" if c in labels else ""
            notes.append(f"class {name!r} has no images in y_true: its recall and F1 are 0 (zero_division=0){counted}")
        elif n_pred[c] == 0:
            notes.append(f"class {name!r} was never predicted: its precision is 0 (zero_division=0)")
    if labels_present is not None:
        notes.append("macro/weighted averages use only the classes " + ", ".join(repr(names[c]) for c in labels))
    small_classes = _small_classes(tp, n_pred, support, labels, names, notes)

    sup_l = support[labels]
    total_l = int(sup_l.sum())
    weights = sup_l / total_l if total_l > 0 else np.zeros(labels.size)

    def avg(values: np.ndarray, how: str) -> float:
        v = values[labels]
        return float(v.mean() if how == "macro" else np.sum(v * weights))

    macro = {"precision": avg(precision, "macro"), "recall": avg(recall, "macro"), "f1": avg(f1, "macro"), "support": total_l}
    weighted = {
        "precision": avg(precision, "weighted"),
        "recall": avg(recall, "weighted"),
        "f1": avg(f1, "weighted"),
        "support": total_l,
    }
    present = support > 0
    # sklearn's balanced accuracy: mean recall over classes that occur in y_true.
    balanced = float(recall[present].mean())

    confidence_nll = -np.log(np.clip(p[np.arange(n), y], 1e-12, 1.0))
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0

    return {
        "n": int(n),
        "classes": names,
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": balanced,
        "macro_f1": macro["f1"],
        "weighted_f1": weighted["f1"],
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(names)
        },
        "macro_avg": macro,
        "weighted_avg": weighted,
        "confusion_matrix": cm.astype(int).tolist(),
        "roc_auc_ovr": _roc_auc_ovr(y, p, names, labels, notes),
        "ece": ece(p, y, n_bins),
        "nll": float(confidence_nll.mean()),
        # Multi-class Brier score (Brier, 1950): squared error summed over classes, in [0, 2].
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "ci95": bootstrap_ci(y, pred, n_classes, labels=labels, n_bootstrap=n_bootstrap, seed=seed),
        "n_bootstrap": int(max(n_bootstrap, 0)),
        "notes": notes,
        **({"small_classes": small_classes} if small_classes else {}),
    }


def _small_classes(tp: np.ndarray, n_pred: np.ndarray, support: np.ndarray, labels: np.ndarray, names: list[str],
                   notes: list[str]) -> dict[str, Any] | None:
    """Classes of the macro average with 1 to ``SMALL_CLASS - 1`` images beside larger ones: how far one image
    moves macro-F1, and macro-F1 over the classes with ``SMALL_CLASS`` images or more (``None``: no such split).

    Why: BCCD has 2 basophils among 356 white cells; macro-F1 counts their F1 as a fifth of the score, so one
    basophil right or wrong moves it by ~0.13, more than any change of method moves the other four classes.
    """
    small = [int(c) for c in labels if 0 < support[c] < SMALL_CLASS]
    common = [int(c) for c in labels if support[c] >= SMALL_CLASS]
    if not small or not common:  # every class small: the whole evaluation is, and its CI says so
        return None
    k = len(labels)

    def f1(t: float, npred: float, sup: float) -> float:
        return 0.0 if t <= 0 else 2.0 * t / (npred + sup)

    # One more of the class's images right: tp and predictions of the class each grow by one.
    swing = {names[c]: float(f1(tp[c] + 1, n_pred[c] + 1, support[c]) - f1(tp[c], n_pred[c], support[c])) / k
             for c in small if tp[c] < support[c]}
    macro_common = float(np.mean([f1(tp[c], n_pred[c], support[c]) for c in common]))
    listed = ", ".join(f"{names[c]!r} ({int(support[c])} image{'s' if support[c] > 1 else ''})" for c in small)
    text = f"few images: {listed}; each counts 1/{k} of macro-F1"
    if swing:
        text += ("; one more of them right would add " + ", ".join(f"{v:.3f} ({n})" for n, v in swing.items())
                 + " to macro-F1 through its own F1")
    text += f"; macro-F1 over the {len(common)} classes with >= {SMALL_CLASS} images: {macro_common:.4f}"
    notes.append(text)
    return {"classes": {names[c]: int(support[c]) for c in small}, "min_support": SMALL_CLASS,
            "one_more_right": swing, "macro_f1_common": macro_common, "common_classes": [names[c] for c in common]}


# --------------------------------------------------------------------------- text report


def classification_report_text(metrics: Mapping[str, Any], class_names: Sequence[str] | None = None, *, digits: int = 4) -> str:
    """The table of :func:`sklearn.metrics.classification_report`, from a metrics dict.

    Same layout and rounding (4 decimals by default, as the published studies
    printed), so numbers can be compared with papers line by line without
    recomputing predictions. ``class_names`` defaults to ``metrics["classes"]``
    and may also select/reorder rows.
    """
    names = list(class_names) if class_names is not None else list(metrics.get("classes") or metrics["per_class"])
    per_class = metrics["per_class"]
    missing = [c for c in names if c not in per_class]
    if missing:
        raise LeukoError(f"metrics has no per-class entry for {missing}")
    headers = ["precision", "recall", "f1-score", "support"]
    width = max(max(len(c) for c in names), len("weighted avg"), digits)
    head_fmt = "{:>{width}s} " + " {:>9}" * len(headers)
    row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    report = head_fmt.format("", *headers, width=width) + "\n\n"
    for c in names:
        r = per_class[c]
        report += row_fmt.format(c, r["precision"], r["recall"], r["f1"], r["support"], width=width, digits=digits)
    report += "\n"
    n = int(metrics["n"])
    acc_fmt = "{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f}" + " {:>9}\n"
    report += acc_fmt.format("accuracy", "", "", metrics["accuracy"], n, width=width, digits=digits)
    for key, heading in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        a = metrics[key]
        support = a.get("support", n)
        report += row_fmt.format(heading, a["precision"], a["recall"], a["f1"], support, width=width, digits=digits)
    return report


# --------------------------------------------------------------------------- predictions table


def predictions_frame(
    paths: Sequence[str] | None,
    y_true: Sequence[int] | np.ndarray | None,
    probs: np.ndarray,
    class_names: Sequence[str],
) -> pandas.DataFrame:
    """One row per image: ``path``, ``true``, ``pred``, ``confidence``, ``p_<class>``...

    The table people open first to find mistakes (sort by confidence, filter
    true != pred) and the input of the misclassified gallery. Probabilities are
    renormalised in float64 so each row sums to 1 up to rounding even when they
    came from a float32 softmax. ``paths`` or ``y_true`` may be ``None`` (the
    column is then empty) for unlabelled predictions.
    """
    import pandas as pd

    if y_true is None:
        p, y = _check_probs(probs), None
    else:
        p, y = check_probs_targets(probs, y_true)
    p = p / p.sum(axis=1, keepdims=True)
    names = _check_class_names(class_names, p.shape[1])
    n = p.shape[0]
    if paths is not None and len(paths) != n:
        raise LeukoError(f"paths has {len(paths)} entries but probs has {n} rows")
    pred = p.argmax(axis=1)
    name_arr = np.asarray(names, dtype=object)
    data: dict[str, Any] = {
        "path": [str(x) for x in paths] if paths is not None else [None] * n,
        "true": name_arr[y] if y is not None else [None] * n,
        "pred": name_arr[pred],
        "confidence": p[np.arange(n), pred],
    }
    for c, name in enumerate(names):
        data[f"p_{name}"] = p[:, c]
    return pd.DataFrame(data)


# --------------------------------------------------------------------------- cross-validation summary


def summarise_folds(fold_metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) of the headline metrics across folds.

    The form in which K-fold results are reported (``0.9512 ± 0.0081``). Each
    entry also keeps the per-fold ``values``; ``std`` is ``None`` with a single
    fold, where it is undefined.
    """
    if not fold_metrics:
        raise LeukoError("summarise_folds needs at least one fold's metrics")
    out: dict[str, Any] = {"n_folds": len(fold_metrics)}
    for key, where in FOLD_METRICS.items():
        values: list[float] = []
        for i, m in enumerate(fold_metrics):
            v: Any = m
            for part in where:
                if not isinstance(v, Mapping) or part not in v:
                    raise LeukoError(f"fold {i} metrics have no {'.'.join(where)!r} (expected compute_metrics output)")
                v = v[part]
            values.append(float(v))
        arr = np.asarray(values)
        std = float(arr.std(ddof=1)) if arr.size > 1 else None
        out[key] = {"mean": float(arr.mean()), "std": std, "values": values}
    return out


def format_mean_std(
    mean: float | Mapping[str, Any], std: float | None = None, *, digits: int = 4, percent: bool = False
) -> str:
    """``"0.9512 ± 0.0081"`` (or ``"95.12 ± 0.81 %"``); accepts a :func:`summarise_folds` entry too."""
    if isinstance(mean, Mapping):
        mean, std = mean["mean"], mean.get("std")
    scale, unit = (100.0, " %") if percent else (1.0, "")
    text = f"{float(mean) * scale:.{digits}f}"
    if std is not None and math.isfinite(float(std)):
        text += f" ± {float(std) * scale:.{digits}f}"
    return text + unit


__all__ = [
    "FOLD_METRICS",
    "binary_auc",
    "bootstrap_ci",
    "classification_report_text",
    "compute_metrics",
    "confusion_matrix",
    "format_mean_std",
    "predictions_frame",
    "summarise_folds",
]
