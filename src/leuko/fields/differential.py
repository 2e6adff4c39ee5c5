"""The arithmetic of a differential count: per-class proportions with Wilson intervals.

A manual differential counts 100 (sometimes 200) white cells, so every
percentage is a binomial proportion from a small sample. The 95% interval is
Wilson's score interval: unlike the textbook ``p ± 1.96·sqrt(p(1-p)/n)`` it
stays inside [0, 1] and does not collapse to zero width for a class seen 0
or n times, which is exactly where rare cells (basophils, blasts) sit.
Counts of fewer than :data:`MIN_CELLS` cells get a note, as CLSI H20-A2 bases
the reference differential on at least 100 (better 200) cells.

This module is the one home of that arithmetic: :mod:`leuko.fields.count`
(a sample counted from its smear fields) and :mod:`leuko.serve.count` (the web
service's count) both use it. It imports nothing but the standard library.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

MIN_CELLS = 100
"""Below this many cells a count gets a note (CLSI H20-A2 reference: 100-200 cells)."""

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (``(0, 0)`` when ``n == 0``)."""
    if n <= 0:
        return 0.0, 0.0
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n]; got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exact ends for k = 0 and k = n (the formula gives them up to rounding)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class ClassCount:
    """One class of a differential: cells, percent and its 95% Wilson interval (in percent)."""

    label: str
    count: int
    percent: float
    ci95_low: float
    ci95_high: float


def class_counts(labels: Sequence[str], classes: Sequence[str]) -> list[ClassCount]:
    """Counts, percentages and 95% Wilson intervals per class, in ``classes`` order (0 for a class
    with no cell). Labels outside ``classes`` raise :class:`ValueError` (a caller's bug)."""
    known = set(classes)
    unknown = sorted({lab for lab in labels if lab not in known})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(classes)}")
    n = len(labels)
    out = []
    for c in classes:
        k = sum(1 for lab in labels if lab == c)
        lo, hi = wilson_interval(k, n)
        out.append(ClassCount(c, k, 100.0 * k / n if n else 0.0, 100.0 * lo, 100.0 * hi))
    return out


def few_cells_note(n: int) -> str | None:
    """The note a count of ``n`` cells carries (``None`` from :data:`MIN_CELLS` up)."""
    if n >= MIN_CELLS:
        return None
    return (f"only {n} cell(s) counted; a differential needs at least {MIN_CELLS} cells "
            "(CLSI H20-A2), so these percentages are rough: see the 95% intervals")


def counts_as_dicts(counts: Sequence[ClassCount]) -> list[dict[str, Any]]:
    return [asdict(c) for c in counts]


__all__ = ["MIN_CELLS", "Z95", "ClassCount", "class_counts", "counts_as_dicts", "few_cells_note", "wilson_interval"]
