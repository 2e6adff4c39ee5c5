"""``leuko curve``: how much each labelled cell of a new lab buys, measured as a learning curve.

For each K of ``shots`` and each of ``draws`` seeded draws, K labelled cells per class of the new lab are
drawn (a class with fewer than 2K cells gives at most half of them), the run is fine-tuned on them exactly
as :func:`leuko.derive.finetune.finetune_network` does for ``leuko finetune`` (source-lab replay, the
run's preprocessing, augmentation and freeze mode), and scored on **all the remaining cells** of that lab,
and on the source lab's held-out part (does it forget?). Beside it: K = 0 (the run as it is) and a fresh
network trained on the same K cells only (the run's architecture from ImageNet weights), which says how much
the source lab is worth.

Images are decoded and preprocessed once; each point copies the source network and trains the copy, so
the time per point in the table is training plus scoring. The table (``curve.csv``/``curve.md``) gives
mean +- sd over draws of accuracy, macro-F1 over classes with >= 10 test cells, balanced accuracy and the
source lab's held-out accuracy; ``curve.png`` plots accuracy against labelled cells.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from leuko.data.classmap import ClassMap, map_probs
from leuko.data.samples import Sample
from leuko.derive.finetune import (
    array_logits,
    clone,
    decode_all,
    draw_shots,
    finetune_network,
    open_lab,
    replay_pool,
    source_heldout,
)
from leuko.errors import LeukoError
from leuko.evaluate.metrics import compute_metrics
from leuko.infer.backends import ModelInput
from leuko.models import build_model
from leuko.run.calibration import softmax

DEFAULT_SHOTS: tuple[int, ...] = (0, 5, 10, 25, 50)


@dataclass
class CurvePoint:
    """One fine-tuning (or zero-shot, or fresh) run of the curve."""
    method: str
    """``finetune``, ``zero-shot`` or ``fresh``."""
    shots: int
    draw: int
    n_train: int
    n_test: int
    accuracy: float
    macro_f1: float
    macro_f1_common: float
    """Macro-F1 over the classes with >= 10 test cells (what a target can rest on)."""
    balanced_accuracy: float
    source_accuracy: float | None
    seconds: float
    confusion: list[list[int]] | None = None
    """Counts of (true, predicted) over the test cells, in the lab's classes: which errors are left."""


