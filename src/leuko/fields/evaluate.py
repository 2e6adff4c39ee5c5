"""How well a finder finds white cells: precision, recall, F1 and AP at an IoU, per-field errors, pictures.

The protocol is Pascal VOC's for one class: found boxes, best score first,
are matched greedily to the unmatched true box they overlap most, a match
counting when the intersection over union reaches ``iou`` (0.5); a found box
matching nothing, or a true box already taken, is a false positive, an
unmatched true box a miss. AP is the area under the precision-recall curve
with precision made monotone (VOC 2010 onwards, every point), the number
published detectors report for BCCD's WBC class.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from leuko.errors import LeukoError
from leuko.fields.find import Box, FoundCell, find_cells
from leuko.fields.read import read_field

Finder = Callable[[np.ndarray], list[FoundCell]]

DEFAULT_IOU = 0.5


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match(found: Sequence[Box], scores: Sequence[float], truth: Sequence[Box], threshold: float = DEFAULT_IOU) -> tuple[list[int], list[float]]:
    """VOC matching in one field: per found box (in the order given), the index of the true box it
    matches or -1, and its best IoU with any true box. Boxes are taken best score first."""
    order = sorted(range(len(found)), key=lambda i: -scores[i])
    taken = [False] * len(truth)
    matched = [-1] * len(found)
    best = [0.0] * len(found)
    for i in order:
        ious = [iou(found[i], t) for t in truth]
        if not ious:
            continue
        j = int(np.argmax(ious))
        best[i] = ious[j]
        # VOC: the best-overlapping true box; if it is taken the detection is a false positive
        if ious[j] >= threshold and not taken[j]:
            taken[j] = True
            matched[i] = j
    return matched, best


def average_precision(scores: Sequence[float], hits: Sequence[bool], n_truth: int) -> float:
    """VOC (2010+) AP: area under the precision-recall curve, precision made non-increasing."""
    if n_truth <= 0:
        return float("nan")
    if not len(scores):
        return 0.0
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    tp = np.asarray(hits, bool)[order].astype(float)
    ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
    recall = ctp / n_truth
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    mrec = np.concatenate([[0.0], recall, [recall[-1]]])
    mpre = np.concatenate([[1.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass
class FieldResult:
    """One field's detections against its true boxes."""

    name: str
    path: str
    truth: list[Box]
    found: list[Box]
    scores: list[float]
    edge: list[bool]
    matched: list[int]
    best_iou: list[float]
    seconds: float = 0.0

    @property
    def tp(self) -> int:
        return sum(1 for m in self.matched if m >= 0)

    @property
    def fp(self) -> int:
        return sum(1 for m in self.matched if m < 0)

    @property
    def fn(self) -> int:
        return len(self.truth) - self.tp

    @property
    def missed(self) -> list[Box]:
        got = {m for m in self.matched if m >= 0}
        return [t for j, t in enumerate(self.truth) if j not in got]

    def errors(self) -> str:
        """What went wrong here, in words (empty when nothing did)."""
        parts = []
        for i, m in enumerate(self.matched):
            if m < 0:
                why = "no true box near" if self.best_iou[i] < 0.1 else f"IoU {self.best_iou[i]:.2f} with a true box"
                parts.append(f"false cell at {_fmt_box(self.found[i])} (score {self.scores[i]:.2f}, {why})")
        for t in self.missed:
            ious = [iou(t, f) for f in self.found]
            near = max(ious) if ious else 0.0
            parts.append(f"missed cell at {_fmt_box(t)}" + (f" (best found IoU {near:.2f})" if near > 0 else ""))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "tp": self.tp, "fp": self.fp, "fn": self.fn,
            "truth": [[round(v, 1) for v in b] for b in self.truth],
            "found": [[round(v, 1) for v in b] for b in self.found],
            "scores": [round(s, 4) for s in self.scores], "edge": self.edge,
            "best_iou": [round(v, 3) for v in self.best_iou], "errors": self.errors(),
        }


