"""``leuko finetune``: a finished run taught a new lab from that lab's own labelled cells.

Label-free adaptation (:mod:`leuko.derive.adapt`) moved other labs by a few points; a few dozen labelled
cells of the target lab move them by tens (an EfficientNet fine-tuned with <= 100 target cells scored above
80% on eight target datasets in Chossegros et al., J Pathol Inform 2024). This module turns the cells a
technologist reviewed (any layout, e.g. the ``csv`` export of the lab service) into the lab's own run:

1. the labelled cells, each label one of the run's classes (or reconciled by a class map), at most
   ``shots`` per class (a seeded draw) when asked;
2. whole groups (samples, fields, patients) held out for validation when every class has enough cells:
   the temperature and the review policy are fitted again there, on the new lab's cells;
3. the run's own preprocessing, augmentation and freeze mode; every batch mixes the new lab's cells with
   an equal share of the source lab's training images (*replay*), so a network taught 25 cells per class
   does not forget the lab it came from; its held-out source score is measured before and after;
4. a new run folder (built beside ``--out``, renamed into place) that ``evaluate``, ``predict``,
   ``export``, ``serve`` and ``report`` take, whose card says what it learned from
   (:attr:`leuko.run.card.ModelCard.finetuned`) and whose ``finetune.json`` lists every cell it used,
   so that evaluating it on the same lab leaves those cells out.

A routed run's robust network is fine-tuned (the home network and the gate stay); an ensemble's members
each learn the same cells. The arrays-level step (:func:`finetune_network`) is what ``leuko curve``
(:mod:`leuko.studies.curve`) repeats for every point of a learning curve.
"""

from __future__ import annotations

import copy
import datetime as _dt
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from leuko.data import load_dataset
from leuko.data.classmap import ClassMap
from leuko.data.preprocess import decode_sample
from leuko.data.samples import Sample
from leuko.data.splits import assign_holdout
from leuko.errors import LeukoError
from leuko.infer.backends import ModelInput
from leuko.infer.calibrate import calibrate_logits
from leuko.models.ensemble import Ensemble
from leuko.models.freeze import freeze
from leuko.run.card import HOME_FILE, ROUTE_FILE, ModelCard, ModelKind
from leuko.run.config import RunConfig, load_config
from leuko.run.data import prepare_data, run_transform
from leuko.run.folder import (
    FINETUNE_FILE,
    RunFolder,
    check_new_run,
    derived_run,
    kind_of,
    load_model,
    save_model,
)

MIN_VAL_PER_CLASS = 2
"""Validation is held out only when every class keeps at least this many cells there and >= 2x as many to train."""
VAL_SHARE = 0.2
DEFAULT_STEPS_PER_CELL = 1.0
"""Optimiser steps per labelled training cell (at least :data:`MIN_STEPS`): ~120 steps for 25 cells x 5 classes."""
MIN_STEPS = 60
DEFAULT_LR_FACTOR = 0.2
"""Fine-tuning learning rate = this x the run's own (a trained network needs smaller steps than ImageNet's)."""
REPLAY_PER_CLASS = 60
"""Source-lab training images kept per class for replay (decoded and preprocessed once)."""


@dataclass(frozen=True)
class LabelTargets:
    """How the new lab's labels become the network's classes: ``label -> model class``."""
    targets: dict[str, str]
    notes: list[str] = field(default_factory=list)


def label_targets(model_classes: Sequence[str], lab_classes: Sequence[str], class_map: str | Path | None = None
                  ) -> LabelTargets:
    """Each lab label's training target among ``model_classes``.

    Without a class map every label must be a class of the run. With one, a label is taught as the model
    class of the same name that the map keeps (``merge: {ig: neutrophil}`` teaches ``neutrophil`` as
    ``neutrophil``; ``ig`` keeps its output, untaught by this lab).
    """
    model_classes = list(model_classes)
    if class_map is None:
        unknown = sorted(set(lab_classes) - set(model_classes))
        if unknown:
            raise LeukoError(f"the labelled cells have classes the run does not know: {', '.join(unknown)} (run classes: "
                             f"{', '.join(model_classes)}); give --class-map to reconcile them")
        return LabelTargets({c: c for c in lab_classes})
    cmap = ClassMap.load(class_map)
    cmap.matrix(model_classes, list(lab_classes))  # the same checks as evaluation (unknown names, unreachable labels)
    targets: dict[str, str] = {}
    for label in lab_classes:
        if label in model_classes and label not in cmap.exclude:
            targets[label] = label
            continue
        sources = [c for c in model_classes if cmap.merge.get(c) == label and c not in cmap.exclude]
        if len(sources) != 1:
            raise LeukoError(f"the class map merges {', '.join(sources) or 'nothing'} into {label!r}: fine-tuning needs "
                             f"one run class to teach {label!r} as")
        targets[label] = sources[0]
    notes = [f"excluded by the class map (kept, not taught): {', '.join(cmap.exclude)}"] if cmap.exclude else []
    return LabelTargets(targets, notes)


