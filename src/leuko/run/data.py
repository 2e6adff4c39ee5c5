"""From a ``data`` config section to train/val/test samples, reproducibly.

Training and evaluation both call :func:`prepare_data`, so the class filter,
the per-class sample cap and the split are derived the same way from the
same config, and a saved split file pins them exactly.

With ``data.sources`` (several datasets, several labs) the same function
loads each source, maps its labels onto ``data.classes`` with the source's
class map (excluded labels dropped and counted), tags every sample with its
lab (:attr:`Sample.source`), and splits *within* each source (group-aware as
for one dataset), or, with ``data.leave_out``, tests on all of one lab and
trains and validates on the others. Sample keys are relative to the folder
the sources share, so the saved split still applies after they move together.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leuko.data import DatasetIndex, Sample, load_dataset
from leuko.data.classmap import ClassMap
from leuko.data.locate import resolve_data
from leuko.data.splits import ROLES, Split, assign_holdout, make_split
from leuko.data.transforms import Transform, build_transforms
from leuko.errors import LeukoError
from leuko.run.config import DataConfig, TrainConfig


@dataclass
class LoadedSource:
    """One dataset of ``data.sources``, its labels already mapped onto the common classes."""

    name: str
    lab: str
    root: Path
    layout: str
    train_only: bool
    samples: list[Sample]
    dropped: dict[str, int] = field(default_factory=dict)
    """Images left out because the class map excludes their label (label -> count)."""
    skipped: int = 0
    source_roles: dict[str, str] = field(default_factory=dict)

    def summary(self, assignments: dict[str, str], root: Path) -> dict[str, Any]:
        roles = Counter(assignments.get(s.relkey(root), "unused") for s in self.samples)
        return {
            "name": self.name, "lab": self.lab, "root": str(self.root), "layout": self.layout,
            "train_only": self.train_only, "images": len(self.samples), "dropped": dict(sorted(self.dropped.items())),
            "skipped": self.skipped, "roles": {r: roles.get(r, 0) for r in (*ROLES, "unused") if r != "unused" or roles.get(r)},
        }


@dataclass
class PreparedData:
    """A dataset cut into roles, with the class order every output uses."""

    index: DatasetIndex
    split: Split
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    sources: list[LoadedSource] = field(default_factory=list)
    """The datasets of ``data.sources`` (empty for one dataset)."""

    def summary(self) -> dict:
        def counts(items: list[Sample]) -> dict[str, int]:
            out = {c: 0 for c in self.classes}
            for s in items:
                out[s.label] += 1
            return out

        out = {
            "root": str(self.index.root),
            "layout": self.index.layout,
            "classes": self.classes,
            "split": self.split.preset,
            "grouped": self.split.grouped,
            "counts": {"train": counts(self.train), "val": counts(self.val), "test": counts(self.test)},
            "skipped": len(self.index.skipped),
        }
        if self.sources:
            out["sources"] = [s.summary(self.split.assignments, self.index.root) for s in self.sources]
            out["notes"] = list(self.split.notes)
        return out


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
    if cfg.sources:
        return _prepare_sources(cfg, seed=seed, data_path=data_path, split_file=split_file)
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


# --------------------------------------------------------------------------- several sources


def load_sources(cfg: DataConfig, *, seed: int, cap: bool = True) -> tuple[DatasetIndex, list[LoadedSource]]:
    """Every source of ``cfg.sources``, labels mapped onto ``cfg.classes``, as one index (and each on its own).

    The index's root is the folder the sources share; its layout is ``sources``.
    ``cap``: apply ``data.per_class`` (within each source).
    """
    classes = list(cfg.classes or [])
    loaded: list[LoadedSource] = []
    skipped = []
    notes: list[str] = []
    for src in cfg.sources or []:
        name = src.source_name
        path = Path(src.path).expanduser()
        if not path.exists():
            raise LeukoError(f"data.sources: source {name!r}: path does not exist: {path}")
        index = load_dataset(path, src.layout, source_splits=src.source_splits, **src.layout_options)
        cmap = ClassMap.load(src.class_map) if src.class_map else ClassMap()
        samples, dropped = cmap.relabel(index.samples, classes, where=f"source {name!r}", labels=index.classes,
                                        source=src.lab_name)
        if cap and cfg.per_class:
            samples = cap_per_class(samples, cfg.per_class, seed)
        if not samples:
            raise LeukoError(f"data.sources: source {name!r} has no image of the classes {classes} left")
        if dropped:
            notes.append(f"{name}: class map excludes " + ", ".join(f"{k} ({v})" for k, v in sorted(dropped.items())))
        notes += [f"{name}: {n}" for n in index.notes]
        skipped += index.skipped
        loaded.append(LoadedSource(name, src.lab_name, index.root, index.layout, src.train_only, samples,
                                   dict(dropped), len(index.skipped), dict(index.source_roles)))
    root = Path(os.path.commonpath([str(s.root.resolve()) for s in loaded]))
    seen: dict[str, str] = {}
    for src in loaded:
        for s in src.samples:
            other = seen.setdefault(s.relkey(root), src.name)
            if other != src.name:
                raise LeukoError(f"data.sources: sources {other!r} and {src.name!r} both hold {s.relkey(root)}: they overlap")
    samples = [s for src in loaded for s in src.samples]
    return DatasetIndex(root, "sources", samples, classes, skipped, [], notes), loaded


def split_sources(index: DatasetIndex, loaded: list[LoadedSource], cfg: DataConfig, seed: int) -> Split:
    """Train/val/test within each source (the preset of ``cfg.split``, group-aware), or leave one lab out.

    ``train_only`` sources go to training whole; with ``cfg.leave_out`` their lab's train-only
    sources are dropped (neither trained nor tested on). A K-fold preset needs ``cfg.fold``.
    """
    root = index.root
    vf = cfg.val_fraction
    assign: dict[str, str] = {}
    notes: list[str] = []
    preset = cfg.split
    for src in loaded:
        keys = [s.relkey(root) for s in src.samples]
        if cfg.leave_out is not None and src.lab == cfg.leave_out:
            if src.train_only:
                notes.append(f"{src.name}: train_only, left out with lab {src.lab} ({len(keys)} images neither trained nor tested on)")
            else:
                assign.update(dict.fromkeys(keys, "test"))
            continue
        if src.train_only:
            assign.update(dict.fromkeys(keys, "train"))
            others = [o.name for o in loaded if o.lab == src.lab and not o.train_only]
            if others and cfg.leave_out is None:
                notes.append(f"{src.name}: train_only, all {len(keys)} images train; they are copies of cells that file names do not "
                             f"tie to {', '.join(others)}'s, so lab {src.lab}'s val/test may share cells with training: "
                             f"judge {src.lab} by leaving it out (leuko cv --leave-one-lab-out)")
            else:
                notes.append(f"{src.name}: train_only, all {len(keys)} images train")
            continue
        if cfg.leave_out is not None:
            assign.update(assign_holdout(src.samples, root, (1.0 - vf, vf, 0.0), seed))
            continue
        sub = DatasetIndex(root, src.layout, src.samples, sorted({s.label for s in src.samples}), source_roles=src.source_roles)
        grouped = any(s.group is not None for s in src.samples)
        own = preset.removeprefix("group-") if preset.startswith("group-kfold-") and not grouped else preset
        try:
            part = make_split(sub, own, seed=seed, val_fraction=vf)
            if part.folds is not None:
                if cfg.fold is None:
                    raise LeukoError(f"split {preset!r} has {part.n_folds} folds: set data.fold (0..{part.n_folds - 1}) or use 'leuko cv'")
                part = part.fold(cfg.fold, sub, vf)
        except LeukoError as exc:
            raise LeukoError(f"source {src.name!r}: {exc}") from None
        assign.update(part.assignments)
        notes += [f"{src.name}: {n}" for n in part.notes]
    if cfg.leave_out is not None:
        name = f"leave-out-{cfg.leave_out}"
        notes.insert(0, f"lab {cfg.leave_out} is the test set; the other labs split {1 - vf:g}/{vf:g} into train/val within each source")
    else:
        name = f"{preset}[fold {cfg.fold}]" if cfg.fold is not None and "kfold" in preset else preset
        notes.insert(0, f"split {preset} within each source")
    grouped = any(s.group is not None for s in index.samples)
    split = Split(name, seed, grouped, assign, None, vf, notes)
    leaks = split.check_groups(index)
    if leaks:  # pragma: no cover - each source is split group-aware and sources share no group
        raise RuntimeError(f"internal error: groups split across roles: {leaks[:5]}")
    return split


def _prepare_sources(cfg: DataConfig, *, seed: int, data_path: str | Path | None, split_file: Path | None) -> PreparedData:
    if data_path is not None:
        raise LeukoError("--data cannot be used with data.sources: each source names its own path")
    split_seed = cfg.split_seed if cfg.split_seed is not None else seed
    if split_file is None and cfg.split.endswith(".json"):
        split_file = Path(cfg.split)
    index, loaded = load_sources(cfg, seed=split_seed, cap=split_file is None)
    if split_file is not None:
        split = Split.load(split_file)
        if split.folds is not None:
            if cfg.fold is None:
                raise LeukoError(f"split {split.preset!r} has {split.n_folds} folds: set data.fold (0..{split.n_folds - 1}) or use 'leuko cv'")
            split = split.fold(cfg.fold, index, cfg.val_fraction)
    else:
        split = split_sources(index, loaded, cfg, split_seed)
    named = set(split.assignments)
    index = index.subset(s for s in index.samples if s.relkey(index.root) in named)
    train, val, test = (split.samples(index, r) for r in ROLES)
    if not train:
        raise LeukoError("the split leaves no training images")
    missing = [c for c in index.classes if c not in {s.label for s in train}]
    if missing:
        raise LeukoError(f"class(es) {missing} have no training image in any source after the split")
    return PreparedData(index, split, list(index.classes), train, val, test, loaded)


def source_weights(samples: list[Sample], power: float = 1.0, class_power: float = 1.0) -> np.ndarray:
    """Per-sample sampling weights of ``train.sampler: sources`` (mean 1).

    Class ``c`` with ``N_c`` images gets a share of the draws in proportion to ``N_c ** (1 -
    class_power)``: ``class_power`` 1 gives every class the same share (as ``sampler:
    balanced``), 0 leaves classes as they come, 0.5 in proportion to the square root (a class
    of 46 cells, all from one lab, drawn a fifth of the time is learnt cell by cell). Within a
    class, lab ``s`` with ``n_s`` of its images gets a share in proportion to
    ``n_s ** (1 - power)``: ``power`` 1 gives every lab the same share (LISC's 53
    neutrophils weigh as much as PBC's 2,173), 0 leaves labs in proportion to their
    images, 0.5 in proportion to the square root. Samples without a lab count as one lab.
    """
    if not samples:
        return np.zeros(0)
    counts = Counter((s.label, s.source) for s in samples)
    by_class: dict[str, dict[str | None, int]] = defaultdict(dict)
    for (label, lab), n in counts.items():
        by_class[label][lab] = n
    class_raw = {label: float(sum(labs.values())) ** (1.0 - class_power) for label, labs in by_class.items()}
    class_total = sum(class_raw.values())
    share: dict[tuple[str, str | None], float] = {}
    for label, labs in by_class.items():
        raw = {lab: float(n) ** (1.0 - power) for lab, n in labs.items()}
        total = sum(raw.values())
        for lab, n in labs.items():
            share[(label, lab)] = raw[lab] / total / n * class_raw[label] / class_total
    w = np.array([share[(s.label, s.source)] for s in samples])
    return w * len(samples)


def balanced_class_weights(targets: Sequence[int], n_classes: int) -> np.ndarray:
    """``n / (C * count_c)`` per class: the usual "balanced" weights (sklearn's formula); a class without a
    training image counts as one, so its weight stays finite. The loss's ``class_weights: balanced`` and the
    ``balanced`` sampler both read it."""
    counts = np.bincount(np.asarray(targets, dtype=int), minlength=n_classes).astype(float)
    counts[counts == 0] = 1.0
    return len(targets) / (n_classes * counts)


def sampler_weights(train: TrainConfig, samples: list[Sample], targets: Sequence[int], n_classes: int) -> np.ndarray | None:
    """Per-sample draw weights of ``train.sampler`` (``None``: shuffle or in order), one home for training with
    a DataLoader and for training a head on cached features, so both draw the same mix.

    ``balanced``: every class equally often (sklearn's ``n / (C * count_c)``, rounded to float32 as it always
    was, so seeded runs draw what they drew before); ``sources``: :func:`source_weights` with the config's
    ``source_balance`` and ``class_balance``.
    """
    if train.sampler == "balanced":
        w = balanced_class_weights(targets, n_classes).astype(np.float32)
        return w[np.asarray(targets, dtype=int)].astype(np.float64)
    if train.sampler == "sources":
        return source_weights(samples, train.source_balance, train.class_balance)
    return None


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
