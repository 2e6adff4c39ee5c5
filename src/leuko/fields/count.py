"""Classify every white cell of a sample's fields and count the sample: one row per cell, one differential.

:func:`predict_fields` finds the cells of each field (:func:`~leuko.fields.find.find_cells`,
sized by one red-cell ruler for the whole sample: its fields share a microscope),
cuts each cell out the way a box sample of an annotated field is cut
(:func:`leuko.data.layouts.bccd.square_crop`, grown by
:data:`~leuko.data.preprocess.CELL_CONTEXT` for a cell-centred model, so the
model sees what it was evaluated on) and classifies the crops with a leuko
predictor (calibrated probabilities, the model's review policy).
:func:`count_fields` adds the count: repeats of one cell in overlapping fields
merged (:mod:`~leuko.fields.dedupe`), cells cut by the frame's edge counted once
or left out, and the differential with 95% Wilson intervals.

Every field is read first: a file that is not an image, is truncated or is over
the decompression limit stops the count with one line naming it, before
anything is classified or written (a differential silently missing a field is
wrong for the sample).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from PIL import Image

from leuko.data.imageio import filled_window
from leuko.data.layouts.bccd import DEFAULT_MARGIN, square_crop
from leuko.data.preprocess import CELL_CONTEXT, grow_box
from leuko.errors import LeukoError
from leuko.fields.dedupe import CellPatch, cell_patch, find_repeats, repeat_groups
from leuko.fields.differential import ClassCount, class_counts, few_cells_note
from leuko.fields.find import (
    DEFAULT_MIN_SCORE,
    FALLBACK_FIELD_RBC,
    field_ruler,
    find_cells,
)
from leuko.fields.read import list_fields, read_field

if TYPE_CHECKING:
    from leuko.infer.backends import BasePredictor

EdgePolicy = Literal["count", "drop"]
EDGE_POLICIES: tuple[str, ...] = ("count", "drop")

REVIEW_DETECTION_SCORE = 0.9
"""A found cell scoring below this is flagged for review (it may be a smudge, a clump of
platelets or a cell the finder cut wrongly), whatever the classifier says; most white cells
score above 0.95 (a clearly stained nucleus of at least half a red cell's area)."""

def detection_reasons(score: float | None) -> list[str]:
    """Why a found cell is flagged for review whatever the classifier says: its detection score is
    below :data:`REVIEW_DETECTION_SCORE` (``None``, a box a person drew, is never flagged for it)."""
    if score is None or score >= REVIEW_DETECTION_SCORE:
        return []
    return [f"unsure it is a white cell (detection score {score:.2f})"]


_FLUSH = 256
"""Crops classified per call (bounds the memory crops take)."""


@dataclass(frozen=True)
class FieldCell:
    """One white cell found in a field, classified.

    Attributes:
        field: the field's path.
        index: the cell's number in its field (best detection score first).
        box: ``(x0, y0, x1, y1)`` in the field's pixels.
        score: detection score (:attr:`leuko.fields.find.FoundCell.score`).
        edge: the frame's edge cuts the cell.
        label: the predicted class.
        probs: calibrated probability per class.
        review: a technologist should look at it (``review_reasons`` says why).
        repeat_of: ``field#index`` of the copy it repeats (overlapping fields); ``None`` otherwise.
        counted: whether it is in the differential (not a repeat; not left out for the edge).
    """

    field: str
    index: int
    box: tuple[float, float, float, float]
    score: float
    edge: bool
    label: str
    probs: dict[str, float]
    review: bool
    review_reasons: tuple[str, ...] = ()
    repeat_of: str | None = None
    counted: bool = True

    @property
    def key(self) -> str:
        return f"{self.field}#{self.index}"

    @property
    def confidence(self) -> float:
        return float(self.probs.get(self.label, float("nan")))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "field": self.field, "cell": self.index,
            "x0": round(self.box[0], 1), "y0": round(self.box[1], 1), "x1": round(self.box[2], 1), "y1": round(self.box[3], 1),
            "detection_score": round(self.score, 4), "edge": self.edge,
            "pred": self.label, "confidence": round(self.confidence, 4),
        }
        out.update({f"p_{c}": round(float(v), 6) for c, v in self.probs.items()})
        out.update({"review": self.review, "review_reasons": "; ".join(self.review_reasons),
                    "repeat_of": self.repeat_of or "", "counted": self.counted})
        return out