def draw_shots(samples: Sequence[Sample], shots: int, seed: int, *, at_most_half: bool = False
               ) -> tuple[list[Sample], list[Sample]]:
    """``(drawn, rest)``: at most ``shots`` cells of each class, seeded.

    A class with fewer than ``shots`` cells is an error, unless ``at_most_half`` (the learning curve), where
    such a class gives at most half of its cells so that the rest can still be tested.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise LeukoError(f"--shots must be a positive integer; got {shots!r}")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    chosen: set[int] = set()
    for label in sorted(by_class):
        idx = by_class[label]
        k = shots
        if len(idx) < shots:
            if not at_most_half:
                raise LeukoError(f"class {label!r} has {len(idx)} labelled cells, fewer than --shots {shots}; "
                                 f"lower --shots or label more {label} cells")
            k = len(idx) // 2
        elif at_most_half and len(idx) < 2 * shots:
            k = min(shots, len(idx) // 2)
        chosen.update(int(i) for i in rng.choice(idx, size=k, replace=False)) if k else None
    drawn = [samples[i] for i in sorted(chosen)]
    rest = [s for i, s in enumerate(samples) if i not in chosen]
    return drawn, rest


def hold_out_validation(samples: Sequence[Sample], root: Path, seed: int) -> tuple[list[Sample], list[Sample], str]:
    """``(train, val, how)``: whole groups to validation (stratified) when every class has enough cells."""
    counts = Counter(s.label for s in samples)
    need = int(np.ceil(MIN_VAL_PER_CLASS / VAL_SHARE))
    if min(counts.values()) < need:
        return list(samples), [], (f"no validation part: a class has {min(counts.values())} cells (< {need}); the "
                                   "source lab's temperature and review policy are kept")
    assign = assign_holdout(samples, root, (1.0 - VAL_SHARE, VAL_SHARE, 0.0), seed)
    train = [s for s in samples if assign[s.relkey(root)] == "train"]
    val = [s for s in samples if assign[s.relkey(root)] == "val"]
    val_counts, train_counts = Counter(s.label for s in val), Counter(s.label for s in train)
    if any(val_counts[c] < MIN_VAL_PER_CLASS or train_counts[c] < 2 * MIN_VAL_PER_CLASS for c in counts):
        return list(samples), [], ("no validation part: the groups (samples, fields) are too few or too large to hold "
                                   "some of every class out; the source lab's temperature and review policy are kept")
    grouped = any(s.group for s in samples)
    return train, val, f"{len(val)} cells held out for calibration ({'whole groups' if grouped else 'stratified'})"


@dataclass
class FinetuneOutcome:
    """What :func:`finetune_network` did."""
    steps: int
    lr: float
    replay: int
    seconds: float


def finetune_network(
    model: nn.Module,
    cfg: RunConfig,
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    replay_images: Sequence[np.ndarray] = (),
    replay_labels: np.ndarray | None = None,
    steps: int | None = None,
    lr: float | None = None,
    freeze_mode: str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> FinetuneOutcome:
    """Train ``model`` in place on preprocessed new-lab ``images`` (labels = model class indices).

    Each batch is half new-lab cells (drawn class-balanced) and half ``replay_images`` of the source lab
    (drawn class-balanced) when given; the run's training transform (augmentation included) and freeze
    mode; AdamW at :data:`DEFAULT_LR_FACTOR` x the run's learning rate, cosine-annealed to zero.
    An ensemble trains each member (same cells, its own seed).
    """
    import torch.nn.functional as F


    t0 = time.perf_counter()
    labels = np.asarray(labels, dtype=int)
    if len(labels) != len(images) or not len(labels):
        raise LeukoError(f"fine-tuning needs labelled cells; got {len(images)} images and {len(labels)} labels")
    n_steps = int(steps if steps is not None else max(MIN_STEPS, round(DEFAULT_STEPS_PER_CELL * len(labels))))
    rate = float(lr if lr is not None else DEFAULT_LR_FACTOR * cfg.train.lr)
    batch = min(32, int(cfg.train.batch_size))
    replay = len(replay_images) if replay_labels is not None else 0
    transform = run_transform(cfg.data, model.leuko_info, train=True, seed=seed)  # type: ignore[attr-defined]

    def weights(y: np.ndarray) -> np.ndarray:
        counts = np.bincount(y)
        w = 1.0 / counts[y]
        return w / w.sum()

    students = list(model.members) if isinstance(model, Ensemble) else [model]
    for m, student in enumerate(students):
        torch.manual_seed(seed + m)
        rng = np.random.default_rng(seed + m)
        student.train()
        freeze(student, freeze_mode or cfg.model.freeze)
        params = [q for q in student.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=rate, weight_decay=float(cfg.train.weight_decay))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)
        w_new = weights(labels)
        w_old = weights(np.asarray(replay_labels, dtype=int)) if replay else None
        for _ in range(n_steps):
            n_new = batch // 2 if replay else batch
            pick = rng.choice(len(labels), size=n_new, p=w_new)
            xs = [transform.from_preprocessed(images[i]) for i in pick]
            ys = list(labels[pick])
            if replay:
                old = rng.choice(replay, size=batch - n_new, p=w_old)
                xs += [transform.from_preprocessed(replay_images[i]) for i in old]
                ys += list(np.asarray(replay_labels)[old])
            x = torch.stack(xs).to(device)
            y = torch.as_tensor(np.asarray(ys), dtype=torch.long, device=device)
            loss = F.cross_entropy(student(x), y, label_smoothing=float(cfg.train.label_smoothing))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        student.eval()
    model.eval()
    return FinetuneOutcome(n_steps, rate, replay, time.perf_counter() - t0)


@torch.no_grad()
def array_logits(model: nn.Module, cfg: RunConfig, images: Sequence[np.ndarray], *, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """Raw logits of preprocessed images through the run's evaluation transform (no TTA)."""
    transform = run_transform(cfg.data, model.leuko_info, train=False)  # type: ignore[attr-defined]
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([transform.from_preprocessed(im) for im in images[i:i + batch_size]]).to(device)
        out.append(model(x).float().cpu().numpy())
    n_classes = int(getattr(model, "num_classes", 0) or 0)
    return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)


