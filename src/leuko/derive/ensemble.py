"""``leuko ensemble RUN RUN [RUN...] --out RUN``: trained runs of one lab and split averaged into one network.

Deep ensembles (Lakshminarayanan et al., 2017) are the most reliable way known
to buy accuracy and calibration under a change of lab (Ovadia et al., 2019):
networks that differ only in their seed make different mistakes on images
unlike their training data. The price is inference time (one forward pass
per member) and a CPU training run per member.

The ensemble run is the first member's record (configuration, split, data
description, training history) with an :class:`~leuko.models.ensemble.Ensemble`
in ``model.pt`` whose temperature and review thresholds are fitted on that
split's validation images, and ``ensemble.json`` naming the members and
their validation accuracies. Its held-out split is the first member's, so no
member may have trained on it or chosen a checkpoint with it, and none may
have trained on the validation images that calibrate the ensemble.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

from leuko.errors import LeukoError
from leuko.infer.calibrate import calibrate_logits
from leuko.infer.predictor import batched_logits
from leuko.models.ensemble import ENSEMBLE, Ensemble
from leuko.run.card import ModelCard, ModelKind, NetworkSpec
from leuko.run.config import load_config
from leuko.run.data import prepare_data, run_transform
from leuko.run.folder import (
    ENSEMBLE_FILE,
    RunFolder,
    check_new_run,
    derived_run,
    finished_run,
    load_model,
    save_model,
)

__all__ = ["EnsembleResult", "build_ensemble_run"]

INPUT_KEYS = ("image_size", "resize", "preprocess", "mean", "std")
"""What must agree for one input tensor to feed every member."""


@dataclass
class EnsembleResult:
    """What :func:`build_ensemble_run` wrote and how the members (by resolved path) and the ensemble score on
    validation."""
    out: Path
    val_accuracy: dict[str, float]
    temperature: float


def _member(path: str | Path) -> tuple[RunFolder, Any, ModelCard]:
    """A finished single-network run: its folder, network and card."""
    run = finished_run(path, "member")
    net, card = load_model(run.model)
    if card.kind is not ModelKind.NETWORK:
        raise LeukoError(f"{run.path} is already an ensemble; give its member runs instead")
    return run, net, card


def _unsafe(member: RunFolder, data: Any) -> tuple[str, list[str]] | None:
    """Why ``member`` cannot join an ensemble evaluated on ``data``'s test split and calibrated on its validation
    split: ``(what, keys)``, or ``None`` when it is safe.

    Every held-out image must be ``test`` in the member's own split and every validation image ``val`` or
    ``test``; an image the member's split does not list counts against it (another dataset root, a merged
    folder, no split file), since what cannot be matched cannot be shown unseen.
    """
    if not member.split.is_file():
        return "has no split.json, so it cannot show that it never trained on", [s.key for s in data.test[:1]]
    seen = member.read_json("split.json").get("assignments", {})
    root = data.index.root
    test = [s.key for s in data.test if seen.get(s.relkey(root)) != "test"]
    if test:
        return "trained or validated on, or does not list,", test
    val = [s.key for s in data.val if seen.get(s.relkey(root)) not in ("val", "test")]
    if val:
        return "trained on, or does not list,", val
    return None


def _adaptation(cards: Sequence[ModelCard], names: Sequence[str]) -> dict[str, Any] | None:
    """The members' common adaptation (``None``: none adapted); members adapted differently are refused, since
    the ensemble would answer for neither lab."""
    def key(card: ModelCard) -> tuple[Any, ...] | None:
        a = card.adapted
        return None if not a else (a.get("method"), a.get("data"), a.get("layout")) if isinstance(a, dict) else (str(a),)

    keys = [key(c) for c in cards]
    if len(set(keys)) > 1:
        described = "; ".join(f"{n}: {'not adapted' if k is None else ', '.join(str(v) for v in k)}" for n, k in zip(names, keys))
        raise LeukoError(f"the runs are adapted differently ({described}); ensemble runs adapted the same way")
    if keys[0] is None:
        return None
    first = cards[0].adapted or {}
    common = {k: first[k] for k in ("method", "data", "layout") if k in first}
    return {**common, "members": "each member adapted on its own (its adapt.json); the ensemble calibrated on the "
                                 "source lab's validation split"}


def build_ensemble_run(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    echo: Callable[[str], None] = print,
) -> EnsembleResult:
    """Write an ensemble run of ``runs`` to ``out`` (built beside it and renamed into place when complete).

    Raises:
        LeukoError: fewer than two runs, a run twice, a missing, unfinished,
            routed or ensemble run, different classes or inputs, a member that
            trained on (or whose split does not list) the first run's held-out
            or validation images, members adapted differently, ``out`` exists,
            the dataset cannot be read.
    """
    if len(runs) < 2:
        raise LeukoError(f"an ensemble needs at least two runs; got {len(runs)}")
    resolved = [RunFolder.open(r).path.resolve() for r in runs]
    if len(set(resolved)) != len(resolved):
        raise LeukoError("a run is given twice; give each member run once")
    target = check_new_run(out, "an ensemble")
    loaded = [_member(r) for r in runs]
    members = [run for run, _, _ in loaded]
    cards = [card for _, _, card in loaded]
    first, ref = members[0], cards[0]
    for m, card in zip(members[1:], cards[1:]):
        if card.classes != ref.classes:
            raise LeukoError(f"{m.path.name} predicts {', '.join(card.classes)}, {first.path.name} "
                             f"{', '.join(ref.classes)}; ensemble runs trained on the same classes")
        differ = [k for k in INPUT_KEYS if getattr(card.input, k) != getattr(ref.input, k)]
        if differ:
            raise LeukoError(f"{m.path.name} reads images differently from {first.path.name} ({', '.join(differ)}: "
                             f"{getattr(card.input, differ[0])} vs {getattr(ref.input, differ[0])}); "
                             "one input feeds every member, so ensemble runs of one recipe")
    cfg = load_config(first.config)
    data = prepare_data(cfg.data, seed=cfg.train.seed, split_file=first.split)
    for m in members[1:]:
        unsafe = _unsafe(m, data)
        if unsafe:
            what, keys = unsafe
            raise LeukoError(f"{m.path.name} {what} {len(keys)} of {first.path.name}'s held-out or validation images "
                             f"(e.g. {keys[0]}); ensemble runs trained on the same split (data.split, data.split_seed)")
    adapted = _adaptation(cards, [m.path.name for m in members])
    if len(data.val) < 10:
        raise LeukoError(f"{first.path.name}'s validation split has {len(data.val)} images; calibrating the ensemble needs 10")

    temperatures = [float(card.temperature) for card in cards]
    model = Ensemble([net for _, net, _ in loaded], temperatures)
    model.eval()
    # One pass of each member over the validation split gives each one's accuracy and, combined as
    # Ensemble.forward combines them, the ensemble's logits to calibrate on.
    info = SimpleNamespace(mean=ref.input.mean, std=ref.input.std)
    transform = run_transform(cfg.data, info, train=False)
    c2i = {c: i for i, c in enumerate(data.classes)}
    y = np.array([c2i[s.label] for s in data.val])
    echo(f"calibrating the ensemble of {len(members)} on {len(data.val)} validation images of {first.path.name}")
    member_logits = [batched_logits(net, data.val, transform, cfg.data.image_size, num_workers=cfg.data.num_workers)
                     for _, net, _ in loaded]
    combined = np.mean([z / t for z, t in zip(member_logits, temperatures)], axis=0)
    calibration = calibrate_logits(combined, y)
    val_acc = {str(p): float((z.argmax(1) == y).mean()) for p, z in zip(resolved, member_logits)}
    val_acc["ensemble"] = float((combined.argmax(1) == y).mean())

    spec = NetworkSpec(
        name=ENSEMBLE,
        members=[c.model.model_dump(mode="json", exclude_none=True) for c in cards],
        head=ref.model.head,
        pretrained=", ".join(sorted({str(c.model.pretrained) for c in cards})),
    )
    card = ref.with_(kind=ModelKind.ENSEMBLE, model=spec, temperature=calibration["temperature"],
                     review=calibration["review"], adapted=adapted, route=None,
                     ensemble={"members": [str(p) for p in resolved], "member_temperatures": temperatures})

    with derived_run(target, first) as new:
        save_model(new.model, model, card)
        summary = new.read_json("summary.json") if new.summary.is_file() else {}
        new.write_json("summary.json", {**summary, "calibration": calibration})  # the ensemble's, not the first member's
        new.write_json(ENSEMBLE_FILE, {
            "members": [str(p) for p in resolved],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "validation": {"n": len(y), "accuracy": val_acc, "temperature": calibration["temperature"]},
        })
    return EnsembleResult(target, val_acc, float(calibration["temperature"]))
