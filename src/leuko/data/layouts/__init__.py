"""Dataset layouts: one module per on-disk layout, one registry, one entry point.

Every layout turns a folder (or manifest) into a :class:`~leuko.data.samples.DatasetIndex`
of :class:`~leuko.data.samples.Sample` records. :func:`load_dataset` is the
only function the rest of leuko calls; it validates the arguments, picks the
layout (given or detected), and applies the checks every layout shares
(no samples, empty classes, unusable files, ``strict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from leuko.data.samples import DatasetIndex
from leuko.errors import LeukoError

LoadFn = Callable[..., DatasetIndex]
DetectFn = Callable[[Path], bool]


@dataclass(frozen=True)
class LayoutSpec:
    """A registered layout: how to recognise it and how to read it."""

    name: str
    description: str
    load: LoadFn
    detect: DetectFn
    priority: int  # lower is tried first by detection


_REGISTRY: dict[str, LayoutSpec] = {}


def register_layout(name: str, description: str, detect: DetectFn, priority: int = 50) -> Callable[[LoadFn], LoadFn]:
    """Decorator registering ``load(root, **options) -> DatasetIndex`` under ``name``."""

    def deco(fn: LoadFn) -> LoadFn:
        _REGISTRY[name] = LayoutSpec(name, description, fn, detect, priority)
        return fn

    return deco


def list_layouts() -> list[LayoutSpec]:
    """Registered layouts, in detection order."""
    _ensure_loaded()
    return sorted(_REGISTRY.values(), key=lambda s: (s.priority, s.name))


def get_layout(name: str) -> LayoutSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        names = ", ".join(s.name for s in list_layouts())
        raise LeukoError(f"unknown layout {name!r}; choose one of: {names} (or 'auto')") from None


def detect_layout(path: Path) -> str:
    """Name of the first layout (by priority) that recognises ``path``."""
    for spec in list_layouts():
        try:
            if spec.detect(path):
                return spec.name
        except OSError:
            continue
    raise LeukoError(
        f"cannot tell the layout of {path}: expected class sub-folders of images, "
        "a CSV manifest, or one of the known layouts (use --layout to choose)"
    )


def load_dataset(
    path: str | Path,
    layout: str | None = None,
    *,
    strict: bool = False,
    verify: str = "header",
    allow_empty_classes: bool = False,
    **options: Any,
) -> DatasetIndex:
    """Read a dataset into sample records.

    Args:
        path: dataset folder, or a ``.csv`` manifest for the ``csv`` layout.
        layout: a registered layout name, or ``None``/``"auto"`` to detect it.
        strict: make any unusable file an error instead of a skipped warning.
        allow_empty_classes: report class folders without usable images in
            ``index.empty_classes`` instead of failing (``inspect`` uses this).
        verify: ``"header"`` (fast: the file opens as an image), ``"full"``
            (decode every image to catch truncation) or ``"none"``.
        options: layout-specific options (e.g. ``margin`` for ``bccd``,
            ``source_splits`` to keep only some of a dataset's own splits).

    Raises:
        LeukoError: missing path, unknown layout, no images, an empty class,
            or (with ``strict``) any unusable file.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise LeukoError(f"dataset path does not exist: {root}")
    if verify not in ("header", "full", "none"):
        raise LeukoError(f"verify must be 'header', 'full' or 'none'; got {verify!r}")
    name = detect_layout(root) if layout in (None, "auto") else layout
    spec = get_layout(name)  # type: ignore[arg-type]
    source_splits = options.pop("source_splits", None)
    try:
        index = spec.load(root, verify=verify, **options)
    except TypeError as exc:
        raise LeukoError(f"layout {spec.name!r} does not accept these options: {exc}") from None
    if source_splits:
        wanted = {str(s).lower(): str(s) for s in source_splits}
        known = {s.source_split for s in index.samples if s.source_split}
        missing = sorted(v for k, v in wanted.items() if k not in {x.lower() for x in known})
        if missing:
            raise LeukoError(
                f"source_splits {missing} not found in {root}; it has {sorted(known) or 'none'}"
            )
        index.samples = [s for s in index.samples if s.source_split and s.source_split.lower() in wanted]
    if strict and index.skipped:
        first = index.skipped[0]
        more = f" (and {len(index.skipped) - 1} more)" if len(index.skipped) > 1 else ""
        raise LeukoError(f"unusable file {first.path}: {first.reason}{more}")
    if index.empty_classes and (strict or not allow_empty_classes):
        raise LeukoError(f"class folder(s) with no usable image in {root}: {', '.join(index.empty_classes)}")
    if not index.samples:
        raise LeukoError(f"no usable images found in {root} (layout {spec.name!r})")
    return index


def _ensure_loaded() -> None:
    # Importing the modules registers them; done lazily to avoid import cycles.
    from leuko.data.layouts import bccd, cnmc, csv_manifest, folder, mooney, pbc  # noqa: F401


__all__ = [
    "LayoutSpec",
    "detect_layout",
    "get_layout",
    "list_layouts",
    "load_dataset",
    "register_layout",
]
