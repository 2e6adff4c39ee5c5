"""Class maps: how a model's classes become another dataset's (another lab's) classes.

A class map (YAML or JSON)::

    merge:   {ig: neutrophil}          # model class -> target class (probabilities add up)
    exclude: [platelet, erythroblast]  # model classes removed from the argmax

Target classes the model lacks are an error; model classes the target lacks must be merged or excluded.
It lives in ``data`` because it is a fact about label sets, used by evaluation, adaptation and fine-tuning alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from leuko.data.samples import Sample
from leuko.errors import LeukoError


SHIPPED_ALIASES = {"pbc-to-bccd": "pbc-to-five"}
"""Older names of shipped class maps: ``pbc-to-bccd`` was named for the one five-type lab on disk."""


@dataclass
class ClassMap:
    """How model classes become target classes."""

    merge: dict[str, str] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> "ClassMap":
        """Read a class map file, or a shipped one by name (``pbc-to-five``, alias ``pbc-to-bccd``)."""
        p = Path(path)
        if not p.is_file():
            from leuko.recipes import RECIPES_DIR

            name = SHIPPED_ALIASES.get(str(path), str(path))
            shipped = RECIPES_DIR / "classmaps" / f"{name}.yaml"
            if not shipped.is_file():
                names = sorted([q.stem for q in (RECIPES_DIR / "classmaps").glob("*.yaml")] + list(SHIPPED_ALIASES))
                raise LeukoError(f"class map not found: {p} (shipped maps: {', '.join(names)})")
            p = shipped
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LeukoError(f"class map {p} is not valid YAML/JSON: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - {"merge", "exclude"}:
            raise LeukoError(f"class map {p} must have only 'merge' (mapping) and 'exclude' (list) keys")
        merge = raw.get("merge") or {}
        exclude = raw.get("exclude") or []
        if not isinstance(merge, dict) or not isinstance(exclude, list):
            raise LeukoError(f"class map {p}: 'merge' must be a mapping and 'exclude' a list")
        return cls({str(k): str(v) for k, v in merge.items()}, [str(x) for x in exclude])

    def matrix(self, model_classes: list[str], target_classes: list[str]) -> tuple[np.ndarray, list[str]]:
        """``(M, notes)``: target probabilities = renormalised ``probs @ M`` (M is model x target)."""
        unknown = sorted((set(self.merge) | set(self.exclude)) - set(model_classes))
        if unknown:
            raise LeukoError(f"class map names {unknown}, which the model does not have ({model_classes})")
        bad_targets = sorted(set(self.merge.values()) - set(target_classes))
        if bad_targets:
            raise LeukoError(f"class map merges into {bad_targets}, which the evaluation data does not have ({target_classes})")
        lacking = sorted(set(target_classes) - {self.merge.get(c, c) for c in model_classes if c not in self.exclude})
        if lacking:
            raise LeukoError(
                f"the data has classes the model cannot predict: {lacking} (model classes: {model_classes})"
            )
        m = np.zeros((len(model_classes), len(target_classes)))
        notes = []
        t_index = {c: i for i, c in enumerate(target_classes)}
        for i, c in enumerate(model_classes):
            if c in self.exclude:
                notes.append(f"model class {c!r} excluded from the argmax")
                continue
            target = self.merge.get(c, c)
            if target not in t_index:
                raise LeukoError(
                    f"model class {c!r} is not in the evaluation data; merge it (merge: {{{c}: <class>}}) or exclude it in a class map"
                )
            if target != c:
                notes.append(f"model class {c!r} merged into {target!r}")
            m[i, t_index[target]] = 1.0
        return m, notes

    def label_map(self, labels: list[str], classes: list[str], *, where: str = "the data") -> dict[str, str | None]:
        """How a dataset's labels become ``classes`` (training on several labs): label → class, ``None`` = dropped.

        The same file read the other way round: ``merge`` renames a label (``ig: neutrophil``: PBC's immature
        granulocytes are trained as neutrophils), ``exclude`` drops its images. A label that ends up outside
        ``classes`` is an error naming it, so no class disappears silently.
        """
        unknown = sorted((set(self.merge) | set(self.exclude)) - set(labels))
        if unknown:
            raise LeukoError(f"class map for {where} names {unknown}, which {where} does not have ({sorted(labels)})")
        out: dict[str, str | None] = {}
        lost = []
        for label in labels:
            target = None if label in self.exclude else self.merge.get(label, label)
            if target is not None and target not in classes:
                lost.append(label if target == label else f"{label} (merged into {target})")
            out[label] = target
        if lost:
            raise LeukoError(f"{where} has label(s) {lost} outside the classes {classes}: merge or exclude them in its class_map")
        return out

    def relabel(self, samples: Sequence[Sample], classes: list[str], *, where: str = "the data",
                labels: Iterable[str] = (), source: str | None = None) -> tuple[list[Sample], Counter[str]]:
        """``(kept, dropped)``: ``samples`` with their labels mapped onto ``classes`` by :meth:`label_map`.

        The one place a dataset's labels are read the other way round (training on several labs, scoring a
        five-type model on an eight-class lab): merged labels are renamed, excluded ones dropped and counted per
        label, so a report can say what left. ``labels``: the dataset's classes beyond those its samples carry
        (a class folder may be empty); ``source``: the lab to record on every kept sample.
        """
        mapping = self.label_map(sorted(set(labels) | {s.label for s in samples}), classes, where=where)
        kept: list[Sample] = []
        dropped: Counter[str] = Counter()
        for s in samples:
            target = mapping[s.label]
            if target is None:
                dropped[s.label] += 1
            else:
                kept.append(replace(s, label=target, source=s.source if source is None else source))
        return kept, dropped


def map_probs(probs: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Target-class probabilities: merged classes add up, excluded ones drop out, rows renormalised."""
    out = probs @ m
    s = out.sum(axis=1, keepdims=True)
    s[s <= 0] = 1.0
    return out / s
