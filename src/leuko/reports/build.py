"""``leuko report``: everything known about a run, in one file a colleague can open offline.

What goes in, and from where (nothing is recomputed that the run already has):

* configuration: ``config.yaml`` verbatim;
* data: ``data.json`` (dataset, layout, split, counts per class and role);
* model: ``model.pt``'s metadata (architecture, input, temperature, and the
  ``adapted`` record when the model was adapted to other data);
* training: ``summary.json`` and the per-epoch ``metrics.csv`` (table + curves);
* evaluation: the held-out evaluation ``leuko evaluate`` writes
  (``RUN_DIR/eval/test`` by default), reused when it is newer than the model,
  else run now with :func:`~leuko.evaluate.run.evaluate_run`;
* calibration: temperature, ECE before/after on validation (``summary.json``)
  and on the evaluated images, reliability diagram;
* Grad-CAM: the most confident correct image of every class and the most
  confident mistakes, each with its heat map(s);
* leakage: ``leakage.json`` (train/held-out duplicate check) when present.

A routed run (``leuko route``) gets the same report plus what makes it one:
its two networks side by side, the gate (``route.json``), which network
answered how many of the evaluated images and how well, and Grad-CAMs taken
from the network that answered each image. Its configuration, data and
training record are the robust network's, as the run folder holds them.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from leuko.data.imageio import load_rgb
from leuko.errors import LeukoError
from leuko.evaluate.figures import (
    plot_confusion_matrix,
    plot_gradcam_grid,
    plot_per_class_bars,
    plot_reliability,
    plot_training_curves,
)
from leuko.evaluate.run import default_eval_dir, evaluate_run
from leuko.explain.gradcam import RoutedGradCAM, explainer_for, overlay
from leuko.infer.load import load_predictor
from leuko.infer.route import describe_route
from leuko.reports.content import (
    Cell,
    Code,
    Figure,
    Report,
    Section,
    Table,
    Text,
    fmt,
    metric_cell,
)
from leuko.reports.render import render_html, render_markdown
from leuko.run.calibration import ece, softmax
from leuko.run.card import HOME_FILE, ROUTE_FILE, ModelCard, ModelKind, NetworkSpec
from leuko.run.folder import ENSEMBLE_FILE, RunFolder, kind_of

Echo = Callable[[str], None]

MAX_MISCLASSIFIED = 8


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written."""
    html: Path
    markdown: Path
    figures: Path


@dataclass
class Evaluation:
    """A held-out evaluation of the run, as ``leuko evaluate`` wrote it."""
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    out_dir: Path
    reused: bool


# --------------------------------------------------------------------------- evaluation


def _held_out_split(run: RunFolder) -> str:
    """``test`` when the run has test images, else ``val`` (said so in the report)."""
    counts = run.read_json("data.json").get("counts", {}) if run.data.is_file() else {}
    for role in ("test", "val"):
        if sum((counts.get(role) or {}).values()) > 0:
            return role
    if counts:
        raise LeukoError(f"run {run.path} has no held-out images (no test or val split); evaluate it on other data with --data")
    return "test"


def load_or_evaluate(
    run: RunFolder, *, data: str | Path | None = None, layout: str | None = None, echo: Echo = print
) -> Evaluation:
    """The run's held-out evaluation: reused when up to date, else computed (needs the data)."""
    split = "test" if data is not None else _held_out_split(run)

    out_dir = default_eval_dir(run.path, data, split)
    metrics_file, preds_file = out_dir / "metrics.json", out_dir / "predictions.csv"
    fresh = (
        metrics_file.is_file()
        and preds_file.is_file()
        and (not run.model.is_file() or metrics_file.stat().st_mtime >= run.model.stat().st_mtime)
        # a routed run's evaluation must say which network answered each image (older ones did not)
        and (kind_of(run.path) is not ModelKind.ROUTED or "answered_by" in _csv_header(preds_file))
    )
    if fresh:
        echo(f"reusing the evaluation in {out_dir}")
    else:

        echo(f"no up-to-date evaluation in {out_dir}: evaluating the {split} split now")
        # The report draws the figures it shows itself; evaluate's other figures are not needed here.
        evaluate_run(run.path, data=data, layout=layout, split=split, echo=echo, figures=False)
    try:
        metrics = json.loads(metrics_file.read_text())
        predictions = pd.read_csv(preds_file)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise LeukoError(f"cannot read the evaluation in {out_dir}: {exc}") from None
    return Evaluation(metrics, predictions, out_dir, fresh)


