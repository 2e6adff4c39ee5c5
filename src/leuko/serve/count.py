"""The differential count: how many cells of each class in one sample, with honest uncertainty.

A manual differential counts 100 (sometimes 200) white cells, so every
percentage is a binomial proportion from a small sample. The 95% interval is
Wilson's score interval: unlike the textbook ``p ± 1.96·sqrt(p(1-p)/n)`` it
stays inside [0, 1] and does not collapse to zero width for a class seen 0
or n times, which is exactly where rare cells (basophils, blasts) sit.
Counts of fewer than 100 cells get a note, as CLSI H20-A2 bases the reference
differential on at least 100 (better 200) cells.

One home for this arithmetic: ``POST /count`` counts the model's predictions
and ``POST /count/labels`` counts the labels the web page holds after review,
both through :func:`differential_count`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from leuko.errors import LeukoError
from leuko.fields.differential import (  # one home: leuko.fields.differential
    MIN_CELLS,
    Z95,
    class_counts,
    wilson_interval,
)

__all__ = ["MIN_CELLS", "Z95", "differential_count", "wilson_interval"]


def differential_count(labels: Sequence[str], classes: Sequence[str], review: Sequence[bool] | None = None) -> dict[str, Any]:
    """Counts, percentages and 95% Wilson intervals per class, in the model's class order.

    Args:
        labels: one class name per cell (predicted or corrected).
        classes: every class the model knows; classes with no cell are listed with 0.
        review: per cell, whether it still needs a technologist's look.

    Raises:
        LeukoError: a label is not one of ``classes``, or ``review`` has another length.
    """
    known = set(classes)
    unknown = sorted({lab for lab in labels if lab not in known})
    if unknown:
        raise LeukoError(f"unknown class label(s) {unknown}; the model's classes are {list(classes)}")
    if review is not None and len(review) != len(labels):
        raise LeukoError(f"review has {len(review)} entries for {len(labels)} labels")
    n = len(labels)
    rows = [asdict(c) for c in class_counts(labels, classes)]
    note = None
    if n < MIN_CELLS:
        note = (f"only {n} cell(s) counted; a differential needs at least {MIN_CELLS} cells "
                "(CLSI H20-A2), so these percentages are rough: see the 95% intervals")
    return {
        "n_cells": n,
        "n_review": int(sum(bool(r) for r in review)) if review is not None else 0,
        "counts": rows,
        "note": note,
        "interval": "95% Wilson score interval, in percent",
    }
