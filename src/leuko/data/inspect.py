"""What is in a dataset, and what in it cannot be used.

:func:`inspect_dataset` reads a dataset with full decoding (so truncated
JPEGs are caught, not just files that fail to open) and summarises classes,
sub-types, source splits, image sizes, modes and formats. The CLI prints the
report; notebooks can use the dataclass directly.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from leuko.data.imageio import ImageInfo, check_image
from leuko.data.layouts import load_dataset
from leuko.data.samples import DatasetIndex, SkippedItem


@dataclass
class InspectReport:
    """Summary of one dataset (JSON-serialisable via :meth:`to_dict`)."""

    root: str
    layout: str
    n_samples: int
    n_files: int
    class_counts: dict[str, int]
    subtype_counts: dict[str, dict[str, int]]
    source_split_counts: dict[str, int]
    sizes: dict[str, int]
    modes: dict[str, int]
    formats: dict[str, int]
    crop_sizes: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _top(counter: Counter[str], n: int = 10) -> dict[str, int]:
    return dict(counter.most_common(n))


def inspect_dataset(path: str | Path, layout: str | None = None, **options: object) -> tuple[InspectReport, DatasetIndex]:
    """Read ``path`` with full decoding and summarise it.

    Unusable files never raise here: they are listed in ``skipped`` with a
    reason, and so are class folders with no usable image. Whether that is an
    error (``--strict``) is the caller's decision.
    """
    index = load_dataset(path, layout, verify="full", allow_empty_classes=True, **options)  # type: ignore[arg-type]
    files = sorted({s.path for s in index.samples})
    with ThreadPoolExecutor(max_workers=4) as pool:
        infos: list[ImageInfo | None] = [r[0] for r in pool.map(lambda p: check_image(p, full_decode=False), files)]
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    for info in infos:
        if info is None:
            continue
        sizes[f"{info.width}x{info.height}"] += 1
        modes[info.mode] += 1
        formats[info.format] += 1
    crops: Counter[str] = Counter()
    for s in index.samples:
        if s.crop is not None:
            side = s.crop[2] - s.crop[0]
            lo = (side // 50) * 50
            crops[f"{lo}-{lo + 49}px"] += 1
    report = InspectReport(
        root=str(index.root),
        layout=index.layout,
        n_samples=len(index.samples),
        n_files=len(files),
        class_counts=index.class_counts(),
        subtype_counts=index.subtype_counts(),
        source_split_counts=index.source_split_counts(),
        sizes=_top(sizes),
        modes=dict(modes),
        formats=dict(formats),
        crop_sizes=dict(sorted(crops.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        skipped=[(_rel(item, index.root), item.reason) for item in index.skipped],
        empty_classes=list(index.empty_classes),
        notes=list(index.notes),
    )
    return report, index


def _rel(item: SkippedItem, root: Path) -> str:
    try:
        return item.path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(item.path)