@dataclass
class DetectionReport:
    """Precision, recall and F1 at the finder's operating point, AP over every detection.

    ``fields`` hold every detection the finder scored (down to score 0, for AP);
    the counts, precision, recall, F1 and the per-field errors are those of the
    detections scoring at least ``score_threshold`` (what the finder reports).
    """

    fields: list[FieldResult]
    iou: float = DEFAULT_IOU
    label: str = "WBC"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    score_threshold: float = 0.0
    _kept: list[FieldResult] | None = field(default=None, repr=False)

    @property
    def kept(self) -> list[FieldResult]:
        """The fields with only the detections at or above :attr:`score_threshold` (matching redone)."""
        if self._kept is None:
            self._kept = [_threshold(f, self.score_threshold, self.iou) for f in self.fields]
        return self._kept

    @property
    def tp(self) -> int:
        return sum(f.tp for f in self.kept)

    @property
    def fp(self) -> int:
        return sum(f.fp for f in self.kept)

    @property
    def fn(self) -> int:
        return sum(f.fn for f in self.kept)

    @property
    def n_truth(self) -> int:
        return sum(len(f.truth) for f in self.fields)

    @property
    def precision(self) -> float:
        n = self.tp + self.fp
        return self.tp / n if n else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / self.n_truth if self.n_truth else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        if not (math.isfinite(p) and math.isfinite(r)) or p + r <= 0:
            return 0.0
        return 2 * p * r / (p + r)

    @property
    def ap(self) -> float:
        """VOC AP over every detection (the operating threshold does not enter)."""
        scores = [s for f in self.fields for s in f.scores]
        hits = [m >= 0 for f in self.fields for m in f.matched]
        return average_precision(scores, hits, self.n_truth)

    def at_score(self, threshold: float) -> DetectionReport:
        """The same detections read at another operating threshold."""
        return DetectionReport(self.fields, self.iou, self.label, self.seconds, list(self.notes), float(threshold))

    def subset(self, names: Iterable[str]) -> DetectionReport:
        """The report over the named fields only (e.g. one fold of a cross-validation)."""
        keep = set(names)
        return DetectionReport([f for f in self.fields if f.name in keep], self.iou, self.label, 0.0,
                               list(self.notes), self.score_threshold)

    def best_threshold(self, tolerance: float = 1e-3) -> float:
        """The score threshold with the best F1 on these fields.

        Keeping the detections scoring at least ``s_i`` (the ``i``-th distinct score) is one
        outcome, reached by any threshold in ``(s_(i-1), s_i]``; of the outcomes within
        ``tolerance`` of the best F1 the median is taken, and the threshold returned is the
        middle of its interval, not its edge (where one detection more or less flips it).
        """
        scores = sorted({s for f in self.fields for s in f.scores})
        if not scores:
            return 0.0
        f1s = [self.at_score(t).f1 for t in scores]
        top = max(f1s)
        near = [i for i, f in enumerate(f1s) if f >= top - tolerance]
        i = near[len(near) // 2]
        lower = scores[i - 1] if i > 0 else 0.0
        return float((lower + scores[i]) / 2.0)

    def summary(self) -> dict[str, Any]:
        return {
            "fields": len(self.fields), "true_cells": self.n_truth, "found": self.tp + self.fp,
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "iou": self.iou, "label": self.label,
            "precision": _r(self.precision), "recall": _r(self.recall), "f1": _r(self.f1), "ap": _r(self.ap),
            "fields_with_errors": sum(1 for f in self.kept if f.fp or f.fn),
            "score_threshold": self.score_threshold,
            "fields_per_s": _r(len(self.fields) / self.seconds) if self.seconds > 0 else None,
        }

    def format_summary(self) -> str:
        s = self.summary()
        lines = [
            f"{s['fields']} fields, {s['true_cells']} true {self.label} boxes, {s['found']} found "
            f"(IoU >= {self.iou:g}): precision {s['precision']:.4f}, recall {s['recall']:.4f}, "
            f"F1 {s['f1']:.4f}, AP {s['ap']:.4f}",
            f"true positives {s['tp']}, false positives {s['fp']}, missed {s['fn']}; "
            f"{s['fields_with_errors']} field(s) with an error",
        ]
        lines += self.notes
        return "\n".join(lines)

    def error_lines(self) -> list[str]:
        return [f"{f.name}: {f.errors()}" for f in self.kept if f.fp or f.fn]

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "notes": list(self.notes), "fields": [f.to_dict() for f in self.kept]}

    def write(self, out: str | Path, *, pictures: int = 24) -> Path:
        """``report.json``, ``errors.txt`` and up to ``pictures`` side-by-side pictures (fields
        with errors first) under ``out``."""
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
            (out / "errors.txt").write_text("\n".join(self.error_lines()) + "\n", encoding="utf-8")
        except OSError as exc:
            raise LeukoError(f"cannot write the detection report under {out}: {exc.strerror or exc}") from None
        wrong = [f for f in self.kept if f.fp or f.fn]
        right = [f for f in self.kept if not (f.fp or f.fn)]
        chosen = (wrong + right)[: max(0, pictures)]
        if chosen:
            pic = out / "pictures"
            pic.mkdir(exist_ok=True)
            for f in chosen:
                draw_comparison(f, pic / f"{f.name}.jpg")
        return out


