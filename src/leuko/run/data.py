"""From a ``data`` config section to train/val/test samples, reproducibly.

Training and evaluation both call :func:`prepare_data`, so the class filter,
the per-class sample cap and the split are derived the same way from the
same config, and a saved split file pins them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leuko.data import DatasetIndex, Sample, load_dataset
from leuko.data.locate import resolve_data
from leuko.data.splits import Split, make_split
from leuko.data.transforms import Transform, build_transforms
from leuko.errors import LeukoError
from leuko.run.config import DataConfig


@dataclass
class PreparedData:
    """A dataset cut into roles, with the class order every output uses."""

    index: DatasetIndex
    split: Split
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def summary(self) -> dict:
        def counts(items: list[Sample]) -> dict[str, int]:
            out = {c: 0 for c in self.classes}
            for s in items:
                out[s.label] += 1
            return out

        return {
            "root": str(self.index.root),
            "layout": self.index.layout,
            "classes": self.classes,
            "split": self.split.preset,
            "grouped": self.split.grouped,
            "counts": {"train": counts(self.train), "val": counts(self.val), "test": counts(self.test)},
            "skipped": len(self.index.skipped),
        }


def load_index(cfg: DataConfig, data_path: str | Path | None = None) -> DatasetIndex:
    """The dataset named by the config (path precedence: argument, ``data.path``, lookup by name)."""
    path = resolve_data(cfg.dataset, data_path if data_path is not None else cfg.path)
    index = load_dataset(path, cfg.layout, source_splits=cfg.source_splits, **cfg.layout_options)
    if cfg.classes:
        unknown = sorted(set(cfg.classes) - set(index.classes))
        if unknown:
            raise LeukoError(f"data.classes {unknown} not in the dataset; it has {index.classes}")
        keep = set(cfg.classes)
        index = index.subset(s for s in index.samples if s.label in keep)
        index.classes = list(cfg.classes)
    return index


def cap_per_class(samples: list[Sample], per_class: int, seed: int) -> list[Sample]:
    """At most ``per_class`` samples of each class, chosen at random (seeded), in index order.

    Whole groups are kept together so a cap never splits a patient.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[str, dict[str, list[int]]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, {}).setdefault(s.group_key, []).append(i)
    keep: set[int] = set()
    for _, groups in sorted(by_class.items()):
        names = sorted(groups)
        for gi in rng.permutation(len(names)):
            members = groups[names[gi]]
            taken = sum(1 for i in keep if samples[i].label == samples[members[0]].label)
            if taken + len(members) > per_class and taken > 0:
                continue
            keep.update(members)
    return [s for i, s in enumerate(samples) if i in keep]


def prepare_data(
    cfg: DataConfig,
    *,
    seed: int,
    data_path: str | Path | None = None,
    split_file: Path | None = None,
) -> PreparedData:
    """Load, filter, cap and split the data of a run.

    ``split_file`` (a run's ``split.json``) overrides ``cfg.split`` so a run is
    evaluated or resumed on exactly the samples it was trained on.
    """
    index = load_index(cfg, data_path)
    split_seed = cfg.split_seed if cfg.split_seed is not None else seed
    if split_file is None and cfg.split.endswith(".json"):
        split_file = Path(cfg.split)
    if split_file is not None:
        split = Split.load(split_file)
    else:
        if cfg.per_class:
            index = index.subset(cap_per_class(index.samples, cfg.per_class, split_seed))
        split = make_split(index, cfg.split, seed=split_seed, val_fraction=cfg.val_fraction)
    if split.folds is not None:
        if cfg.fold is None:
            raise LeukoError(f"split {split.preset!r} has {split.n_folds} folds: set data.fold (0..{split.n_folds - 1}) or use 'leuko cv'")
        split = split.fold(cfg.fold, index, cfg.val_fraction)
    keys = {s.relkey(index.root) for s in index.samples}
    named = set(split.assignments)
    if split_file is not None:
        index = index.subset(s for s in index.samples if s.relkey(index.root) in named)
    elif not named <= keys:  # pragma: no cover - make_split only names known samples
        raise LeukoError("split names samples that are not in the dataset")
    train = split.samples(index, "train")
    val = split.samples(index, "val")
    test = split.samples(index, "test")
    if not train:
        raise LeukoError("the split leaves no training images")
    missing = sorted({s.label for s in index.samples} - {s.label for s in train})
    if missing:
        raise LeukoError(f"class(es) {missing} have no training image after the split")
    return PreparedData(index, split, list(index.classes), train, val, test)


def run_transform(cfg: DataConfig, info: Any, *, train: bool, seed: int | None = None) -> Transform:
    """The transform of a run: the config's size, resize, preprocessing (and augmentation when
    ``train``), with the model's normalisation. One place, so training, features and calibration agree."""
    return build_transforms(
        cfg.image_size,
        train=train,
        augment=cfg.augment if train else "none",
        preprocess=cfg.preprocess,
        mean=info.mean,
        std=info.std,
        resize=cfg.resize,
        seed=seed,
    )