def parse_shots(text: str | Sequence[int]) -> list[int]:
    """``"0,5,10,25"`` -> ``[0, 5, 10, 25]`` (sorted, unique, each >= 0)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        out = sorted({int(str(x).strip()) for x in items if str(x).strip()})
    except ValueError:
        raise LeukoError(f"--shots must be comma-separated integers, e.g. 0,5,10,25; got {text!r}") from None
    if not out or out[0] < 0:
        raise LeukoError(f"--shots must be integers >= 0; got {text!r}")
    return out


def _score(logits: np.ndarray, temperature: float, y: np.ndarray, classes: list[str], m: np.ndarray) -> dict[str, float]:

    probs = map_probs(softmax(logits, temperature), m)
    metrics = compute_metrics(y, probs, classes, n_bootstrap=0)
    small = metrics.get("small_classes") or {}
    return {"confusion": metrics["confusion_matrix"], "accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"]),
            "macro_f1_common": float(small.get("macro_f1_common", metrics["macro_f1"])),
            "balanced_accuracy": float(metrics["balanced_accuracy"])}


def learning_curve(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    layout: str | None = None,
    layout_options: dict[str, Any] | None = None,
    class_map: str | Path | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    draws: int = 5,
    fresh: bool = True,
    source: bool = True,
    steps: int | None = None,
    echo: Callable[[str], None] = print,
) -> list[CurvePoint]:
    """Measure the learning curve of ``run_dir`` on the labelled lab at ``data`` into ``out`` (see the module)."""
    import torch


    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise LeukoError(f"--draws must be a positive integer; got {draws!r}")
    shots = parse_shots(shots)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LeukoError(f"{out_dir} already exists; choose a new --out")
    lab = open_lab(run_dir, data, layout=layout, layout_options=layout_options, class_map=class_map)
    run, base, card, cfg, index, samples, lab_classes, mapping = (lab.run, lab.model, lab.card, lab.cfg, lab.index,
                                                                  lab.samples, lab.lab_classes, lab.mapping)
    cmap = ClassMap.load(class_map) if class_map else ClassMap()
    m, _ = cmap.matrix(card.classes, lab_classes)
    model_input = ModelInput.from_meta(card.input.model_dump())
    t0 = time.perf_counter()
    echo(f"decoding {len(samples)} cells of {index.root} and the source lab's replay and held-out images once")
    images, samples, failed = decode_all(samples, model_input.preprocess, "labelled cells")
    by_key = {s.key: i for i, s in enumerate(samples)}
    c2i_model = {c: i for i, c in enumerate(card.classes)}
    c2i_lab = {c: i for i, c in enumerate(lab_classes)}
    replay_img, replay_y, prepared = replay_pool(cfg, run, model_input.preprocess, card.classes, seed=0)
    held_img, held_kept, _ = decode_all(source_heldout(cfg, prepared), model_input.preprocess, "source-lab held-out images")
    held_y = np.array([c2i_model[s.label] for s in held_kept])
    prep_s = time.perf_counter() - t0
    echo(f"decoded in {prep_s:.0f} s ({len(failed)} unreadable)")
    points: list[CurvePoint] = []
    out_dir.mkdir(parents=True, exist_ok=True)

    def test_part(drawn: list[Sample]) -> tuple[list[int], np.ndarray]:
        used = {s.key for s in drawn}
        idx = [i for i, s in enumerate(samples) if s.key not in used]
        return idx, np.array([c2i_lab[samples[i].label] for i in idx])

    def record(point: CurvePoint) -> None:
        points.append(point)
        echo(f"{point.method:9s} K={point.shots:<3d} draw {point.draw}: accuracy {point.accuracy:.4f}, macro-F1 (>=10) "
             f"{point.macro_f1_common:.4f}, balanced {point.balanced_accuracy:.4f}"
             + (f", source {point.source_accuracy:.4f}" if point.source_accuracy is not None else "")
             + f" ({point.seconds:.0f} s)")
        (out_dir / "points.json").write_text(json.dumps([asdict(p) for p in points], indent=1))

    if 0 in shots:
        ts = time.perf_counter()
        idx, y = test_part([])
        z = array_logits(base, cfg, [images[i] for i in idx])
        src = float((array_logits(base, cfg, held_img).argmax(1) == held_y).mean()) if source else None
        record(CurvePoint("zero-shot", 0, 0, 0, len(idx), **_score(z, card.temperature, y, lab_classes, m),
                          source_accuracy=src, seconds=time.perf_counter() - ts))
    for k in [k for k in shots if k > 0]:
        for d in range(draws):
            drawn, _ = draw_shots(samples, k, seed=1000 * k + d, at_most_half=True)
            tr = [by_key[s.key] for s in drawn]
            y_tr = np.array([c2i_model[mapping.targets[samples[i].label]] for i in tr])
            idx, y = test_part(drawn)
            ts = time.perf_counter()
            net = clone(base)
            finetune_network(net, cfg, [images[i] for i in tr], y_tr, replay_images=replay_img, replay_labels=replay_y,
                             steps=steps, seed=d)
            z = array_logits(net, cfg, [images[i] for i in idx])
            src = float((array_logits(net, cfg, held_img).argmax(1) == held_y).mean()) if source else None
            record(CurvePoint("finetune", k, d, len(tr), len(idx), **_score(z, card.temperature, y, lab_classes, m),
                              source_accuracy=src, seconds=time.perf_counter() - ts))
            if fresh:
                ts = time.perf_counter()
                torch.manual_seed(d)
                spec = card.model
                if spec.is_ensemble:
                    spec = type(spec).model_validate(spec.members[0])
                scratch = build_model(spec.name, num_classes=len(card.classes), pretrained="bundled"
                                      if spec.pretrained == "bundled" else "none", head=spec.head, dropout=spec.dropout)
                finetune_network(scratch, cfg, [images[i] for i in tr], y_tr, steps=steps, lr=float(cfg.train.lr), seed=d)
                z = array_logits(scratch, cfg, [images[i] for i in idx])
                record(CurvePoint("fresh", k, d, len(tr), len(idx), **_score(z, 1.0, y, lab_classes, m),
                                  source_accuracy=None, seconds=time.perf_counter() - ts))
    write_curve(points, out_dir, title=f"{run.path.name} on {index.root.name}", preprocessing_s=prep_s, classes=lab_classes)
    return points


def summarise(points: Sequence[CurvePoint]) -> list[dict[str, Any]]:
    """One row per (method, K): mean and sd over draws."""
    rows = []
    keys = sorted({(p.method, p.shots) for p in points}, key=lambda x: (x[1], ["zero-shot", "finetune", "fresh"].index(x[0])))
    for method, k in keys:
        ps = [p for p in points if p.method == method and p.shots == k]
        row: dict[str, Any] = {"method": method, "shots": k, "draws": len(ps), "n_train": int(np.mean([p.n_train for p in ps])),
                               "n_test": int(np.mean([p.n_test for p in ps]))}
        for name in ("accuracy", "macro_f1_common", "macro_f1", "balanced_accuracy", "source_accuracy", "seconds"):
            vals = [getattr(p, name) for p in ps if getattr(p, name) is not None]
            row[name] = float(np.mean(vals)) if vals else None
            row[f"{name}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        rows.append(row)
    return rows


def summed_confusions(points: Sequence[CurvePoint]) -> dict[tuple[str, int], np.ndarray]:
    """(method, K) -> the confusion matrix summed over that row's draws (points without one are skipped)."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for p in points:
        if p.confusion is not None:
            c = np.asarray(p.confusion, dtype=int)
            key = (p.method, p.shots)
            out[key] = out[key] + c if key in out else c
    return out


