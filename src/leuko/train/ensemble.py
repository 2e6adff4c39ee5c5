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
from leuko.models.ensemble import ENSEMBLE, Ensemble, is_ensemble_spec
from leuko.runs import ENSEMBLE_FILE, RunFolder, check_new_run, derived_run, finished_run, load_model, save_model

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


def _member(path: str | Path) -> tuple[RunFolder, Any, dict[str, Any]]:
    """A finished single-network run: its folder, network and metadata."""
    run = finished_run(path, "member")
    net, meta = load_model(run.model)
    if is_ensemble_spec(meta.get("model", {})):
        raise LeukoError(f"{run.path} is already an ensemble; give its member runs instead")
    return run, net, meta


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


def _adaptation(metas: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any] | None:
    """The members' common adaptation (``None``: none adapted); members adapted differently are refused, since
    the ensemble would answer for neither lab."""
    def key(meta: dict[str, Any]) -> tuple[Any, ...] | None:
        a = meta.get("adapted")
        return None if not a else (a.get("method"), a.get("data"), a.get("layout")) if isinstance(a, dict) else (str(a),)

    keys = [key(m) for m in metas]
    if len(set(keys)) > 1:
        described = "; ".join(f"{n}: {'not adapted' if k is None else ', '.join(str(v) for v in k)}" for n, k in zip(names, keys))
        raise LeukoError(f"the runs are adapted differently ({described}); ensemble runs adapted the same way")
    if keys[0] is None:
        return None
    first = metas[0]["adapted"]
    common = {k: first[k] for k in ("method", "data", "layout") if k in first} if isinstance(first, dict) else {"adapted": first}
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
    from leuko.infer.predictor import batched_logits
    from leuko.train.config import load_config
    from leuko.train.data import prepare_data, run_transform
    from leuko.train.runner import calibrate_logits

    if len(runs) < 2:
        raise LeukoError(f"an ensemble needs at least two runs; got {len(runs)}")
    resolved = [RunFolder.open(r).path.resolve() for r in runs]
    if len(set(resolved)) != len(resolved):
        raise LeukoError("a run is given twice; give each member run once")
    target = check_new_run(out, "an ensemble")
    loaded = [_member(r) for r in runs]
    members = [run for run, _, _ in loaded]
    metas = [meta for _, _, meta in loaded]
    first = members[0]
    for m, meta in zip(members[1:], metas[1:]):
        if meta["classes"] != metas[0]["classes"]:
            raise LeukoError(f"{m.path.name} predicts {', '.join(meta['classes'])}, {first.path.name} "
                             f"{', '.join(metas[0]['classes'])}; ensemble runs trained on the same classes")
        differ = [k for k in INPUT_KEYS if meta["input"].get(k) != metas[0]["input"].get(k)]
        if differ:
            raise LeukoError(f"{m.path.name} reads images differently from {first.path.name} ({', '.join(differ)}: "
                             f"{meta['input'].get(differ[0])} vs {metas[0]['input'].get(differ[0])}); "
                             "one input feeds every member, so ensemble runs of one recipe")
    cfg = load_config(first.config)
    data = prepare_data(cfg.data, seed=cfg.train.seed, split_file=first.split)
    for m in members[1:]:
        unsafe = _unsafe(m, data)
        if unsafe:
            what, keys = unsafe
            raise LeukoError(f"{m.path.name} {what} {len(keys)} of {first.path.name}'s held-out or validation images "
                             f"(e.g. {keys[0]}); ensemble runs trained on the same split (data.split, data.split_seed)")
    adapted = _adaptation(metas, [m.path.name for m in members])
    if len(data.val) < 10:
        raise LeukoError(f"{first.path.name}'s validation split has {len(data.val)} images; calibrating the ensemble needs 10")

    temperatures = [float(meta.get("temperature", 1.0)) for meta in metas]
    model = Ensemble([net for _, net, _ in loaded], temperatures)
    model.eval()
    # One pass of each member over the validation split gives each one's accuracy and, combined as
    # Ensemble.forward combines them, the ensemble's logits to calibrate on.
    info = SimpleNamespace(mean=metas[0]["input"]["mean"], std=metas[0]["input"]["std"])
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

    spec = {
        "name": ENSEMBLE,
        "members": [dict(meta["model"]) for meta in metas],
        "head": metas[0]["model"].get("head"),
        "pretrained": ", ".join(sorted({str(meta["model"].get("pretrained")) for meta in metas})),
    }
    meta: dict[str, Any] = {k: v for k, v in metas[0].items() if k not in ("format", "state_dict", "adapted", "route")}
    meta.update(model=spec, temperature=calibration["temperature"], review=calibration["review"])
    meta["ensemble"] = {"members": [str(p) for p in resolved], "member_temperatures": temperatures}
    if adapted:
        meta["adapted"] = adapted

    with derived_run(target, first) as new:
        save_model(new.model, model, meta)
        summary = new.read_json("summary.json") if new.summary.is_file() else {}
        new.write_json("summary.json", {**summary, "calibration": calibration})  # the ensemble's, not the first member's
        new.write_json(ENSEMBLE_FILE, {
            "members": [str(p) for p in resolved],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "validation": {"n": len(y), "accuracy": val_acc, "temperature": calibration["temperature"]},
        })
    return EnsembleResult(target, val_acc, float(calibration["temperature"]))
