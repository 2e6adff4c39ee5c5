"""Scores of a left-out lab, and the paired difference between two models on the same lab's cells.

One home for how a leave-one-lab-out row is scored (accuracy, macro-F1 over
the classes with >= ``SMALL_CLASS`` cells, balanced accuracy, each with a
percentile-bootstrap 95% interval over the test cells), so the table of one
recipe and the comparison of two read the same numbers.

Why a paired comparison: two recipes tested on every cell of the same lab
are scored on the *same* cells, so the variation that comes from which cells
the lab happened to send is shared by both. Two separate 95% intervals
overlap long before a difference is noise (PBC left out, 3,635 cells: each
interval is about +-1.4 points wide); the interval of the *difference*,
resampling the same cells for both models, is what says whether one recipe
is ahead. The discordant counts (cells one model gets right and the other
wrong) are McNemar's, the form a laboratory method comparison reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leuko.errors import LeukoError
from leuko.evaluate.metrics import SMALL_CLASS

#: The per-lab table's scores (each with ``_lo``/``_hi`` 95% bounds in the CSV).
LAB_METRICS = ["accuracy", "macro_f1_common", "balanced_accuracy"]
LAB_HEADERS = {"lab": "Lab left out", "n_test": "Test cells", "accuracy": "Accuracy (95% CI)",
               "macro_f1_common": f"Macro-F1, classes >= {SMALL_CLASS} cells (95% CI)",
               "balanced_accuracy": "Balanced acc. (95% CI)", "common_classes": "Classes in macro-F1",
               "train_time_min": "Training (min)", "accuracy_seed_sd": "Accuracy seed sd"}


class LabScorer:
    """The three scores of one lab's cells, for the cells as tested and for bootstrap resamples of them.

    ``y`` fixes which classes the macro-F1 averages (those with >= ``SMALL_CLASS`` cells; all present
    ones when every class is small) and which the balanced accuracy averages (those present), so every
    prediction vector scored by one scorer is averaged over the same classes: what a paired difference needs.
    """

    def __init__(self, y: np.ndarray, n_classes: int) -> None:
        self.y = np.asarray(y, dtype=np.int64)
        self.k = n_classes
        support = np.bincount(self.y, minlength=n_classes)
        common = np.flatnonzero(support >= SMALL_CLASS)
        self.common = common if common.size else np.flatnonzero(support > 0)
        self.present = support > 0

    def score(self, pred: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """(B, 3) accuracy, macro-F1 over the common classes, balanced accuracy; ``idx`` (B, n) resampled
        cell indices, or None for the cells as they are (B = 1)."""
        pred = np.asarray(pred, dtype=np.int64)
        yt, yp = (self.y[None, :], pred[None, :]) if idx is None else (self.y[idx], pred[idx])
        b, k = yt.shape[0], self.k
        off = (np.arange(b, dtype=np.int64) * k)[:, None]
        ok = yt == yp
        kt, kp = (yt + off).ravel(), (yp + off).ravel()
        n_true = np.bincount(kt, minlength=b * k).reshape(b, k).astype(float)
        n_pred = np.bincount(kp, minlength=b * k).reshape(b, k).astype(float)
        tp = np.bincount(kt[ok.ravel()], minlength=b * k).reshape(b, k).astype(float)
        denom = n_true + n_pred
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        recall = np.divide(tp, n_true, out=np.full_like(tp, np.nan), where=n_true > 0)
        recall[:, ~self.present] = np.nan
        return np.stack([ok.mean(axis=1), f1[:, self.common].mean(axis=1), np.nanmean(recall, axis=1)], axis=1)

    def resamples(self, n_bootstrap: int, seed: int) -> list[np.ndarray]:
        """Bootstrap index draws in chunks of at most ~4M cells (memory), the same for every model scored."""
        n = self.y.size
        rng = np.random.default_rng(seed)
        chunk = max(1, 4_000_000 // max(n, 1))
        return [rng.integers(0, n, size=(min(chunk, n_bootstrap - s), n)) for s in range(0, n_bootstrap, chunk)]


def _read_predictions(path: Path, c2i: dict[str, int]) -> pd.DataFrame:
    if not path.is_file():
        raise LeukoError(f"no predictions at {path}: evaluate that run first")
    frame = pd.read_csv(path)
    missing = {"true", "pred"} - set(frame.columns)
    if missing:
        raise LeukoError(f"{path} has no {', '.join(sorted(missing))} column: not a leuko predictions.csv")
    unknown = sorted((set(frame["true"]) | set(frame["pred"])) - set(c2i))
    if unknown:
        raise LeukoError(f"{path} has labels {', '.join(map(str, unknown))} outside the classes {', '.join(c2i)}")
    return frame


Predictions = Path | list[Path] | tuple[Path, ...]
"""One model's ``predictions.csv``, or several: the same recipe trained with different seeds (replicates)."""