# --------------------------------------------------------------------------- helpers


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().strip().split(",")
    except (OSError, UnicodeDecodeError):
        return []


def _figure(ev: Evaluation, fig_dir: Path, name: str, plot: Callable[[Path], Path], *, inputs: tuple[Path, ...] = ()) -> Path:
    """``fig_dir/name``: copied from the evaluation folder when ``leuko evaluate`` drew it from these
    same results (newer than metrics.json and ``inputs``), else drawn by ``plot``."""
    src, dst = ev.out_dir / name, fig_dir / name
    sources = (ev.out_dir / "metrics.json", *inputs)
    if src.is_file() and all(p.is_file() and src.stat().st_mtime >= p.stat().st_mtime for p in sources):
        shutil.copyfile(src, dst)
        return dst
    return plot(dst)


def _kv_table(rows: list[tuple[str, Any]], caption: str = "") -> Table:
    return Table(["", "value"], [[k, v if isinstance(v, Cell) else _plain(v)] for k, v in rows], caption, kind="kv")


def _plain(v: Any) -> str:
    if isinstance(v, float):
        return fmt(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return "n/a" if v is None else str(v)


def _epoch(v: Any) -> str:
    return str(int(v)) if pd.notna(v) and float(v).is_integer() else fmt(v)


def _probs(ev: Evaluation) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = list(ev.metrics["classes"])
    frame = ev.predictions
    probs = frame[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    c2i = {c: i for i, c in enumerate(classes)}
    y = frame["true"].astype(str).map(c2i).to_numpy()
    return probs, y.astype(int), classes


def _split_key(key: str) -> tuple[Path, tuple[int, int, int, int] | None]:
    """``predictions.csv`` names crops ``path#left,top,right,bottom`` (see :attr:`Sample.key`)."""
    path = Path(key)
    if "#" in key and not path.exists():
        base, _, box = key.rpartition("#")
        try:
            values = tuple(int(v) for v in box.split(","))
        except ValueError:
            return path, None
        if len(values) == 4:
            return Path(base), values  # type: ignore[return-value]
    return path, None


# --------------------------------------------------------------------------- sections


def _model_name(spec: NetworkSpec) -> str:
    """``efficientnet_lite0 (head linear, weights bundled)``; an ensemble lists its members' (``2 x ...``)."""
    if spec.members:
        names = [_model_name(NetworkSpec.model_validate(m)) for m in spec.members]
        return f"ensemble of {len(names)}: " + ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    return f"{spec.name} (head {spec.head}, weights {spec.pretrained})"


def _networks(predictor: Any) -> list[tuple[str, str, ModelCard]]:
    """``(title, model file, card)`` of each network: one, or a routed run's home and robust networks."""
    if predictor.kind is ModelKind.ROUTED:
        return [("home network", HOME_FILE, predictor.home.card), ("robust network", "model.pt", predictor.robust.card)]
    return [("model", "model.pt", predictor.card)]


def _overview(run: RunFolder, predictor: Any, ev: Evaluation) -> Section:
    m = ev.metrics
    card: ModelCard = predictor.card
    ci = (m.get("ci95") or {}).get("accuracy") or [None, None]
    networks = _networks(predictor)
    routed = len(networks) > 1
    models: list[tuple[str, Any]] = (
        [("model", "routed: the home network where the smear is the home lab's, the robust one elsewhere"),
         *[(title, _model_name(net.model)) for title, _, net in networks]]
        if routed else [("model", _model_name(card.model))]
    )
    rows: list[tuple[str, Any]] = [
        ("run folder", str(run.path)),
        *models,
        ("classes", ", ".join(card.classes)),
        ("evaluated on", (m.get("data") or {}).get("source", "n/a")),
        ("images evaluated", int(m.get("n", 0))),
        ("accuracy", metric_cell("accuracy", m.get("accuracy"))),
        ("accuracy 95% CI", f"{fmt(ci[0])} - {fmt(ci[1])}"),
        ("macro-F1", metric_cell("macro_f1", m.get("macro_f1"))),
        ("ECE (calibrated)", metric_cell("ece", m.get("ece"))),
    ]
    if routed and m.get("route"):

        rows.append(("route", describe_route(m["route"])))
    blocks: list[Any] = [_kv_table(rows)]
    split = (m.get("data") or {}).get("split")
    if split == "val":
        blocks.append(Text(
            "The run has no test split, so this is the validation split, which also chose the checkpoint and the "
            "temperature: the numbers are optimistic.", "warning"))
    return Section("Overview", "overview", blocks)


def _config(run: RunFolder) -> Section:
    return Section("Configuration", "config", [
        Text(f"The resolved configuration ({run.config.name}, every default filled in) that trained this run."),
        Code(run.config.read_text(), "yaml"),
    ])


def _data(run: RunFolder) -> Section:
    if not run.data.is_file():
        return Section("Data", "data", [Text("The run has no data.json.", "note")])
    d = run.read_json("data.json")
    counts: dict[str, dict[str, int]] = d.get("counts", {})
    roles = [r for r in ("train", "val", "test") if r in counts] + [r for r in counts if r not in ("train", "val", "test")]
    classes = list(d.get("classes") or sorted({c for r in counts.values() for c in r}))
    rows: list[list[str | Cell]] = [[c, *[fmt(int(counts[r].get(c, 0))) for r in roles], fmt(sum(int(counts[r].get(c, 0)) for r in roles))] for c in classes]
    rows.append(["total", *[fmt(sum(int(v) for v in counts[r].values())) for r in roles], fmt(sum(int(v) for r in roles for v in counts[r].values()))])
    facts = [
        ("dataset", d.get("root")),
        ("layout", d.get("layout")),
        ("split", f"{d.get('split')}{' (grouped)' if d.get('grouped') else ''}"),
        ("classes", ", ".join(classes)),
        ("unusable files skipped", d.get("skipped", 0)),
    ]
    return Section("Data", "data", [_kv_table(facts), Table(["class", *roles, "all"], rows, "Images per class and split")])


def _model(predictor: Any, explainer: Any, run: RunFolder, ev: Evaluation) -> Section:
    """One network's fact sheet, or a routed run's gate, its evaluation split by network, and both fact sheets."""
    networks = _networks(predictor)
    if len(networks) == 1:
        return Section("Model", "model", _network_blocks(networks[0][2], explainer.layer))
    route = run.read_json(ROUTE_FILE) if predictor.kind is ModelKind.ROUTED else {}
    blocks: list[Any] = [
        Text("A routed run: two networks trained on the same lab and split, and a per-image gate that decides, from "
             "the image alone, which of them answers (leuko route)."),
        _kv_table([
            ("gate", predictor.gate.describe()),
            ("home network's energy check", "on" if predictor.use_energy else "off"),
            ("home network from", route.get("home_run")),
            ("robust network from", route.get("robust_run")),
            ("built", route.get("date")),
            *([("adapted", route["adapted"])] if route.get("adapted") else []),
        ], "Routing"),
    ]
    r = ev.metrics.get("route") or {}
    if r:
        rows: list[list[str | Cell]] = []
        for name in ("home", "robust"):
            x = r.get(name) or {}
            rows.append([name, fmt(int(x.get("n", 0))), f"{100 * float(x.get('share', 0.0)):.1f}%", fmt(x.get("accuracy"))])
        blocks.append(Table(["network", "images answered", "share", "accuracy there"], rows,
                            "Which network answered the evaluated images"))
        mag = r.get("magnification")
        if mag:
            blocks.append(Text(
                f"Median red-cell size of the evaluated images: {float(mag['median_ratio']):.2f}x the home lab's "
                f"({int(mag['n_measured'])} images measured)" + (f": {mag['warning']}" if mag.get("warning") else "."),
                "warning" if mag.get("warning") else "p"))
    layers = getattr(explainer, "networks", {})
    for title, file, net in networks:
        name = title.split()[0]
        blocks.append(Text(f"The {title} ({file}):"))
        blocks += _network_blocks(net, layers[name].layer if name in layers else explainer.layer)
    return Section("Model", "model", blocks)


def _network_blocks(card: ModelCard, layer: str) -> list[Any]:
    spec = card.model
    inp = card.input.model_dump() if card.input else {}
    ensemble = card.ensemble or {}
    rows: list[tuple[str, Any]] = [
        ("architecture", _model_name(spec) if spec.members else spec.name),
        *([("member runs", ", ".join(ensemble["members"]))] if ensemble.get("members") else []),
        *([("member temperatures", ", ".join(f"{t:.3f}" for t in ensemble["member_temperatures"]))]
          if ensemble.get("member_temperatures") else []),
        ("head", spec.head),
        ("dropout", spec.dropout),
        ("initial weights", spec.pretrained),
        ("input", f"{inp.get('image_size')} px, resize {inp.get('resize', 'stretch')}, preprocess {_plain(inp.get('preprocess') or [])}"),
        ("normalisation", f"mean {_plain(inp.get('mean'))}; std {_plain(inp.get('std'))}"),
        ("temperature", float(card.temperature)),
        ("Grad-CAM layer", layer),
    ]
    blocks: list[Any] = [_kv_table(rows)]
    if card.finetuned:
        blocks += [Text("This model was fine-tuned on another lab's labelled cells after training:", "note"),
                   _kv_table([(str(k), _plain(v) if isinstance(v, (dict, list)) else v)
                              for k, v in card.finetuned.items()], "Fine-tuning")]
    if card.adapted:
        blocks += [Text("This model was adapted after training:", "note"),
                   _kv_table([(str(k), v) for k, v in card.adapted.items()], "Adaptation")]
    elif not card.finetuned:
        blocks.append(Text("The model was not adapted to other data after training."))
    return blocks


def _training(run: RunFolder, ev: Evaluation, fig_dir: Path) -> Section:

    blocks: list[Any] = []
    if kind_of(run.path) is ModelKind.ROUTED:
        home = run.read_json(ROUTE_FILE).get("home_run")
        blocks.append(Text(f"The training record of the robust network; the home network's is in its own run folder ({home}).", "note"))
    if (run.path / ENSEMBLE_FILE).is_file():
        members = run.read_json(ENSEMBLE_FILE).get("members") or []
        blocks.append(Text(f"An ensemble: the training record of its first member ({members[0] if members else 'n/a'}); "
                           "the others' are in their own run folders. The calibration below is the ensemble's.", "note"))
    if run.summary.is_file():
        s = run.read_json("summary.json")
        wall = s.get("wall_time_s")
        blocks.append(_kv_table([
            ("epochs run", s.get("epochs_run")),
            ("best epoch", s.get("best_epoch")),
            ("best validation accuracy", metric_cell("best_val_acc", s.get("best_val_acc"))),
            ("training path", s.get("path")),
            ("wall time", "n/a" if wall is None else f"{float(wall) / 60:.1f} min"),
            ("images/s", s.get("images_per_s")),
        ]))
    if run.metrics.is_file():
        try:
            frame = pd.read_csv(run.metrics)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            blocks.append(Text(f"metrics.csv cannot be read: {exc}", "warning"))
        else:
            try:
                path = _figure(ev, fig_dir, "training_curves.png", lambda p: plot_training_curves(run.metrics, p), inputs=(run.metrics,))
                blocks.append(Figure(path, "Accuracy and loss per epoch, training vs validation"))
            except LeukoError as exc:
                blocks.append(Text(f"no training curves: {exc}", "note"))
            cols = list(frame.columns)
            rows: list[list[str | Cell]] = [
                [_epoch(r[c]) if c == "epoch" else fmt(r[c]) for c in cols] for _, r in frame.iterrows()
            ]
            blocks.append(Table(cols, rows, "Per-epoch metrics (metrics.csv)"))
    if not run.summary.is_file() and not run.metrics.is_file():
        blocks.append(Text("The run has no summary.json or metrics.csv.", "note"))
    return Section("Training", "training", blocks)


def _evaluation(ev: Evaluation, fig_dir: Path) -> Section:

    m = ev.metrics
    classes = list(m["classes"])
    d = m.get("data") or {}
    ci = m.get("ci95") or {}
    blocks: list[Any] = [Text(
        f"{int(m.get('n', 0))} images from {d.get('source', 'n/a')}"
        + (f"; {len(d.get('failed') or [])} unreadable image(s) left out" if d.get("failed") else "")
        + (" (test-time augmentation)" if m.get("tta") else "")
        + f". Evaluation files: {ev.out_dir}" + (" (reused)." if ev.reused else " (computed for this report).")
    )]
    auc = (m.get("roc_auc_ovr") or {}).get("macro")
    rows = []
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"),
                       ("weighted_f1", "weighted F1")):
        lo, hi = (ci.get(key) or [None, None])
        rows.append([label, metric_cell(key, m.get(key)), "n/a" if lo is None else f"{fmt(lo)} - {fmt(hi)}"])
    rows += [["macro ROC AUC (one vs rest)", metric_cell("roc_auc_macro", auc), ""],
             ["log loss (NLL)", metric_cell("nll", m.get("nll")), ""],
             ["Brier score", metric_cell("brier", m.get("brier")), ""]]
    blocks.append(Table(["metric", "value", f"95% CI (bootstrap, {m.get('n_bootstrap', 0)} resamples)"], rows, "Overall"))
    per = m.get("per_class") or {}
    pc_rows: list[list[str | Cell]] = [
        [c, metric_cell(f"precision:{c}", per[c]["precision"]), metric_cell(f"recall:{c}", per[c]["recall"]),
         metric_cell(f"f1:{c}", per[c]["f1"]), fmt(int(per[c]["support"]))]
        for c in classes if c in per
    ]
    for name, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        a = m.get(key) or {}
        if a:
            pc_rows.append([name, fmt(a.get("precision")), fmt(a.get("recall")), fmt(a.get("f1")), fmt(int(a.get("support", 0)))])
    blocks.append(Table(["class", "precision", "recall", "F1", "support"], pc_rows, "Per class"))
    cm = np.asarray(m["confusion_matrix"])
    figures = (
        ("confusion_matrix.png", lambda p: plot_confusion_matrix(cm, classes, p, title="Confusion matrix (counts)"),
         "Confusion matrix (counts; rows: true class)"),
        ("confusion_matrix_normalized.png",
         lambda p: plot_confusion_matrix(cm, classes, p, normalize=True, title="Confusion matrix (row-normalised)"),
         "Confusion matrix, each row as a percentage of its true class (recall on the diagonal)"),
        ("per_class.png", lambda p: plot_per_class_bars(m, p), "Precision, recall and F1 per class"),
    )
    for name, plot, caption in figures:
        blocks.append(Figure(_figure(ev, fig_dir, name, plot), caption))
    cmap = m.get("class_map") or {}
    for note in [*(m.get("notes") or []), *(cmap.get("notes") or [])]:
        blocks.append(Text(note, "note"))
    return Section("Evaluation", "evaluation", blocks)


def _calibration(run: RunFolder, predictor: Any, ev: Evaluation, fig_dir: Path) -> Section:

    t = float(ev.metrics.get("temperature", predictor.card.temperature))
    probs, y, _ = _probs(ev)
    cmap = ev.metrics.get("class_map") or {}
    networks = _networks(predictor)
    # One temperature undoes every row's scaling only when one network answered them all.
    identity = not cmap.get("merge") and not cmap.get("exclude") and len(networks) == 1
    blocks: list[Any] = []
    rows: list[tuple[str, Any]] = (
        [("temperature", metric_cell("temperature", t))] if len(networks) == 1 else
        [(f"temperature, {title}", metric_cell(f"temperature:{title.split()[0]}", float(net.temperature)))
         for title, _, net in networks]
    )
    summary = run.read_json("summary.json") if run.summary.is_file() else {}
    cal = summary.get("calibration")
    if cal:
        rows += [
            (f"ECE on validation ({cal.get('n')} images), before", metric_cell("val_ece_before", cal.get("ece_before"))),
            ("ECE on validation, after", metric_cell("val_ece_after", cal.get("ece_after"))),
        ]
    else:
        blocks.append(Text("No temperature was fitted (the validation split has fewer than 10 images): "
                           "probabilities are the network's own.", "note"))
    after = ece(probs, y)
    before_probs = None
    if identity and not math.isclose(t, 1.0):
        # The stored probabilities are softmax(z / T); softmax(T log p) gives back softmax(z) exactly.
        before_probs = softmax(np.log(np.clip(probs, 1e-300, 1.0)), 1.0 / t)
        rows.append((f"ECE on the evaluated images ({len(y)}), before", metric_cell("ece_before", ece(before_probs, y))))
    rows.append((f"ECE on the evaluated images ({len(y)}){', after' if before_probs is not None else ''}", metric_cell("ece_after", after)))
    blocks.insert(0, _kv_table(rows))
    if before_probs is not None:
        path = plot_reliability(before_probs, y, fig_dir / "reliability.png", probs_after=probs, temperature=t)
        caption = "Reliability diagram of the evaluated images before and after temperature scaling"
    else:
        path = plot_reliability(probs, y, fig_dir / "reliability.png")
        caption = "Reliability diagram of the evaluated images"
    blocks.append(Figure(path, caption + " (bars below the diagonal: over-confident)"))
    for title, file, net in networks:
        review = net.review
        if isinstance(review, dict) and review:
            flat = [(str(k), v) for k, v in review.items() if not isinstance(v, (dict, list))]
            if flat:
                blocks.append(_kv_table(flat, "Review policy stored with the model" + (f" ({title}, {file})" if len(networks) > 1 else "")))
    return Section("Calibration", "calibration", blocks)


def _gradcams(ev: Evaluation, explainer: Any, fig_dir: Path, echo: Echo) -> Section:

    frame = ev.predictions
    model_classes: list[str] = explainer.classes
    blocks: list[Any] = [Text(
        f"Grad-CAM (layer {explainer.layer}): red marks the regions whose features raised the score of the class "
        "named above the map. A network that looks at the background or the image border rather than the cell "
        "has learned a shortcut.")]
    missing: list[str] = []

    # A routed run: each map from the network that answered the image in the evaluation (load_or_evaluate
    # re-evaluates a routed run whose predictions.csv does not say).
    routed = isinstance(explainer, RoutedGradCAM) and "answered_by" in frame.columns
    if routed:
        blocks.append(Text("A routed run: each image's maps come from the network that answered it (named in its title)."))

    def explain(r: pd.Series, target: str | None) -> tuple[np.ndarray, Any] | None:
        path, crop = _split_key(str(r["path"]))
        try:
            rgb = load_rgb(path, crop=crop)
        except LeukoError:
            missing.append(str(path))
            return None
        idx = model_classes.index(target) if target in model_classes else None
        return rgb, explainer.explain_array(rgb, idx, **({"network": str(r["answered_by"])} if routed else {}))

    def by(e: Any) -> str:
        return f", {e.network} network" if e.network else ""

    # one confident, correct image per class
    items, titles = [], []
    correct = frame[frame["true"] == frame["pred"]]
    for c in ev.metrics["classes"]:
        rows = correct[correct["true"] == c]
        if rows.empty:
            continue
        r = rows.loc[rows["confidence"].idxmax()]
        got = explain(r, c)
        if got is None:
            continue
        rgb, e = got
        items.append([rgb, overlay(rgb, e.cam)])
        titles.append(f"{c} (p = {float(r['confidence']):.2f}{by(e)})\n{_split_key(str(r['path']))[0].name}")
    if items:
        path = plot_gradcam_grid(items, titles, fig_dir / "gradcam_correct.png", panel_titles=["image", "Grad-CAM: predicted class"], ncols=2)
        blocks.append(Figure(path, "The most confident correct image of each class, with the Grad-CAM of its class"))
    else:
        blocks.append(Text("No correctly classified image to show.", "note"))

    wrong = frame[frame["true"] != frame["pred"]].sort_values("confidence", ascending=False).head(MAX_MISCLASSIFIED)
    items, titles = [], []
    for _, r in wrong.iterrows():
        got = explain(r, str(r["pred"]))
        if got is None:
            continue
        rgb, e = got
        row = [rgb, overlay(rgb, e.cam)]
        if r["true"] in model_classes:
            row.append(overlay(rgb, explainer.explain_array(rgb, model_classes.index(r["true"]),
                                                            **({"network": e.network} if e.network else {})).cam))
        items.append(row)
        titles.append(f"true {r['true']} → predicted {r['pred']} (p = {float(r['confidence']):.2f}{by(e)})\n"
                      f"{_split_key(str(r['path']))[0].name}")
    n_wrong = int((frame["true"] != frame["pred"]).sum())
    if items:
        path = plot_gradcam_grid(items, titles, fig_dir / "gradcam_misclassified.png",
                                 panel_titles=["image", "Grad-CAM: predicted class", "Grad-CAM: true class"], ncols=1)
        blocks.append(Figure(path, f"The {len(items)} most confident of {n_wrong} misclassified images, "
                                   "with the Grad-CAM of the predicted and of the true class"))
    elif n_wrong == 0:
        blocks.append(Text("No image was misclassified."))
    if missing:
        blocks.append(Text(f"{len(missing)} image(s) could not be read for Grad-CAM (moved or deleted?), e.g. {missing[0]}", "note"))
        echo(f"Grad-CAM: {len(missing)} image(s) could not be read, e.g. {missing[0]}")
    return Section("Grad-CAM", "gradcam", blocks)


def _leakage(run: RunFolder) -> Section | None:
    path = run.path / "leakage.json"
    if not path.is_file():
        return None
    info = run.read_json("leakage.json")
    n = info.get("train_vs_heldout_pairs")
    rows = [(str(k), v) for k, v in info.items()]
    if n is None:
        text = Text("The leakage check left no pair count.", "note")
    elif int(n) > 0:
        text = Text(
            f"{int(n)} exact or near-duplicate pair(s) cross the train / held-out split: some held-out images have a "
            "copy in training, so the held-out scores are optimistic. Run `leuko data audit` for the list and use a "
            "group-aware split.", "warning")
    else:
        text = Text("No duplicate pair crosses the train / held-out split (file bytes and perceptual hash; "
                    "`leuko data audit` also compares CNN embeddings).")
    return Section("Leakage check", "leakage", [text, _kv_table(rows)])


# --------------------------------------------------------------------------- entry points


def build_report(
    run_dir: str | Path,
    fig_dir: str | Path,
    *,
    data: str | Path | None = None,
    layout: str | None = None,
    echo: Echo = print,
) -> Report:
    """The report of a run as a content model; its figures are written into ``fig_dir``."""
    import leuko

    run = RunFolder.open(run_dir)
    if not run.model.is_file():
        raise LeukoError(f"{run.path} has no model.pt (did training finish?)")
    figs = Path(fig_dir)
    figs.mkdir(parents=True, exist_ok=True)
    ev = load_or_evaluate(run, data=data, layout=layout, echo=echo)
    predictor = load_predictor(run.path)
    explainer = explainer_for(predictor)
    sections = [
        _overview(run, predictor, ev),
        _config(run),
        _data(run),
        _model(predictor, explainer, run, ev),
        _training(run, ev, figs),
        _evaluation(ev, figs),
        _calibration(run, predictor, ev, figs),
        _gradcams(ev, explainer, figs, echo),
    ]
    leak = _leakage(run)
    if leak is not None:
        sections.append(leak)
    names = [net.model.name for _, _, net in _networks(predictor)]
    model = names[0] if len(names) == 1 else f"routed (home {names[0]}, robust {names[1]})"
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return Report(
        title=f"leuko run report: {run.path.name}",
        subtitle=f"{model} on {len(predictor.classes)} classes; accuracy "
                 f"{fmt(ev.metrics.get('accuracy'))} on {int(ev.metrics.get('n', 0))} held-out images",
        sections=sections,
        footer=f"Written by leuko {leuko.__version__} on {now} from {run.path.resolve()}.",
    )


def write_report(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    data: str | Path | None = None,
    layout: str | None = None,
    echo: Echo = print,
) -> ReportFiles:
    """Write ``out`` (HTML, default ``RUN_DIR/report.html``), a ``.md`` beside it and ``<stem>_files/`` of PNGs."""
    html_path = Path(out).expanduser() if out is not None else Path(run_dir).expanduser() / "report.html"
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise LeukoError(f"--out must end in .html; got {html_path.name}")
    if html_path.is_dir():
        raise LeukoError(f"--out {html_path} is a folder; give a file name ending in .html")
    md_path = html_path.with_suffix(".md")
    fig_dir = html_path.parent / f"{html_path.stem}_files"
    if fig_dir.is_dir():
        for old in fig_dir.glob("*.png"):  # figures of an earlier report, which may not all be made again
            old.unlink()
    report = build_report(run_dir, fig_dir, data=data, layout=layout, echo=echo)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(report), encoding="utf-8")
    md_path.write_text(render_markdown(report, md_path.parent), encoding="utf-8")
    return ReportFiles(html_path, md_path, fig_dir)