def _threshold(f: FieldResult, threshold: float, iou_threshold: float) -> FieldResult:
    keep = [i for i, s in enumerate(f.scores) if s >= threshold]
    if len(keep) == len(f.scores):
        return f
    found = [f.found[i] for i in keep]
    scores = [f.scores[i] for i in keep]
    matched, best = match(found, scores, f.truth, iou_threshold)
    return FieldResult(f.name, f.path, f.truth, found, scores, [f.edge[i] for i in keep], matched, best, f.seconds)


def evaluate_fields(
    fields: Iterable[tuple[str | Path, Sequence[Box]]],
    *,
    finder: Finder | None = None,
    threshold: float = DEFAULT_IOU,
    min_score: float | None = None,
    label: str = "WBC",
) -> DetectionReport:
    """Run the finder on each field and score it against the true boxes.

    Args:
        fields: ``(image path, true boxes)`` pairs (e.g. :func:`leuko.fields.read.voc_fields`).
        finder: ``finder(image) -> list[FoundCell]`` returning *every* scored detection; default
            :func:`~leuko.fields.find.find_cells` with ``min_score=0`` (AP needs them all).
        threshold: IoU a found box needs with a true box to count.
        min_score: the operating threshold precision, recall and F1 are read at (default
            :data:`~leuko.fields.find.DEFAULT_MIN_SCORE`).
    """
    from leuko.fields.find import DEFAULT_MIN_SCORE

    if not 0.0 < threshold <= 1.0:
        raise LeukoError(f"iou must be in (0, 1]; got {threshold}")
    find = finder or (lambda image: find_cells(image, min_score=0.0))
    results: list[FieldResult] = []
    t_all = time.perf_counter()
    for path, truth in fields:
        p = Path(path)
        image = read_field(p)
        t0 = time.perf_counter()
        cells = find(image)
        dt = time.perf_counter() - t0
        found = [c.box for c in cells]
        scores = [c.score for c in cells]
        matched, best = match(found, scores, list(truth), threshold)
        results.append(FieldResult(p.stem, str(p), [tuple(map(float, t)) for t in truth], found, scores,
                                   [c.edge for c in cells], matched, best, dt))
    if not results:
        raise LeukoError("no fields to evaluate")
    return DetectionReport(results, threshold, label, time.perf_counter() - t_all,
                           score_threshold=DEFAULT_MIN_SCORE if min_score is None else float(min_score))


def draw_comparison(result: FieldResult, path: Path) -> Path:
    """The field twice, side by side: its true boxes (left) and what was found (right: matched in
    green, false in red, missed true boxes dashed orange, a cell cut by the edge marked "edge")."""
    import cv2

    from leuko.fields.read import read_field as _read

    image = _read(Path(result.path))
    left = image.copy()
    right = image.copy()
    t = max(2, int(round(max(image.shape[:2]) / 320)))
    for b in result.truth:
        _rect(left, b, (0, 170, 255), t)
    got = {m for m in result.matched if m >= 0}
    for j, b in enumerate(result.truth):
        if j not in got:
            _rect(right, b, (255, 140, 0), t, dashed=True)
    for i, b in enumerate(result.found):
        colour = (0, 200, 0) if result.matched[i] >= 0 else (230, 0, 0)
        _rect(right, b, colour, t)
        label = f"{result.scores[i]:.2f}" + (" edge" if result.edge[i] else "")
        x0, y0 = int(b[0]), int(b[1])
        cv2.putText(right, label, (x0 + 3, max(12, y0 + 16)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * t / 2, colour, max(1, t // 2), cv2.LINE_AA)
    gap = np.full((image.shape[0], 8, 3), 255, np.uint8)
    both = np.hstack([left, gap, right])
    head = np.full((28, both.shape[1], 3), 255, np.uint8)
    cv2.putText(head, f"{result.name}: truth", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(head, f"found: {result.tp} right, {result.fp} false, {result.fn} missed",
                (image.shape[1] + 14, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    both = np.vstack([head, both])
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(both, cv2.COLOR_RGB2BGR)):
        raise LeukoError(f"cannot write picture {path}")
    return path


def _rect(img: np.ndarray, b: Sequence[float], colour: tuple[int, int, int], t: int, dashed: bool = False) -> None:
    import cv2

    x0, y0, x1, y1 = (int(round(v)) for v in b)
    if not dashed:
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, t)
        return
    step = 12
    for x in range(x0, x1, step):
        cv2.line(img, (x, y0), (min(x + step // 2, x1), y0), colour, t)
        cv2.line(img, (x, y1), (min(x + step // 2, x1), y1), colour, t)
    for y in range(y0, y1, step):
        cv2.line(img, (x0, y), (x0, min(y + step // 2, y1)), colour, t)
        cv2.line(img, (x1, y), (x1, min(y + step // 2, y1)), colour, t)


def _fmt_box(b: Sequence[float]) -> str:
    return "(" + ", ".join(str(int(round(v))) for v in b) + ")"


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)