def _as_list(predictions: Predictions) -> list[Path]:
    paths = [Path(p) for p in (predictions if isinstance(predictions, (list, tuple)) else [predictions])]
    if not paths:
        raise LeukoError("no predictions given")
    return paths


def _aligned(paths: list[Path], classes: list[str]) -> tuple[LabScorer, list[np.ndarray]]:
    """A scorer of the first file's cells and every file's predictions in that cell order.

    Several files (two recipes, or a recipe's seeds) must hold the same cells (matched by ``path``,
    with the same true label): comparing or averaging over different cells would be neither.
    """
    c2i = {c: i for i, c in enumerate(classes)}
    frames = [_read_predictions(p, c2i) for p in paths]
    first = frames[0]
    if len(frames) > 1:
        for path, frame in zip(paths, frames):
            if "path" not in frame.columns or frame["path"].duplicated().any():
                raise LeukoError(f"{path}: a paired comparison needs one row per cell path")
        for path, frame in zip(paths[1:], frames[1:]):
            if set(frame["path"]) != set(first["path"]):
                common = len(set(frame["path"]) & set(first["path"]))
                raise LeukoError(f"{paths[0]} and {path} were not tested on the same cells ({len(first)} and {len(frame)}, "
                                 f"{common} in common): a paired comparison needs the same test cells")
        frames = [first] + [f.set_index("path").loc[first["path"]].reset_index() for f in frames[1:]]
        for path, frame in zip(paths[1:], frames[1:]):
            if not (first["true"].to_numpy() == frame["true"].to_numpy()).all():
                raise LeukoError(f"{paths[0]} and {path} give some cells different true labels: "
                                 "not the same test set (a different class map?)")
    scorer = LabScorer(first["true"].map(c2i).to_numpy(), len(classes))
    return scorer, [f["pred"].map(c2i).to_numpy() for f in frames]


