"""Train/validation/test splits that do not leak, saved so a run can be repeated.

Presets:

* ``holdout-70-30``, ``holdout-80-20``, ``holdout-80-10-10``: stratified
  holdouts (the studies' protocols); any ``holdout-<train>-[<val>-]<test>``
  percentages summing to 100 work too.
* ``source``: the dataset's own split (Mooney ``TRAIN``/``TEST``; C-NMC folds
  vs validation), the only leak-free choice when groups are unknown.
* ``kfold-K`` / ``group-kfold-K``: stratified (group) K-fold.

Whenever samples carry a ``group`` (patient, smear field), every split keeps a
group on one side; that is checked, not assumed (:meth:`Split.check_groups`).
All splits are deterministic for a seed and saved as JSON with keys relative
to the dataset root, so a split file still applies after the data moves.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from leuko.data.samples import DatasetIndex, Sample
from leuko.errors import LeukoError

ROLES = ("train", "val", "test")
HOLDOUT_PRESETS: dict[str, tuple[float, float, float]] = {
    "holdout-70-30": (0.7, 0.0, 0.3),
    "holdout-80-20": (0.8, 0.0, 0.2),
    "holdout-80-10-10": (0.8, 0.1, 0.1),
}
_KFOLD = re.compile(r"^(group-)?kfold-(\d+)$")
_HOLDOUT = re.compile(r"^holdout-(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?$")


def holdout_fractions(preset: str) -> tuple[float, float, float] | None:
    """``holdout-70-30`` → (0.7, 0, 0.3); ``holdout-80-10-10`` → (0.8, 0.1, 0.1); else None.

    Any percentages summing to 100 are accepted (``holdout-66.67-33.33``).
    """
    m = _HOLDOUT.match(preset)
    if not m:
        return None
    parts = [float(g) for g in m.groups() if g is not None]
    if abs(sum(parts) - 100.0) > 0.05 or any(p <= 0 for p in parts):
        raise LeukoError(f"split {preset!r}: percentages must be positive and sum to 100")
    if len(parts) == 2:
        return (parts[0] / 100, 0.0, parts[1] / 100)
    return (parts[0] / 100, parts[1] / 100, parts[2] / 100)
SPLIT_FORMAT = 1


def split_presets() -> list[str]:
    """Names accepted by :func:`make_split` (K-fold shown with K=5)."""
    return [*HOLDOUT_PRESETS, "source", "kfold-5", "group-kfold-5"]


@dataclass
class Split:
    """Which role (train/val/test) each sample has, or which fold it is in.

    ``assignments`` maps a sample's key relative to the dataset root to a
    role; for K-fold splits ``folds`` maps it to a fold number and
    :meth:`fold` turns fold ``k`` into a holdout.
    """

    preset: str
    seed: int
    grouped: bool
    assignments: dict[str, str] = field(default_factory=dict)
    folds: dict[str, int] | None = None
    val_fraction: float = 0.0
    notes: list[str] = field(default_factory=list)

    # ---- applying -------------------------------------------------------
    def samples(self, index: DatasetIndex, role: str) -> list[Sample]:
        """The samples of ``index`` with ``role`` (``train``/``val``/``test``), in index order."""
        if role not in ROLES:
            raise LeukoError(f"split role must be one of {', '.join(ROLES)}; got {role!r}")
        if self.folds is not None and not self.assignments:
            raise LeukoError(f"split {self.preset!r} is a K-fold split: choose a fold first")
        self._check_matches(index)
        return [s for s in index.samples if self.assignments.get(s.relkey(index.root)) == role]

    def counts(self, index: DatasetIndex) -> dict[str, dict[str, int]]:
        """Per-role class counts (for summaries and tests)."""
        out: dict[str, dict[str, int]] = {}
        for role in ROLES:
            c = Counter(s.label for s in self.samples(index, role))
            if c:
                out[role] = {k: c.get(k, 0) for k in index.classes}
        return out

    def _check_matches(self, index: DatasetIndex) -> None:
        keys = {s.relkey(index.root) for s in index.samples}
        wanted = set(self.assignments) if self.assignments else set(self.folds or {})
        missing = wanted - keys
        if missing:
            example = sorted(missing)[0]
            raise LeukoError(
                f"split file names {len(missing)} sample(s) not in the dataset (e.g. {example}): "
                "it was made for other data"
            )

    @property
    def n_folds(self) -> int:
        return 0 if self.folds is None else max(self.folds.values()) + 1

    def fold(self, k: int, index: DatasetIndex, val_fraction: float | None = None) -> "Split":
        """Holdout for fold ``k``: fold ``k`` is the test set, the rest train (and val)."""
        if self.folds is None:
            raise LeukoError(f"split {self.preset!r} has no folds")
        if not 0 <= k < self.n_folds:
            raise LeukoError(f"fold must be in 0..{self.n_folds - 1}; got {k}")
        vf = self.val_fraction if val_fraction is None else val_fraction
        self._check_matches(index)
        train = [s for s in index.samples if self.folds.get(s.relkey(index.root), -1) != k]
        train = [s for s in train if s.relkey(index.root) in self.folds]
        assign = {s.relkey(index.root): "test" for s in index.samples if self.folds.get(s.relkey(index.root)) == k}
        assign.update(assign_holdout(train, index.root, (1.0 - vf, vf, 0.0), self.seed + 1000 + k))
        return Split(f"{self.preset}[fold {k}]", self.seed, self.grouped, assign, None, vf, list(self.notes))

    def check_groups(self, index: DatasetIndex) -> list[str]:
        """Groups that appear in more than one role (must be empty for a grouped split)."""
        roles_of: dict[str, set[str]] = defaultdict(set)
        for s in index.samples:
            role = self.assignments.get(s.relkey(index.root))
            if role is not None and s.group is not None:
                roles_of[s.group].add(role)
        return sorted(g for g, r in roles_of.items() if len(r) > 1)

    # ---- persistence ----------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": SPLIT_FORMAT,
            "preset": self.preset,
            "seed": self.seed,
            "grouped": self.grouped,
            "val_fraction": self.val_fraction,
            "notes": self.notes,
            "assignments": dict(sorted(self.assignments.items())),
            "folds": None if self.folds is None else dict(sorted(self.folds.items())),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Split":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LeukoError(f"split file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LeukoError(f"split file {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != SPLIT_FORMAT:
            raise LeukoError(f"split file {path} is not a leuko split (format {SPLIT_FORMAT})")
        bad = {v for v in raw.get("assignments", {}).values()} - set(ROLES)
        if bad:
            raise LeukoError(f"split file {path} has unknown roles {sorted(bad)}")
        return cls(
            preset=str(raw["preset"]),
            seed=int(raw["seed"]),
            grouped=bool(raw["grouped"]),
            assignments=dict(raw.get("assignments") or {}),
            folds=None if raw.get("folds") is None else {k: int(v) for k, v in raw["folds"].items()},
            val_fraction=float(raw.get("val_fraction", 0.0)),
            notes=list(raw.get("notes", [])),
        )


def make_split(index: DatasetIndex, preset: str, seed: int = 0, val_fraction: float = 0.0) -> Split:
    """Split ``index`` by ``preset`` (see module doc); group-aware whenever groups exist.

    ``val_fraction`` carves a validation set out of the training part (of
    presets that have none), keeping groups and class proportions.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LeukoError(f"val_fraction must be in [0, 1); got {val_fraction}")
    samples = index.samples
    if not samples:
        raise LeukoError("cannot split an empty dataset")
    grouped = any(s.group is not None for s in samples)
    root = index.root
    fractions = holdout_fractions(preset)
    if fractions is not None:
        tr, va, te = fractions
        if va == 0.0 and val_fraction > 0.0:
            tr, va = tr * (1 - val_fraction), tr * val_fraction
        assign = assign_holdout(samples, root, (tr, va, te), seed)
        split = Split(preset, seed, grouped, assign, None, val_fraction)
    elif preset == "source":
        split = _source_split(index, seed, val_fraction, grouped)
    else:
        m = _KFOLD.match(preset)
        if not m:
            raise LeukoError(f"unknown split preset {preset!r}; choose one of: {', '.join(split_presets())} (any K >= 2)")
        k = int(m.group(2))
        if k < 2:
            raise LeukoError(f"K-fold needs K >= 2; got {preset!r}")
        if m.group(1) and not grouped:
            raise LeukoError(f"{preset!r} needs groups (patients, smear fields) and this dataset has none; use kfold-{k}")
        folds = _assign_folds(samples, root, k, seed, grouped)
        split = Split(preset, seed, grouped, {}, folds, val_fraction)
    if grouped and split.assignments:
        leaks = split.check_groups(index)
        if leaks:  # pragma: no cover - the algorithms above never do this
            raise RuntimeError(f"internal error: groups split across roles: {leaks[:5]}")
    return split