def _confusion_lines(rows: Sequence[dict[str, Any]], sums: dict[tuple[str, int], np.ndarray], classes: Sequence[str],
                     top: int = 3) -> list[str]:
    """curve.md's error section: recall per class and the most frequent confusions of each row, over its draws."""
    lines = ["", "## Where the errors are (test cells summed over a row's draws)", "",
             "| method | K per class | " + " | ".join(f"{c} recall" for c in classes) + " | most frequent errors (true -> called) |",
             "|---|---:|" + "---:|" * len(classes) + "---|"]
    for r in rows:
        c = sums.get((r["method"], r["shots"]))
        if c is None:
            continue
        support = c.sum(1)
        recall = [f"{c[i, i] / support[i]:.2f} ({support[i]})" if support[i] else "-" for i in range(len(classes))]
        off = [(int(c[i, j]), classes[i], classes[j]) for i in range(len(classes)) for j in range(len(classes)) if i != j and c[i, j]]
        worst = ", ".join(f"{t} -> {p} {n}" for n, t, p in sorted(off, key=lambda e: -e[0])[:top]) or "none"
        lines.append(f"| {r['method']} | {r['shots']} | " + " | ".join(recall) + f" | {worst} |")
    return lines


def write_curve(points: Sequence[CurvePoint], out_dir: Path, *, title: str, preprocessing_s: float = 0.0,
                classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``curve.csv``, ``curve.md`` and ``curve.png`` of ``points`` into ``out_dir``; with ``classes`` (the lab's, the
    order of the points' confusion matrices) also ``confusion.csv`` and the errors left in ``curve.md``."""
    import pandas as pd

    rows = summarise(points)
    pd.DataFrame(rows).to_csv(out_dir / "curve.csv", index=False)
    sums = summed_confusions(points) if classes is not None else {}
    if sums:
        assert classes is not None
        pd.DataFrame([{"method": method, "shots": k, "true": classes[i], "predicted": classes[j], "cells": int(c[i, j])}
                      for (method, k), c in sums.items() for i in range(len(classes)) for j in range(len(classes))]
                     ).to_csv(out_dir / "confusion.csv", index=False)

    def ms(r: dict[str, Any], k: str) -> str:
        if r.get(k) is None:
            return "n/a"
        return f"{r[k]:.3f}" + (f" ± {r[k + '_sd']:.3f}" if r.get(k + "_sd") is not None else "")

    lines = [f"# Learning curve: {title}", "",
             "| method | K per class | draws | train cells | test cells | accuracy | macro-F1 (>= 10) | balanced acc. | "
             "source held-out | s / point |", "|---|---:|---:|---:|---:|---|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['shots']} | {r['draws']} | {r['n_train']} | {r['n_test']} | {ms(r, 'accuracy')} | "
                     f"{ms(r, 'macro_f1_common')} | {ms(r, 'balanced_accuracy')} | {ms(r, 'source_accuracy')} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"Images decoded and preprocessed once: {preprocessing_s:.0f} s (not in the per-point times)."]
    if sums:
        assert classes is not None
        lines += _confusion_lines(rows, sums, list(classes))
    (out_dir / "curve.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("finetune", "o-"), ("fresh", "s--")):
        rs = [r for r in rows if r["method"] in (method, "zero-shot") and (method == "finetune" or r["method"] == method)]
        if not rs:
            continue
        x = [r["n_train"] for r in rs]
        yv = [r["accuracy"] for r in rs]
        err = [r["accuracy_sd"] or 0.0 for r in rs]
        ax.errorbar(x, yv, yerr=err, fmt=style, capsize=3, label="fine-tuned from the run" if method == "finetune"
                    else "fresh network, these cells only")
    ax.set_xlabel("labelled cells of the new lab")
    ax.set_ylabel("accuracy on the remaining cells")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=120)
    plt.close(fig)
    return rows


__all__ = ["DEFAULT_SHOTS", "CurvePoint", "learning_curve", "parse_shots", "summarise", "summed_confusions", "write_curve"]
