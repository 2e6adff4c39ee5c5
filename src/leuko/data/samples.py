"""The one record type every layout produces and everything downstream reads.

A :class:`Sample` is one cell image: a file, or a crop of a file (BCCD smears
hold one or more white cells per field). Keeping this record small and the
same for every layout is what lets splits, audits, training and evaluation
ignore where the data came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Sample:
    """One labelled cell image.

    Attributes:
        path: image file on disk.
        label: class name (lower case, e.g. ``"neutrophil"``).
        group: what must never be split across train/test: a patient
            (C-NMC subject), a smear field (BCCD image), or ``None`` when each
            image is its own cell.
        subtype: finer label when the source has one (PBC ``SNE``/``BNE``).
        source_split: the dataset's own split (Mooney ``TRAIN``/``TEST``).
        crop: ``(left, top, right, bottom)`` in source pixels when the sample
            is a region of ``path`` rather than the whole file.
        source: the lab the image comes from when a run reads several
            datasets (``data.sources``: ``pbc``, ``bccd``, ``lisc``); ``None``
            for a single dataset. Layouts leave it unset; :mod:`leuko.run.data`
            sets it. Splits are made within each source, balancing and
            leave-one-lab-out use it, and evaluation breaks metrics down by it.
    """

    path: Path
    label: str
    group: str | None = None
    subtype: str | None = None
    source_split: str | None = None
    crop: Box | None = None
    source: str | None = None

    @property
    def key(self) -> str:
        """A stable identity: the path, plus the crop box for crops."""
        base = str(self.path)
        if self.crop is None:
            return base
        return base + "#" + ",".join(str(v) for v in self.crop)

    def relkey(self, root: Path) -> str:
        """:attr:`key` relative to ``root``, so split files survive moving the dataset."""
        try:
            base = self.path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            base = str(self.path)
        if self.crop is None:
            return base
        return base + "#" + ",".join(str(v) for v in self.crop)

    @property
    def group_key(self) -> str:
        """Group to keep together in splits; a sample without one is its own group."""
        return self.group if self.group is not None else "sample:" + self.key


@dataclass(frozen=True)
class SkippedItem:
    """A file or annotation a layout could not use, and why (shown by ``inspect``)."""

    path: Path
    reason: str


@dataclass
class DatasetIndex:
    """What a layout found: samples, the class order, and what it skipped.

    ``classes`` is sorted so that the label → index mapping is the same on
    every machine; ``empty_classes`` lists class folders with no usable image.
    """

    root: Path
    layout: str
    samples: list[Sample]
    classes: list[str]
    skipped: list[SkippedItem] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source_roles: dict[str, str] = field(default_factory=dict)
    """How the ``source`` split preset uses each ``source_split`` value
    (``train``/``val``/``test``/``exclude``); empty means guess from the name."""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def class_to_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def targets(self) -> list[int]:
        """Integer labels in :attr:`classes` order."""
        lookup = self.class_to_index
        return [lookup[s.label] for s in self.samples]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.samples)
        return {c: counts.get(c, 0) for c in self.classes}

    def subtype_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = {}
        for s in self.samples:
            if s.subtype is not None:
                out.setdefault(s.label, Counter())[s.subtype] += 1
        return {label: dict(sorted(c.items())) for label, c in sorted(out.items())}

    def source_split_counts(self) -> dict[str, int]:
        counts = Counter(s.source_split for s in self.samples if s.source_split is not None)
        return dict(sorted(counts.items()))

    def subset(self, samples: Iterable[Sample]) -> "DatasetIndex":
        """A view on some of the samples, keeping the class order."""
        return DatasetIndex(
            root=self.root,
            layout=self.layout,
            samples=list(samples),
            classes=list(self.classes),
            skipped=list(self.skipped),
            empty_classes=list(self.empty_classes),
            notes=list(self.notes),
            source_roles=dict(self.source_roles),
        )


def sorted_classes(labels: Sequence[str]) -> list[str]:
    """Class order used everywhere: sorted, unique."""
    return sorted(set(labels))