def _seed_mean(scorer: LabScorer, preds: list[np.ndarray], idx: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """(B, 3): each draw's scores averaged over the replicates, the replicates themselves resampled
    (with replacement) when there are several, so a recipe's interval also spans its training seeds."""
    scores = np.stack([scorer.score(p, idx) for p in preds])  # (R, B, 3)
    if len(preds) == 1 or idx is None:
        return scores.mean(axis=0)
    r, b = scores.shape[0], scores.shape[1]
    pick = rng.integers(0, r, size=(b, r))
    return scores[pick, np.arange(b)[:, None], :].mean(axis=1)


def lab_scores(predictions: Predictions, classes: list[str], *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes with >= ``SMALL_CLASS`` cells and balanced accuracy of one
    ``predictions.csv``, each with a percentile-bootstrap 95% interval (resampling cells).

    Several files (one recipe's seeds, on the same cells): each score is their mean, the interval resamples
    cells and seeds, and ``accuracy_seed_sd`` is the spread of accuracy between seeds (``n_seeds`` of them).
    """
    paths = _as_list(predictions)
    scorer, preds = _aligned(paths, classes)
    rng = np.random.default_rng(seed + 7919)
    point = _seed_mean(scorer, preds, None, rng)[0]
    boot = [_seed_mean(scorer, preds, idx, rng) for idx in scorer.resamples(n_bootstrap, seed)]
    lo, hi = np.percentile(np.concatenate(boot), [2.5, 97.5], axis=0) if boot else (point * np.nan, point * np.nan)
    out: dict[str, Any] = {"n_test": int(scorer.y.size)}
    for i, name in enumerate(LAB_METRICS):
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = float(point[i]), float(lo[i]), float(hi[i])
    out["common_classes"] = ", ".join(classes[c] for c in scorer.common)
    if len(preds) > 1:
        out["n_seeds"] = len(preds)
        out["accuracy_seed_sd"] = float(np.std([float((p == scorer.y).mean()) for p in preds], ddof=1))
    return out


def paired_lab_scores(
    predictions: Predictions,
    baseline: Predictions,
    classes: list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
    """The difference ``predictions - baseline`` of the three scores on the same cells, with a paired
    percentile-bootstrap 95% interval (each resample scores both models on the same cells).

    The files must hold the same cells (matched by ``path``, with the same true label): a paired
    comparison of different cells would be no comparison. Either side may be several files, one recipe
    trained with different seeds: its scores are their mean, and each draw also resamples each side's
    seeds, because on a lab the recipe never saw two seeds can differ by more than two recipes do.
    The discordant counts are then per-cell majorities over seeds. Returns the row and the (B, 3)
    bootstrap differences, so a mean over labs can be bounded by averaging labs draw by draw.
    """
    ours, theirs = _as_list(predictions), _as_list(baseline)
    scorer, preds = _aligned([*ours, *theirs], classes)
    pa, pb = preds[:len(ours)], preds[len(ours):]
    rng = np.random.default_rng(seed + 7919)
    point = _seed_mean(scorer, pa, None, rng)[0] - _seed_mean(scorer, pb, None, rng)[0]
    draws = scorer.resamples(n_bootstrap, seed)
    diffs = (np.concatenate([_seed_mean(scorer, pa, idx, rng) - _seed_mean(scorer, pb, idx, rng) for idx in draws])
             if draws else np.zeros((0, 3)))
    lo, hi = np.percentile(diffs, [2.5, 97.5], axis=0) if len(diffs) else (point * np.nan, point * np.nan)
    right_a = np.mean([p == scorer.y for p in pa], axis=0) > 0.5
    right_b = np.mean([p == scorer.y for p in pb], axis=0) > 0.5
    row: dict[str, Any] = {"n_test": int(scorer.y.size),
                           "only_this_right": int((right_a & ~right_b).sum()),
                           "only_baseline_right": int((~right_a & right_b).sum())}
    for i, name in enumerate(LAB_METRICS):
        row[f"d_{name}"], row[f"d_{name}_lo"], row[f"d_{name}_hi"] = float(point[i]), float(lo[i]), float(hi[i])
    if len(pa) > 1 or len(pb) > 1:
        row["n_seeds"], row["n_seeds_baseline"] = len(pa), len(pb)
    return row, diffs


def mean_difference(rows: list[dict[str, Any]], diffs: list[np.ndarray]) -> dict[str, Any]:
    """The unweighted mean over labs of each difference, bounded by averaging the labs' bootstrap draws
    draw by draw (labs are resampled independently, so draw ``i`` of each lab is one resample of the table)."""
    out: dict[str, Any] = {"n_test": int(sum(r["n_test"] for r in rows)),
                           "only_this_right": int(sum(r["only_this_right"] for r in rows)),
                           "only_baseline_right": int(sum(r["only_baseline_right"] for r in rows))}
    n = min((len(d) for d in diffs), default=0)
    stacked = np.mean([d[:n] for d in diffs], axis=0) if n else np.zeros((0, 3))
    for i, name in enumerate(LAB_METRICS):
        out[f"d_{name}"] = float(np.mean([r[f"d_{name}"] for r in rows]))
        lo, hi = np.percentile(stacked[:, i], [2.5, 97.5]) if n else (np.nan, np.nan)
        out[f"d_{name}_lo"], out[f"d_{name}_hi"] = float(lo), float(hi)
    return out


def paired_labs(ours: dict[str, Predictions], theirs: dict[str, Predictions], classes: list[str], *,
                n_bootstrap: int = 1000) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per lab both left out (lab -> ``predictions.csv``, or its seeds' files), ``ours - theirs`` paired; and their mean.

    Each lab is resampled with its own seed (its position), so the labs' draws are independent and
    :func:`mean_difference` may average them draw by draw. No lab in common is an error.
    """
    labs = [lab for lab in ours if lab in theirs]
    if not labs:
        raise LeukoError(f"no lab left out in both ({', '.join(ours)} vs {', '.join(theirs)})")
    pairs = [paired_lab_scores(ours[lab], theirs[lab], classes, n_bootstrap=n_bootstrap, seed=i) for i, lab in enumerate(labs)]
    rows = [{"lab": lab, **row} for lab, (row, _) in zip(labs, pairs)]
    return rows, {"lab": "mean", **mean_difference(rows, [d for _, d in pairs])}


__all__ = ["LAB_HEADERS", "LAB_METRICS", "LabScorer", "lab_scores", "mean_difference", "paired_lab_scores", "paired_labs"]
