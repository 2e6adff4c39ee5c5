"""``leuko evaluate``: a run folder + data → metrics.json, predictions.csv, figures, report text.

Two situations, told apart by where the data comes from:

* the run's own dataset (default, or ``--data`` pointing at it): the saved
  split file picks the held-out role (``--split test``), so evaluation sees
  exactly the images training never did;
* another dataset (another lab, e.g. BCCD crops for a PBC model): every
  sample is used, and a class map reconciles the label sets.

Class maps (YAML or JSON)::

    merge:   {ig: neutrophil}          # model class -> target class (probabilities add up)
    exclude: [platelet, erythroblast]  # model classes removed from the argmax

Target classes the model lacks are an error; model classes the target lacks
must be merged or excluded, and the report states which.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from leuko.data import load_dataset
from leuko.data.classmap import ClassMap, map_probs
from leuko.data.crops import crop_report
from leuko.data.imageio import load_rgb
from leuko.data.samples import Sample
from leuko.errors import LeukoError
from leuko.evaluate.figures import (
    plot_confusion_matrix,
    plot_misclassified_gallery,
    plot_per_class_bars,
    plot_reliability,
    plot_roc_curves,
    plot_training_curves,
)
from leuko.evaluate.metrics import (
    classification_report_text,
    compute_metrics,
    predictions_frame,
)
from leuko.evaluate.tables import epoch_table, write_table
from leuko.infer import load_predictor
from leuko.infer.route import route_summary
from leuko.run.config import load_config
from leuko.run.data import prepare_data
from leuko.run.folder import RunFolder

log = logging.getLogger("leuko.evaluate")


def _same_dataset(run_root: str | None, data_root: Path) -> bool:
    return run_root is not None and Path(run_root).resolve() == data_root.resolve()


def default_eval_dir(run_dir: str | Path, data: str | Path | None, split: str, *, tta: bool = False) -> Path:
    """Where ``evaluate_run`` writes by default: ``RUN/eval/<split>`` or ``RUN/eval/<dataset>-<split>``,
    with ``-tta`` appended for a test-time-augmented evaluation.

    Reports and grids look there for an earlier evaluation to reuse. The TTA
    folder is separate so that one evaluation never overwrites the other's
    numbers (the review policy's figures differ between the two).
    """
    name = split if data is None else Path(str(data)).name + f"-{split}"
    return Path(run_dir) / "eval" / (name + "-tta" if tta else name)


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    layout: str | None = None,
    split: str = "test",
    out: str | Path | None = None,
    class_map: str | Path | None = None,
    tta: bool = False,
    figures: bool = True,
    echo: Callable[[str], None] = print,
    layout_options: dict[str, Any] | None = None,
    label_map: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run; writes ``metrics.json``, ``predictions.csv`` and figures into ``out``.

    ``class_map`` reads the *model's* classes as the data's (a PBC model's ``ig`` counts for a five-type lab's
    neutrophil); ``label_map`` reads the *data's* labels as the model's, as ``data.sources[].class_map`` does in
    training (a five-type model scored on PBC's eight classes: ``pbc-to-five-mature`` drops PBC's immature
    granulocytes, erythroblasts and platelets). Only for another dataset: a run's own data is already mapped.

    Returns the metrics dict (with ``data``, ``class_map`` and ``report`` entries added; on
    another dataset also ``in_lab``: the run's own held-out numbers, see :func:`in_lab_metrics`;
    with ``cell-crop`` preprocessing ``data.cell_crop`` lists the images where no cell was found).
    """
    run = RunFolder.open(run_dir)
    out_dir = Path(out) if out is not None else default_eval_dir(run.path, data, split, tta=tta)
    if split not in ("train", "val", "test", "all"):
        raise LeukoError(f"--split must be train, val, test or all; got {split!r}")
    cfg = load_config(run.config)
    trained_root = run.read_json("data.json").get("root") if run.data.is_file() else None
    samples: list[Sample]
    if data is None or (Path(data).exists() and _same_dataset(trained_root, Path(data)) and layout in (None, cfg.data.layout)):
        prepared = prepare_data(cfg.data, seed=cfg.train.seed, data_path=data, split_file=run.split)
        samples = prepared.index.samples if split == "all" else getattr(prepared, split)
        target_classes = prepared.classes
        source = f"{prepared.index.root} ({split} split of the run)"
        own_data = True
    else:
        index = load_dataset(data, layout, **(layout_options or {}))
        if split not in ("all", "test"):
            raise LeukoError("on another dataset every image is evaluated: use --split all (or test)")
        samples = index.samples
        target_classes = index.classes
        source = f"{index.root} (all {len(samples)} samples, layout {index.layout})"
        if label_map is not None:
            samples, dropped = ClassMap.load(label_map).relabel(samples, run.class_names(), where=str(index.root),
                                                                labels=index.classes)
            target_classes = sorted({s.label for s in samples})
            label_notes = [f"{k} ({v})" for k, v in sorted(dropped.items())]
            source = (f"{index.root} ({len(samples)} of {len(index.samples)} samples, layout {index.layout}; "
                      f"label map {label_map}" + (f" drops {', '.join(label_notes)}" if label_notes else "") + ")")
        used = run.finetuned_cells(index.root)
        if used:  # a run fine-tuned on this lab is scored on the cells it never learned from or calibrated on
            samples = [s for s in samples if s.relkey(index.root) not in used]
            source = (f"{index.root} ({len(samples)} samples, layout {index.layout}; the {len(index.samples) - len(samples)} "
                      "cells the run was fine-tuned or calibrated on are left out)")
            echo(f"leaving out the {len(index.samples) - len(samples)} cells {run.path.name} was fine-tuned or calibrated on")
        own_data = False
    if label_map is not None and own_data:
        raise LeukoError("--label-map is for another dataset (--data): the run's own data is mapped by its config")
    if not samples:
        raise LeukoError(f"no images to evaluate in the {split!r} part")
    predictor = load_predictor(run.path)
    model_classes = predictor.classes
    cmap = ClassMap.load(class_map) if class_map else ClassMap()
    if class_map is None and set(target_classes) - set(model_classes):
        lacking = sorted(set(target_classes) - set(model_classes))
        raise LeukoError(f"the data has classes the model cannot predict: {lacking}; model classes: {model_classes}")
    m, notes = cmap.matrix(model_classes, target_classes)
    echo(f"evaluating {run.path.name} on {source}")
    pred = predictor.predict_samples(samples, tta=tta)
    by_key = {s.key: s for s in samples}
    kept = [by_key[k] for k in pred.keys]
    probs_model = pred.probs
    probs = map_probs(probs_model, m)
    c2i = {c: i for i, c in enumerate(target_classes)}
    y = np.array([c2i[s.label] for s in kept], dtype=int)
    metrics = compute_metrics(y, probs, target_classes)
    labs = [s.source for s in kept]
    if len({lab for lab in labs if lab is not None}) > 1:
        metrics["by_source"] = by_source_metrics(labs, y, probs, target_classes)
        for lab, row in metrics["by_source"].items():
            echo(f"  {lab}: {row['n']} images, accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}, "
                 f"balanced accuracy {row['balanced_accuracy']:.4f}")
    metrics["data"] = {"source": source, "split": split, "n_images": len(kept), "failed": pred.failed}
    metrics["review"] = review_summary(predictor, pred, y == probs.argmax(1))
    if pred.answered_by is not None:
        metrics["route"] = route_summary(pred.answered_by, y == probs.argmax(1), pred.red_cell_ratio)
    if predictor.model_input.preprocess.cell_centred:
        metrics["data"]["cell_crop"] = _cell_crop_check(kept, predictor.model_input.preprocess, echo)
    if not own_data:
        metrics["in_lab"] = in_lab_metrics(run, tta=tta)
    metrics["class_map"] = {"merge": cmap.merge, "exclude": cmap.exclude, "notes": notes}
    if label_map is not None:
        metrics["label_map"] = {"map": str(label_map), "dropped": dict(sorted(dropped.items()))}
    metrics["temperature"] = predictor.temperature
    metrics["tta"] = tta
    out_dir.mkdir(parents=True, exist_ok=True)
    if run.metrics.is_file():

        write_table(epoch_table(run.metrics), out_dir / "epochs", title=f"Per-epoch accuracy and loss: {run.path.name}")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    frame = predictions_frame([str(s.path) if s.crop is None else s.key for s in kept], y, probs, target_classes)
    if any(lab is not None for lab in labs):  # data.sources: the lab of each row
        frame.insert(1, "source", labs)
    if pred.answered_by is not None:  # a routed run: which network answered each row (the report explains with it)
        frame["answered_by"] = pred.answered_by
        frame["routed_because"] = pred.route_reasons
    frame.to_csv(out_dir / "predictions.csv", index=False)
    report = classification_report_text(metrics, target_classes)
    (out_dir / "report.txt").write_text(report + "\n")
    if figures:
        _figures(out_dir, run, metrics, y, probs, kept, target_classes)
    metrics["report"] = report
    metrics["out_dir"] = str(out_dir)
    return metrics


BY_SOURCE_KEYS: tuple[str, ...] = ("n", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "ci95")


def by_source_metrics(labs: list[str | None], y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Headline metrics of each lab's images (``metrics["by_source"]``, when the data has several labs).

    Macro averages run over the classes the lab has (a lab without basophils is not scored 0 on them);
    ``macro_f1_common`` is macro-F1 over its classes with >= 10 images (``small_classes``).
    """
    out: dict[str, Any] = {}
    arr = np.asarray([lab if lab is not None else "" for lab in labs], dtype=object)
    for lab in sorted({lab for lab in labs if lab is not None}):
        mask = arr == lab
        present = sorted(set(y[mask].tolist()))
        m = compute_metrics(y[mask], probs[mask], classes, labels_present=present)
        row = {k: m[k] for k in BY_SOURCE_KEYS}
        row["macro_f1_common"] = (m.get("small_classes") or {}).get("macro_f1_common", m["macro_f1"])
        row["per_class_recall"] = {c: v["recall"] for c, v in m["per_class"].items() if v["support"]}
        out[lab] = row
    return out


def review_summary(predictor: Any, pred: Any, correct: np.ndarray) -> dict[str, Any]:
    """How the model's review policy (:mod:`leuko.infer.review`) treats these images.

    The drift signal a lab can read before trusting counts: on the source
    lab's held-out split about 2% are flagged; on another lab's images the
    share flagged (and the share *unlike the training data*) rises with the
    shift, and the accuracy of the accepted images says what an accepted
    call is worth there.
    """
    low, unlike = predictor.review_checks(pred)
    n = len(low)
    flagged = low | unlike
    accepted = ~flagged
    return {
        "policy": predictor.describe_review(),
        "flagged": float(flagged.mean()) if n else 0.0,
        "low_confidence": float(low.mean()) if n else 0.0,
        "unlike_training": float(unlike.mean()) if n else 0.0,
        "accepted_accuracy": float(np.asarray(correct)[accepted].mean()) if accepted.any() else None,
    }


IN_LAB_KEYS: tuple[str, ...] = ("n", "accuracy", "macro_f1", "balanced_accuracy", "review", "route")
"""Headline numbers copied from the run's own held-out evaluation for the side-by-side view."""


def in_lab_metrics(run: RunFolder, *, tta: bool = False) -> dict[str, Any] | None:
    """The run's held-out test numbers (``RUN/eval/test[-tta]/metrics.json``, where a plain
    ``leuko evaluate RUN [--tta]`` writes them), or ``None`` if never evaluated.

    Shown beside another lab's numbers by ``leuko evaluate --data``: a drop
    from one to the other is the domain shift, not a property of either set.
    The evaluation made the same way (with or without TTA) is preferred; the
    other is the fallback, and ``tta`` in the result says which it is.
    """
    for with_tta in (tta, not tta):
        path = default_eval_dir(run.path, None, "test", tta=with_tta) / "metrics.json"
        if path.is_file():
            break
    else:
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable %s", path)
        return None
    out = {k: m[k] for k in IN_LAB_KEYS if k in m}
    out["tta"] = bool(m.get("tta", False))
    out["source"] = (m.get("data") or {}).get("source", str(path))
    out["path"] = str(path)
    return out


def _cell_crop_check(samples: list[Sample], preprocess: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    """Which evaluated images ``cell-crop``/``rbc-crop`` found no cell in (classified from the whole frame)
    and, with ``rbc-crop``, which had no red-cell ruler (cropped at ``cell-crop``'s share)."""
    report = crop_report(samples, preprocess)
    step = "rbc-crop" if preprocess.rbc_span is not None else "cell-crop"
    echo(f"{step}: {report.summary()}")
    out: dict[str, Any] = {"step": step, "found": len(report.records) - len(report.fallbacks), "fell_back": report.fallbacks}
    if preprocess.rbc_span is not None:
        out["no_ruler"] = report.no_ruler
    return out


def _figures(out_dir: Path, run: RunFolder, metrics: dict, y: np.ndarray, probs: np.ndarray, kept: list[Sample], classes: list[str]) -> None:

    cm = np.asarray(metrics["confusion_matrix"])
    plot_confusion_matrix(cm, classes, out_dir / "confusion_matrix.png", title="Confusion matrix (counts)")
    plot_confusion_matrix(cm, classes, out_dir / "confusion_matrix_normalized.png", normalize=True, title="Confusion matrix (row-normalised)")
    plot_per_class_bars(metrics, out_dir / "per_class.png")
    if len(set(y.tolist())) > 1:
        plot_roc_curves(y, probs, classes, out_dir / "roc.png")
    plot_reliability(probs, y, out_dir / "reliability.png", title="Reliability")
    if run.metrics.is_file():
        plot_training_curves(run.metrics, out_dir / "training_curves.png")
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    worst = wrong[np.argsort(-probs[wrong, pred[wrong]])][:24]
    images, titles = [], []
    for i in worst:
        s = kept[int(i)]
        try:
            images.append(load_rgb(s.path, 128, crop=s.crop))
        except LeukoError:
            continue
        titles.append(f"{s.label} → {classes[pred[i]]} ({probs[i, pred[i]]:.2f})")
    plot_misclassified_gallery(images, titles, out_dir / "misclassified.png")
