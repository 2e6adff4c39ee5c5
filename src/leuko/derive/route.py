"""``leuko route HOME ROBUST --out RUN``: combine a home-lab run and a robust run into one routed run.

The gate is fitted on the robust run's training split (its smear colours) and
thresholded on its validation split, so it has seen only home-lab images and
no label; the routed run's held-out split is the robust run's, which is why
the home run must not have trained or validated on any of it (the check
distillation makes too). What the routed run is and how it decides per image:
:mod:`leuko.infer.route`.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from leuko.errors import LeukoError
from leuko.infer.backends import sample_loader
from leuko.infer.review import DEFAULT_OOD_QUANTILE
from leuko.infer.route import RoutedPredictor, SmearGate, SmearView, route_summary
from leuko.run.card import HOME_FILE, ROUTE_FILE
from leuko.run.config import load_config
from leuko.run.data import prepare_data
from leuko.run.folder import (
    check_new_run,
    derived_run,
    finished_run,
    load_model,
    read_card,
    save_model,
)
from leuko.train.distill import heldout_seen_by

__all__ = ["RouteResult", "build_route"]


@dataclass
class RouteResult:
    """What :func:`build_route` wrote and what the gate does on the validation split."""
    out: Path
    gate: SmearGate
    val_home_share: float
    val_accuracy: dict[str, float | None]


def build_route(
    home_dir: str | Path,
    robust_dir: str | Path,
    out: str | Path,
    *,
    quantile: float = DEFAULT_OOD_QUANTILE,
    energy: bool = True,
    echo: Callable[[str], None] = print,
) -> RouteResult:
    """Write a routed run to ``out``: ``robust_dir``'s record and network, ``home_dir``'s network, the gate.

    Args:
        home_dir: the run that is best on its own lab (e.g. ``pbc-best``).
        robust_dir: the run meant for other labs (e.g. ``pbc-robust``), trained
            on the same lab and split.
        quantile: the gate's thresholds: this quantile of the validation
            split's smear distances (0.99: about 1% of the home lab's images
            go to the robust network on their smear alone).
        energy: also send an image to the robust network when the home
            network's energy check calls it unlike its training data.

    Raises:
        LeukoError: a run is missing, unfinished or already routed; the classes
            differ; the home run saw the robust run's held-out images; ``out``
            exists; the dataset cannot be read.
    """
    home, robust = finished_run(home_dir, "home"), finished_run(robust_dir, "robust")
    if home.path.resolve() == robust.path.resolve():
        raise LeukoError(f"the home and the robust run are the same folder ({home.path}); route two different runs")
    target = check_new_run(out, "a routed run")
    if not 0.5 <= quantile < 1.0:
        raise LeukoError(f"--quantile must be in [0.5, 1); got {quantile}")
    if home.class_names() != robust.class_names():
        raise LeukoError(f"the two runs predict different classes (home: {', '.join(home.class_names())}; "
                         f"robust: {', '.join(robust.class_names())}); route runs trained on the same classes")
    cfg = load_config(robust.config)
    prepared = prepare_data(cfg.data, seed=cfg.train.seed, split_file=robust.split)
    leaked = heldout_seen_by(home, prepared)
    if leaked:
        raise LeukoError(f"the home run trained or validated on {len(leaked)} of the robust run's held-out images "
                         f"(e.g. {leaked[0]}); route two runs trained on the same split")
    if len(prepared.val) < 10:
        raise LeukoError(f"the robust run's validation split has {len(prepared.val)} images; the gate needs at least 10")
    view = SmearView()
    echo(f"smear colour and red-cell size of {len(prepared.train)} training and {len(prepared.val)} validation images of {robust.path.name}")
    desc = {}
    for role in ("train", "val"):
        samples = getattr(prepared, role)
        desc[role], failed = view.describe(sample_loader(samples, view), len(samples))  # type: ignore[arg-type]
        if failed:
            echo(f"{len(failed)} {role} image(s) could not be read and are left out of the gate (e.g. {samples[failed[0][0]].key})")
    gate = SmearGate.fit(desc["train"], desc["val"], quantile=quantile, chosen_on=f"{robust.path.name}'s validation split")

    model, card = load_model(robust.model)
    home_card = read_card(home.model).to_meta()
    home_summary = {k: home_card[k] for k in ("model", "input", "temperature", "classes")}
    card = card.with_(route={"gate": gate.to_dict(), "energy": bool(energy), "home": home_summary})
    with derived_run(target, robust) as new:
        save_model(new.model, model, card)
        shutil.copy2(home.model, new.path / HOME_FILE)
        predictor = RoutedPredictor(new.path)
        pred = predictor.predict_samples(prepared.val)
        label = {s.key: predictor.classes.index(s.label) for s in prepared.val}
        correct = np.array([label[k] for k in pred.keys]) == pred.pred
        summary = route_summary(pred.answered_by or [], correct)
        val_acc: dict[str, float | None] = {name: summary[name]["accuracy"] for name in ("home", "robust")}
        val_acc["routed"] = float(correct.mean()) if len(correct) else None
        share = summary["home"]["share"]
        new.write_json(ROUTE_FILE, {
            "home_run": str(home.path.resolve()),
            "robust_run": str(robust.path.resolve()),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gate": gate.to_dict(),
            "energy": bool(energy),
            "validation": {"n": len(pred.keys), "home_share": share, "accuracy": val_acc},
        })
    return RouteResult(target, gate, share, val_acc)