def decode_all(samples: Sequence[Sample], preprocess: Any, what: str) -> tuple[list[np.ndarray], list[Sample], list[tuple[str, str]]]:
    """Decode and preprocess ``samples`` once: ``(images, readable samples, (key, why) of the rest)``."""
    images, kept, failed = [], [], []
    for s in samples:
        try:
            images.append(decode_sample(s, preprocess))
            kept.append(s)
        except (LeukoError, OSError, ValueError) as exc:
            failed.append((s.key, str(exc).splitlines()[0][:200]))
    if not kept:
        raise LeukoError(f"none of the {len(samples)} {what} could be read")
    return images, kept, failed


def source_heldout(cfg: RunConfig, prepared: Any) -> list[Sample]:
    """The source run's held-out images that measure forgetting: its test split, or its validation split when the
    run left a lab out (its test split is then the lab it never saw, often the very lab being taught now)."""
    if cfg.data.leave_out is not None:
        return list(prepared.val)
    return list(prepared.test or prepared.val)


def replay_pool(cfg: RunConfig, run: RunFolder, preprocess: Any, classes: Sequence[str], seed: int,
                per_class: int = REPLAY_PER_CLASS) -> tuple[list[np.ndarray], np.ndarray, Any]:
    """``(images, labels, prepared)``: up to ``per_class`` source-lab training images of each class, preprocessed,
    and the source run's prepared data (its held-out part measures forgetting)."""
    prepared = prepare_data(cfg.data, seed=cfg.train.seed, split_file=run.split)
    rng = np.random.default_rng(seed)
    c2i = {c: i for i, c in enumerate(classes)}
    by_class: dict[str, list[Sample]] = {}
    for s in prepared.train:
        by_class.setdefault(s.label, []).append(s)
    chosen = []
    for label in sorted(by_class):
        pool = by_class[label]
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), size=min(per_class, len(pool)), replace=False))]
    images, kept, _ = decode_all(chosen, preprocess, "source-lab training images")
    return images, np.array([c2i[s.label] for s in kept]), prepared


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else float("nan")