def _groups(samples: Sequence[Sample]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        out[s.group_key].append(i)
    return out


def assign_holdout(
    samples: Sequence[Sample], root: Path, fractions: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """Greedy stratified group assignment to (train, val, test) fractions.

    Groups are visited largest first (random order among equals, from
    ``seed``) and each goes to the role whose per-class deficit, weighted by
    the group's class mix, is largest. With one sample per group this yields
    exact stratified proportions; with groups it keeps them whole.
    """
    if not samples:
        return {}
    fr = np.asarray(fractions, dtype=float)
    fr = fr / fr.sum()
    classes = sorted({s.label for s in samples})
    cidx = {c: i for i, c in enumerate(classes)}
    totals = np.zeros(len(classes))
    for s in samples:
        totals[cidx[s.label]] += 1
    target = fr[:, None] * totals[None, :]
    current = np.zeros_like(target)
    groups = _groups(samples)
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    order = rng.permutation(len(names))
    keyed = sorted(((-len(groups[names[i]]), pos, names[i]) for pos, i in enumerate(order)))
    assign: dict[str, str] = {}
    active = [r for r in range(3) if fr[r] > 0]
    for _, _, g in keyed:
        members = groups[g]
        vec = np.zeros(len(classes))
        for i in members:
            vec[cidx[samples[i].label]] += 1
        # deficit of each role for this group's classes, relative to the role's size
        scores = [(float(((target[r] - current[r]) * vec).sum()) / max(fr[r], 1e-9), -r) for r in active]
        best = max(scores)[1] * -1
        current[best] += vec
        for i in members:
            assign[samples[i].relkey(root)] = ROLES[best]
    return assign


def _assign_folds(samples: Sequence[Sample], root: Path, k: int, seed: int, grouped: bool) -> dict[str, int]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = [s.label for s in samples]
    counts = Counter(y)
    if min(counts.values()) < k and not grouped:
        small = min(counts, key=counts.get)  # type: ignore[arg-type]
        raise LeukoError(f"class {small!r} has {counts[small]} images, fewer than the {k} folds asked for")
    x = np.zeros(len(samples))
    if grouped:
        groups = [s.group_key for s in samples]
        n_groups = len(set(groups))
        if n_groups < k:
            raise LeukoError(f"only {n_groups} groups for {k} folds")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        it = splitter.split(x, y, groups)
    else:
        it = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y)
    folds: dict[str, int] = {}
    for f, (_, test_idx) in enumerate(it):
        for i in test_idx:
            folds[samples[i].relkey(root)] = f
    return folds


def _role_of_source(name: str, roles: dict[str, str]) -> str:
    if name in roles:
        return roles[name]
    low = name.lower()
    if "train" in low:
        return "train"
    if "val" in low:
        return "val"
    if "test" in low:
        return "test"
    return "exclude"


def _source_split(index: DatasetIndex, seed: int, val_fraction: float, grouped: bool) -> Split:
    missing = [s for s in index.samples if s.source_split is None]
    if missing:
        raise LeukoError(
            f"split 'source' needs the dataset's own split, and {len(missing)} sample(s) have none "
            f"(layout {index.layout!r}); use a holdout or K-fold preset"
        )
    root = index.root
    assign: dict[str, str] = {}
    by_role: dict[str, list[Sample]] = defaultdict(list)
    excluded: Counter[str] = Counter()
    for s in index.samples:
        role = _role_of_source(s.source_split or "", index.source_roles)
        if role == "exclude":
            excluded[s.source_split or ""] += 1
            continue
        by_role[role].append(s)
    if not by_role.get("train") or not by_role.get("test"):
        raise LeukoError(
            f"split 'source' needs both a training and a test part; found {sorted(by_role) or 'none'} "
            f"in source splits {sorted(index.source_split_counts())}"
        )
    for role, items in by_role.items():
        assign.update({s.relkey(root): role for s in items})
    if val_fraction > 0 and not by_role.get("val"):
        assign.update(assign_holdout(by_role["train"], root, (1 - val_fraction, val_fraction, 0.0), seed))
    notes = [f"excluded source split {k} ({v} images)" for k, v in sorted(excluded.items())]
    return Split("source", seed, grouped, assign, None, val_fraction, notes)