@dataclass
class FieldPredictions:
    """Every found cell of a set of fields (:func:`predict_fields`)."""

    rows: list[FieldCell]
    classes: list[str]
    fields: list[str]
    empty_fields: list[str] = field(default_factory=list)
    rbc_diameter: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    patches: list[CellPatch] = field(default_factory=list, repr=False)

    def to_records(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.rows]

    def write(self, out: str | Path) -> Path:
        """One row per found cell: CSV (``.csv``) or JSON (``.json``, with classes and notes)."""
        return _write_rows(Path(out), self.to_records(), self.classes, {"notes": self.notes, "empty_fields": self.empty_fields})


@dataclass
class FieldCount:
    """A sample's differential from its fields (:func:`count_fields`)."""

    sample: str
    classes: list[str]
    counts: list[ClassCount]
    rows: list[FieldCell]
    edge: EdgePolicy
    fields: list[str]
    empty_fields: list[str]
    merged: int
    """Found cells dropped as repeats of a cell in an overlapping field."""
    edge_dropped: int
    """Cells cut by the edge left out (``edge="drop"``)."""
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    rbc_diameter: float | None = None

    @property
    def n_cells(self) -> int:
        return sum(c.count for c in self.counts)

    @property
    def counted(self) -> list[FieldCell]:
        return [r for r in self.rows if r.counted]

    @property
    def n_review(self) -> int:
        return sum(1 for r in self.counted if r.review)

    @property
    def n_edge(self) -> int:
        """Counted cells cut by the frame's edge."""
        return sum(1 for r in self.counted if r.edge)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample": self.sample,
            "n_cells": self.n_cells,
            "n_review": self.n_review,
            "counts": [c.__dict__ for c in self.counts],
            "interval": "95% Wilson score interval, in percent",
            "edge": self.edge,
            "edge_cells_counted": self.n_edge,
            "edge_cells_dropped": self.edge_dropped,
            "repeats_merged": self.merged,
            "fields": len(self.fields),
            "empty_fields": self.empty_fields,
            "found_cells": len(self.rows),
            "rbc_diameter_px": None if self.rbc_diameter is None else round(self.rbc_diameter, 1),
            "notes": self.notes,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "cells": [r.to_dict() for r in self.rows],
        }

    def summary_lines(self) -> list[str]:
        """What a reader wants first, in a few plain lines."""
        lines = [
            f"sample {self.sample}: {self.n_cells} white cell(s) counted from {len(self.fields)} field(s) "
            f"({len(self.rows)} found; {self.merged} repeat(s) in overlapping fields merged; "
            + (f"{self.n_edge} cut by the edge counted)" if self.edge == "count" else f"{self.edge_dropped} cut by the edge left out)"),
            f"flagged for review: {self.n_review} of {self.n_cells}",
        ]
        return lines + list(self.notes)

    def write(self, out: str | Path) -> Path:
        """``.json``: the differential, notes and every found cell; ``.csv``: the differential table."""
        p = Path(out)
        suffix = p.suffix.lower()
        if suffix not in (".json", ".csv"):
            raise LeukoError(f"--out must end in .json or .csv; got {p.name}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if suffix == ".json":
                p.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
            else:
                import csv

                with open(p, "w", newline="", encoding="utf-8") as fh:
                    w = csv.writer(fh)
                    w.writerow(["sample", "label", "count", "percent", "ci95_low", "ci95_high"])
                    for c in self.counts:
                        w.writerow([self.sample, c.label, c.count, f"{c.percent:.2f}", f"{c.ci95_low:.2f}", f"{c.ci95_high:.2f}"])
        except OSError as exc:
            raise LeukoError(f"cannot write {p}: {exc.strerror or exc}") from None
        return p


def _write_rows(out: Path, records: list[dict[str, Any]], classes: list[str], extra: dict[str, Any]) -> Path:
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise LeukoError(f"--out must end in .csv or .json; got {out.name}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".json":
            out.write_text(json.dumps({"classes": classes, "cells": records, **extra}, indent=1) + "\n", encoding="utf-8")
        else:
            import pandas as pd

            columns = ["field", "cell", "x0", "y0", "x1", "y1", "detection_score", "edge", "pred", "confidence",
                       *[f"p_{c}" for c in classes], "review", "review_reasons", "repeat_of", "counted"]
            pd.DataFrame(records, columns=columns).to_csv(out, index=False)
    except OSError as exc:
        raise LeukoError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def _check_paths(fields: Sequence[str | Path] | str | Path) -> list[Path]:
    if isinstance(fields, (str, Path)):
        return list_fields(fields)
    paths: list[Path] = []
    for f in fields:
        paths.extend(list_fields(f) if Path(f).is_dir() else [Path(f)])
    if not paths:
        raise LeukoError("no field images given")
    return paths


def classifier_crop(field_image: np.ndarray, box: Sequence[float], *, cell_centred: bool, size: int | None) -> np.ndarray:
    """The square a classifier sees of one found cell: the cell with the margin a box sample of an
    annotated field gets (:func:`leuko.data.layouts.bccd.square_crop`), grown by
    :data:`~leuko.data.preprocess.CELL_CONTEXT` for a cell-centred model (its crop step finds the
    cell in it again); resized to ``size`` (the predictor's decoding size) when given."""
    h, w = field_image.shape[:2]
    x0, y0, x1, y1 = box
    ib = (int(math.floor(x0)), int(math.floor(y0)), int(math.ceil(x1)), int(math.ceil(y1)))
    crop = square_crop(ib, w, h, DEFAULT_MARGIN)
    if cell_centred:
        crop = grow_box(crop, CELL_CONTEXT)
    window = filled_window(field_image, crop)
    if size is not None and (window.shape[0] != size or window.shape[1] != size):
        window = np.asarray(Image.fromarray(np.ascontiguousarray(window)).resize((size, size), Image.BILINEAR, reducing_gap=None))
    return np.ascontiguousarray(window)


def predict_fields(
    predictor: BasePredictor,
    fields: Sequence[str | Path] | str | Path,
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    rbc_diameter: float | None = None,
    shared_ruler: bool = True,
    tta: bool = False,
    keep_patches: bool = False,
) -> FieldPredictions:
    """Find and classify every white cell of ``fields`` (files and/or folders of field images).

    Args:
        predictor: from :func:`leuko.infer.load_predictor`.
        min_score: detections scoring below this are not cells.
        rbc_diameter: red-cell diameter in field pixels, when known (a calibrated microscope).
        shared_ruler: measure the red cells on every field and use their median for all
            (the fields of one sample share a magnification); ``False``: each field its own.
        tta: test-time augmentation of each crop.
        keep_patches: keep each cell's repeat-check patch (:func:`count_fields` needs them).

    Raises:
        LeukoError: a missing folder, no field images, or a field that cannot be read (one line).
    """
    paths = _check_paths(fields)
    seconds = {"read": 0.0, "find": 0.0, "classify": 0.0}
    preprocess = predictor.model_input.preprocess
    cell_centred = bool(preprocess.cell_centred)
    size = predictor.array_size
    # First pass: every field must be readable before anything is classified; the red cells of
    # all of them give the sample's ruler.
    t = time.perf_counter()
    per_field, bad = {}, []
    for p in paths:
        try:
            image = read_field(p)
        except LeukoError as exc:
            bad.append(str(exc))
            continue
        finally:
            seconds["read"] += time.perf_counter() - t
            t = time.perf_counter()
        if rbc_diameter is None:
            per_field[p] = field_ruler(image)
        seconds["find"] += time.perf_counter() - t
        t = time.perf_counter()
    if bad:
        more = f" (and {len(bad) - 1} more field(s) that cannot be read)" if len(bad) > 1 else ""
        raise LeukoError(bad[0] + more)
    ruler = rbc_diameter
    if ruler is None and shared_ruler:
        found = [d for d in per_field.values() if d is not None]
        ruler = float(np.median(found)) if found else None
    rows: list[FieldCell] = []
    patches: list[CellPatch] = []
    empty: list[str] = []
    pending: list[tuple[str, int, Any, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        keys = [f"{f}#{i}" for f, i, _, _ in pending]
        pred = predictor.predict_arrays([c for _, _, _, c in pending], keys, tta=tta)
        reasons = predictor.review_reasons(pred)
        by_key = {k: j for j, k in enumerate(pred.keys)}
        failed = dict(pred.failed)
        for (fname, i, cell, _), key in zip(pending, keys, strict=True):
            if key not in by_key:
                raise LeukoError(f"cannot classify cell {i} of {fname}: {failed.get(key, 'unknown reason')}")
            j = by_key[key]
            p = pred.probs[j]
            why = list(reasons[j]) + detection_reasons(cell.score)
            rows.append(FieldCell(
                field=fname, index=i, box=tuple(float(v) for v in cell.box), score=float(cell.score), edge=bool(cell.edge),
                label=pred.classes[int(np.argmax(p))], probs={c: float(v) for c, v in zip(pred.classes, p, strict=True)},
                review=bool(why), review_reasons=tuple(why),
            ))
        pending.clear()
        seconds["classify"] += time.perf_counter() - t0

    for p in paths:
        t = time.perf_counter()
        image = read_field(p)
        seconds["read"] += time.perf_counter() - t
        t = time.perf_counter()
        d = (ruler if ruler is not None else per_field.get(p)) or max(image.shape[:2]) / FALLBACK_FIELD_RBC
        cells = find_cells(image, rbc_diameter=d, min_score=min_score)
        seconds["find"] += time.perf_counter() - t
        if not cells:
            empty.append(str(p))
            continue
        t = time.perf_counter()
        for i, cell in enumerate(cells):
            pending.append((str(p), i, cell, classifier_crop(image, cell.box, cell_centred=cell_centred, size=size)))
            if keep_patches:
                patches.append(cell_patch(image, cell.box, d, cell.edge))
        seconds["classify"] += time.perf_counter() - t
        if len(pending) >= _FLUSH:
            flush()
    flush()
    notes = []
    if empty:
        notes.append(f"{len(empty)} of {len(paths)} field(s) hold no white cell: " + ", ".join(Path(e).name for e in empty[:5])
                     + (" ..." if len(empty) > 5 else ""))
    return FieldPredictions(rows, list(predictor.classes), [str(p) for p in paths], empty, ruler, seconds, notes, patches)


def count_fields(
    predictor: BasePredictor,
    fields: Sequence[str | Path] | str | Path,
    *,
    sample: str | None = None,
    edge: EdgePolicy = "count",
    dedupe: bool = True,
    min_score: float = DEFAULT_MIN_SCORE,
    rbc_diameter: float | None = None,
    tta: bool = False,
) -> FieldCount:
    """The differential count of one sample from its fields.

    Args:
        predictor: from :func:`leuko.infer.load_predictor`.
        fields: the sample's field images (files and/or folders).
        sample: the sample's name (default: the folder's name, or ``"sample"``).
        edge: ``"count"``: a cell cut by the frame's edge counts (once, when a whole copy of it
            in an overlapping field is merged with it); ``"drop"``: it is left out unless a
            whole copy of it is in another field.
        dedupe: merge repeats of one cell in overlapping fields (:mod:`leuko.fields.dedupe`).
        min_score, rbc_diameter, tta: as for :func:`predict_fields`.

    Raises:
        LeukoError: a bad ``edge``, no field images, or a field that cannot be read.
    """
    if edge not in EDGE_POLICIES:
        raise LeukoError(f"edge must be one of {', '.join(EDGE_POLICIES)}; got {edge!r}")
    if sample is None:
        if isinstance(fields, (str, Path)) and Path(fields).is_dir():
            sample = Path(fields).resolve().name
        else:
            sample = "sample"
    result = predict_fields(predictor, fields, min_score=min_score, rbc_diameter=rbc_diameter, tta=tta, keep_patches=dedupe)
    rows = list(result.rows)
    seconds = dict(result.seconds)
    merged = 0
    if dedupe and len(rows) > 1:
        t = time.perf_counter()
        repeats = find_repeats(result.patches, [r.field for r in rows])
        for group in repeat_groups(len(rows), repeats):
            if len(group) < 2:
                continue
            keep = min(group, key=lambda i: (rows[i].edge, -rows[i].score, i))
            for i in group:
                if i != keep:
                    rows[i] = _replace(rows[i], repeat_of=rows[keep].key, counted=False)
                    merged += 1
        seconds["dedupe"] = time.perf_counter() - t
    dropped = 0
    if edge == "drop":
        for i, r in enumerate(rows):
            if r.counted and r.edge:
                rows[i] = _replace(r, counted=False)
                dropped += 1
    labels = [r.label for r in rows if r.counted]
    counts = class_counts(labels, result.classes)
    notes = list(result.notes)
    if not rows:
        notes.append("no white cell found in any field: the differential is empty")
    note = few_cells_note(len(labels))
    if note and rows:
        notes.append(note)
    return FieldCount(sample, result.classes, counts, rows, edge, result.fields, result.empty_fields, merged, dropped,
                      notes, seconds, result.rbc_diameter)


def _replace(row: FieldCell, **changes: Any) -> FieldCell:
    from dataclasses import replace

    return replace(row, **changes)


__all__ = [
    "EDGE_POLICIES",
    "REVIEW_DETECTION_SCORE",
    "EdgePolicy",
    "FieldCell",
    "FieldCount",
    "FieldPredictions",
    "classifier_crop",
    "count_fields",
    "detection_reasons",
    "predict_fields",
]