@dataclass
class LabelledLab:
    """A finished run (its network to teach) and a new lab's labelled cells, checked against each other."""

    run: RunFolder
    kind: ModelKind
    model: nn.Module
    """The network that learns: one network, an ensemble, or a routed run's robust network."""
    card: ModelCard
    cfg: RunConfig
    index: Any
    samples: list[Sample]
    lab_classes: list[str]
    mapping: LabelTargets


def open_lab(run_dir: str | Path, data: str | Path, *, layout: str | None = None,
             layout_options: dict[str, Any] | None = None, class_map: str | Path | None = None) -> LabelledLab:
    """The run and the labelled lab that ``leuko finetune`` and ``leuko curve`` start from.

    Raises:
        LeukoError: no such run or data; fewer than two classes of labelled cells; a label the run does not
            know (without a class map).
    """

    run = RunFolder.open(run_dir)
    kind = kind_of(run.path)
    model, card = load_model(run.model if kind is ModelKind.ROUTED else run.path)
    cfg = load_config(run.config)
    index = load_dataset(data, layout, **(layout_options or {}))
    samples = [s for s in index.samples if s.label and s.label != "?"]
    lab_classes = sorted({s.label for s in samples})
    if len(lab_classes) < 2:
        raise LeukoError(f"{index.root} has labelled cells of {len(lab_classes)} class(es) "
                         f"({', '.join(lab_classes) or 'none'}); fine-tuning needs at least two")
    return LabelledLab(run, kind, model, card, cfg, index, samples, lab_classes,
                       label_targets(card.classes, lab_classes, class_map))


@dataclass
class FinetuneResult:
    """What :func:`finetune_run` wrote and measured."""
    out: Path
    cells: dict[str, dict[str, int]]
    """Per role (``train``, ``val``): cells per lab label."""
    source_before: float
    source_after: float
    val_accuracy: float | None
    seconds: float
    record: dict[str, Any]


