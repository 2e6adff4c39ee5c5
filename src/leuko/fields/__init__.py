"""Whole smear fields: find every white cell, evaluate the finding, count a sample once per cell.

A lab without a slide scanner photographs its smear field by field; each field
(BCCD's are 640x480) holds tens of red cells, platelets and a few white cells,
some cut by the frame's edge. This package turns fields into cells:

* :mod:`~leuko.fields.find`: :func:`find_cells` (every white cell of a field:
  stained nuclei, lobes grouped, touching cells parted, a score and an edge flag
  per box), sized by the red cells of the field so it reads any magnification;
* :mod:`~leuko.fields.evaluate`: precision, recall, F1 and AP at an IoU against
  VOC boxes, per-field errors and side-by-side pictures;
* :mod:`~leuko.fields.dedupe`: the same cell in overlapping fields of a sample,
  found by leuko's perceptual hashes and an aligned pixel check;
* :mod:`~leuko.fields.count`: :func:`predict_fields` (one row per found cell,
  classified by a leuko predictor) and :func:`count_fields` (the differential of
  a sample, with 95% Wilson intervals from :mod:`~leuko.fields.differential`);
* :mod:`~leuko.fields.read`: reading fields, folders of fields and VOC truth.

It sits above :mod:`leuko.infer` (it classifies with a predictor) and below
``evaluate``'s run module, ``serve`` and ``cli``. Names are loaded on first use,
so ``leuko.fields.differential`` imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leuko.fields.count import (
        FieldCell,
        FieldCount,
        FieldPredictions,
        count_fields,
        predict_fields,
    )
    from leuko.fields.dedupe import find_repeats
    from leuko.fields.differential import ClassCount, wilson_interval
    from leuko.fields.evaluate import (
        DetectionReport,
        average_precision,
        evaluate_fields,
        iou,
    )
    from leuko.fields.find import FoundCell, field_ruler, find_cells
    from leuko.fields.read import list_fields, read_field, voc_fields

_LAZY = {
    "FoundCell": "leuko.fields.find",
    "find_cells": "leuko.fields.find",
    "field_ruler": "leuko.fields.find",
    "DetectionReport": "leuko.fields.evaluate",
    "evaluate_fields": "leuko.fields.evaluate",
    "average_precision": "leuko.fields.evaluate",
    "iou": "leuko.fields.evaluate",
    "find_repeats": "leuko.fields.dedupe",
    "FieldCell": "leuko.fields.count",
    "FieldCount": "leuko.fields.count",
    "FieldPredictions": "leuko.fields.count",
    "count_fields": "leuko.fields.count",
    "predict_fields": "leuko.fields.count",
    "ClassCount": "leuko.fields.differential",
    "wilson_interval": "leuko.fields.differential",
    "list_fields": "leuko.fields.read",
    "read_field": "leuko.fields.read",
    "voc_fields": "leuko.fields.read",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leuko.fields' has no attribute {name!r}")


__all__ = [
    "ClassCount",
    "DetectionReport",
    "FieldCell",
    "FieldCount",
    "FieldPredictions",
    "FoundCell",
    "average_precision",
    "count_fields",
    "evaluate_fields",
    "field_ruler",
    "find_cells",
    "find_repeats",
    "iou",
    "list_fields",
    "predict_fields",
    "read_field",
    "voc_fields",
    "wilson_interval",
]