def finetune_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    layout: str | None = None,
    layout_options: dict[str, Any] | None = None,
    class_map: str | Path | None = None,
    shots: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    lr: float | None = None,
    replay: bool = True,
    device: str | None = None,
    echo: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune the run at ``run_dir`` on the labelled cells at ``data`` into the new run ``out``.

    Raises:
        LeukoError: ``out`` exists; a label the run does not know (without a class map); ``shots`` larger
            than a class has; fewer than two classes of labelled cells; unreadable data.
    """
    target = check_new_run(out, "a fine-tuned run")
    if target.resolve() == Path(run_dir).expanduser().resolve():
        raise LeukoError("--out must be a new folder, not the run being fine-tuned")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lab = open_lab(run_dir, data, layout=layout, layout_options=layout_options, class_map=class_map)
    run, kind, model, card, cfg, index, samples, mapping = (lab.run, lab.kind, lab.model, lab.card, lab.cfg, lab.index,
                                                            lab.samples, lab.mapping)
    if shots is not None:
        samples, _ = draw_shots(samples, shots, seed)
    train_s, val_s, how = hold_out_validation(samples, index.root, seed)
    echo(f"fine-tuning {run.path.name} ({card.model.display_name}) on {len(samples)} labelled cells of {index.root}: {how}")
    model_input = ModelInput.from_meta(card.input.model_dump())
    c2i = {c: i for i, c in enumerate(card.classes)}
    train_img, train_s, failed = decode_all(train_s, model_input.preprocess, "labelled cells")
    val_img, val_s, failed_val = decode_all(val_s, model_input.preprocess, "validation cells") if val_s else ([], [], [])
    y_train = np.array([c2i[mapping.targets[s.label]] for s in train_s])
    y_val = np.array([c2i[mapping.targets[s.label]] for s in val_s])
    source_img, source_y, prepared = [], None, None
    if replay:
        source_img, source_y, prepared = replay_pool(cfg, run, model_input.preprocess, card.classes, seed)
    held_img, held_y = [], np.zeros(0, int)
    if prepared is None:
        prepared = prepare_data(cfg.data, seed=cfg.train.seed, split_file=run.split)
    heldout = source_heldout(cfg, prepared)
    if heldout:
        held_img, held_kept, _ = decode_all(heldout, model_input.preprocess, "source-lab held-out images")
        held_y = np.array([c2i[s.label] for s in held_kept])
    model.to(dev)
    before = _accuracy(array_logits(model, cfg, held_img, device=dev), held_y) if len(held_y) else float("nan")
    outcome = finetune_network(model, cfg, train_img, y_train, replay_images=source_img, replay_labels=source_y,
                               steps=steps, lr=lr, seed=seed, device=dev)
    after = _accuracy(array_logits(model, cfg, held_img, device=dev), held_y) if len(held_y) else float("nan")
    echo(f"trained {outcome.steps} steps (lr {outcome.lr:g}, {'half of each batch' if outcome.replay else 'no'} "
         f"source-lab replay) in {outcome.seconds:.0f} s")
    echo(f"source lab held-out accuracy ({len(held_y)} images of {Path(prepared.index.root).name}): "
         f"{before:.4f} before, {after:.4f} after fine-tuning")
    temperature, review, val_acc, calibration = card.temperature, card.review, None, None
    if len(y_val) >= 10:
        z = array_logits(model, cfg, val_img, device=dev)
        calibration = calibrate_logits(z, y_val)
        temperature, review = calibration["temperature"], {**calibration["review"],
                                                           "chosen_on": f"{len(y_val)} held-out cells of {index.root.name}"}
        val_acc = _accuracy(z, y_val)
        echo(f"new-lab validation ({len(y_val)} cells): accuracy {val_acc:.4f}; temperature {temperature:.3f}")
    counts = {"train": dict(sorted(Counter(s.label for s in train_s).items())),
              "val": dict(sorted(Counter(s.label for s in val_s).items()))}
    record = {
        "data": str(index.root.resolve()), "layout": index.layout, "class_map": str(class_map) if class_map else None,
        "shots": shots, "seed": seed, "cells": counts, "validation": how, "steps": outcome.steps, "lr": outcome.lr,
        "replay_per_class": REPLAY_PER_CLASS if replay else 0, "freeze": cfg.model.freeze,
        "source_heldout": {"n": int(len(held_y)), "before": before, "after": after},
        "new_lab_val_accuracy": val_acc, "source_run": str(run.path.resolve()),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **({"notes": mapping.notes} if mapping.notes else {}),
    }
    new_card = card.with_(temperature=float(temperature), review=review, finetuned=record)
    with derived_run(target, run) as new:
        save_model(new.model, model.cpu(), new_card)
        if kind is ModelKind.ROUTED:
            shutil.copy2(run.path / HOME_FILE, new.path / HOME_FILE)
            route = run.read_json(ROUTE_FILE)
            route["finetuned"] = f"the robust network, on {record['data']} ({record['date']})"
            new.write_json(ROUTE_FILE, route)
        roles = {s.relkey(index.root): "train" for s in train_s} | {s.relkey(index.root): "val" for s in val_s}
        new.write_json(FINETUNE_FILE, {**record, "used": roles, "failed": failed + failed_val,
                                       "calibration": calibration})
    return FinetuneResult(target, counts, before, after, val_acc, outcome.seconds, record)


def clone(model: nn.Module) -> nn.Module:
    """A deep copy of a network (each point of a learning curve starts from the same weights)."""
    return copy.deepcopy(model)


__all__ = ["FINETUNE_FILE", "FinetuneOutcome", "FinetuneResult", "LabelTargets", "array_logits", "clone", "decode_all",
           "draw_shots", "finetune_network", "finetune_run", "hold_out_validation",
           "label_targets", "open_lab", "replay_pool", "source_heldout"]
