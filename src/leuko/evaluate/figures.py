"""Figures of an evaluation, written as PNG files.

Each function takes arrays or a metrics dict, writes one image, creates the
parent folders and returns the path. Figures are built on
:class:`matplotlib.figure.Figure` directly, never through ``pyplot``: nothing
is registered in pyplot's global figure list, so nothing leaks across hundreds
of calls (the usual ``plt.figure`` without ``plt.close`` leak), a notebook's
backend is left alone, and no display is needed (PNG goes through Agg).

Layouts are sized from the number of classes and tick labels are rotated, so
eight classes with long names ("immature granulocyte") stay readable.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from matplotlib.figure import Figure

from leuko.errors import LeukoError
from leuko.run.calibration import (
    DEFAULT_BINS,
    check_probs_targets,
    ece,
    reliability_bins,
)

if TYPE_CHECKING:
    import pandas

DPI = 120
_WRAP = 18  # characters per line of a wrapped tick label


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` (PNG unless the suffix says otherwise) and free it.

    Layout is left to ``layout="constrained"`` (legends outside axes
    included); ``bbox_inches="tight"`` would render every figure twice.
    """
    out = Path(path)
    if not out.suffix:
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    fig.clear()
    return out


def _wrap(name: str, width: int = _WRAP) -> str:
    return "\n".join(textwrap.wrap(str(name), width)) or str(name)


def _names(class_names: Sequence[str], n: int, *, what: str) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != n:
        raise LeukoError(f"class_names has {len(names)} names but {what} has {n} classes")
    return names


# --------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    normalize: bool = False,
    title: str | None = None,
) -> Path:
    """Confusion matrix (rows = true, columns = predicted), every cell annotated.

    ``normalize=True`` divides each row by its support and prints percentages
    (with the count underneath), which is what makes per-class recall visible
    on an imbalanced test set; rows without images stay empty.
    """
    m = np.asarray(cm, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise LeukoError(f"cm must be a square (C, C) matrix, got shape {m.shape}")
    names = _names(class_names, m.shape[0], what="cm")
    c = len(names)
    counts = m
    if normalize:
        rows = m.sum(axis=1, keepdims=True)
        shown = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) * 100.0
        vmax = 100.0
    else:
        shown = m
        vmax = max(float(m.max()), 1.0)
    side = max(4.5, 0.85 * c + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("% of true class" if normalize else "images")
    fontsize = 10 if c <= 6 else 8 if c <= 10 else 6
    for i in range(c):
        for j in range(c):
            if normalize:
                if counts[i].sum() == 0:
                    continue
                text = f"{shown[i, j]:.1f}%" + (f"\n({int(counts[i, j])})" if c <= 12 else "")
            else:
                text = f"{int(counts[i, j])}"
            colour = "white" if shown[i, j] > 0.55 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    ticks = np.arange(c)
    ax.set_xticks(ticks, [_wrap(n) for n in names], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, [_wrap(n) for n in names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    n = int(counts.sum())
    default = f"Confusion matrix{' (row-normalised)' if normalize else ''}, n = {n}"
    ax.set_title(title if title is not None else default)
    return _save(fig, path)


# --------------------------------------------------------------------------- training curves

_CURVE_COLUMNS = ("train_loss", "train_acc", "val_loss", "val_acc")


def _load_history(history: pandas.DataFrame | str | Path) -> pandas.DataFrame:
    """One row per epoch, whatever way the logger wrote it.

    Lightning's ``CSVLogger`` writes train and validation metrics of the same
    epoch on separate rows (the other columns NaN), and names epoch-level
    metrics ``<name>_epoch`` when they are also logged per step; both are
    folded here into ``epoch, train_loss, train_acc, val_loss, val_acc``.
    """
    import pandas as pd

    if isinstance(history, (str, Path)):
        p = Path(history)
        if not p.is_file():
            raise LeukoError(f"training history {p} does not exist")
        try:
            df = pd.read_csv(p)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise LeukoError(f"cannot read training history {p}: {exc}") from None
    elif isinstance(history, pd.DataFrame):
        df = history.copy()
    else:
        raise LeukoError(f"history must be a DataFrame or a path to metrics.csv, got {type(history).__name__}")
    if "epoch" not in df.columns:
        raise LeukoError(f"training history has no 'epoch' column (columns: {list(df.columns)})")
    for col in _CURVE_COLUMNS:
        if col not in df.columns and f"{col}_epoch" in df.columns:
            df[col] = df[f"{col}_epoch"]
    cols = [c for c in _CURVE_COLUMNS if c in df.columns]
    if not cols:
        raise LeukoError(f"training history has none of the columns {list(_CURVE_COLUMNS)}")
    df = df.dropna(subset=["epoch"])
    per_epoch = df[["epoch", *cols]].apply(pd.to_numeric, errors="coerce").groupby("epoch", sort=True).last()
    return per_epoch.reset_index()


def plot_training_curves(history: pandas.DataFrame | str | Path, path: str | Path, *, title: str | None = None) -> Path:
    """Accuracy and loss per epoch, train vs validation, in two panels.

    ``history`` is a DataFrame or a path to the run's ``metrics.csv`` with
    ``epoch, train_loss, train_acc, val_loss, val_acc``; validation columns
    may be missing or NaN (runs without a validation split), and a missing
    panel says so instead of failing.
    """
    df = _load_history(history)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, kind, label in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "loss")):
        drawn = False
        for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
            col = f"{split}_{kind}"
            if col not in df.columns:
                continue
            sub = df[["epoch", col]].dropna()
            if sub.empty:
                continue
            marker = "o" if len(sub) <= 30 else None
            ax.plot(sub["epoch"], sub[col], marker=marker, ms=3, color=colour,
                    label="train" if split == "train" else "validation")
            drawn = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, f"no {label} logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- per-class bars


def plot_per_class_bars(metrics: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Precision, recall and F1 of every class side by side, support under each name.

    Shows at a glance which classes carry the macro-F1 down, and whether
    that is a recall (missed cells) or a precision (false alarms) problem.
    """
    per_class = metrics.get("per_class") if isinstance(metrics, Mapping) else None
    if not per_class:
        raise LeukoError("metrics has no 'per_class' entry (expected compute_metrics output)")
    names = list(metrics.get("classes") or per_class)
    c = len(names)
    x = np.arange(c)
    width = 0.26
    fig = Figure(figsize=(max(6.0, 1.35 * c + 2.0), 4.8), layout="constrained")
    ax = fig.add_subplot()
    for k, (key, colour) in enumerate((("precision", "tab:blue"), ("recall", "tab:orange"), ("f1", "tab:green"))):
        vals = [float(per_class[n][key]) for n in names]
        ax.bar(x + (k - 1) * width, vals, width, label="F1" if key == "f1" else key, color=colour)
    labels = [f"{_wrap(n)}\n(n={int(per_class[n].get('support', 0))})" for n in names]
    ax.set_xticks(x, labels, rotation=30 if c > 5 else 0, ha="right" if c > 5 else "center", rotation_mode="anchor")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    macro = metrics.get("macro_f1")
    default = "Per-class precision, recall, F1" + (f" (macro-F1 {float(macro):.4f})" if macro is not None else "")
    ax.set_title(title if title is not None else default)
    return _save(fig, path)


# --------------------------------------------------------------------------- ROC


def plot_roc_curves(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """One-vs-rest ROC curve of every class with its AUC in the legend.

    Classes absent from ``y_true`` (or the only class in it) have no ROC curve
    and are listed as such in the legend rather than silently dropped.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    p, y = check_probs_targets(probs, y_true)
    names = _names(class_names, p.shape[1], what="probs")
    fig = Figure(figsize=(6.8, 6.0), layout="constrained")
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(names))]
    aucs = []
    for c, name in enumerate(names):
        pos = y == c
        if pos.all() or not pos.any():
            ax.plot([], [], color=colours[c], label=f"{name} (no ROC: {'no' if not pos.any() else 'only'} images)")
            continue
        fpr, tpr, _ = roc_curve(pos, p[:, c])
        auc = float(roc_auc_score(pos, p[:, c]))
        aucs.append(auc)
        ax.plot(fpr, tpr, color=colours[c], lw=1.6, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    default = "ROC, one vs rest" + (f" (macro AUC {np.mean(aucs):.3f})" if aucs else "")
    ax.set_title(title if title is not None else default)
    return _save(fig, path)


# --------------------------------------------------------------------------- reliability


def _reliability_panel(ax: Any, ax_hist: Any, probs: np.ndarray, y: np.ndarray, n_bins: int, label: str) -> float:
    bins = reliability_bins(probs, y, n_bins)
    score = ece(probs, y, n_bins)
    width = 1.0 / n_bins
    used = bins.counts > 0
    ax.bar(bins.centers[used], bins.accuracy[used], width=width, edgecolor="black", lw=0.6,
           color="tab:blue", label="accuracy")
    gap_lo = np.minimum(bins.accuracy[used], bins.confidence[used])
    gap_h = np.abs(bins.accuracy[used] - bins.confidence[used])
    ax.bar(bins.centers[used], gap_h, bottom=gap_lo, width=width, color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", lw=0.6, label="gap to confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{label}ECE = {score:.4f}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_hist.bar(bins.centers, bins.counts, width=width, color="grey", edgecolor="black", lw=0.4)
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("confidence (top-class probability)")
    ax_hist.set_ylabel("images")
    return score


def plot_reliability(
    probs: np.ndarray,
    y: Sequence[int] | np.ndarray,
    path: str | Path,
    title: str | None = None,
    *,
    probs_after: np.ndarray | None = None,
    temperature: float | None = None,
    n_bins: int = DEFAULT_BINS,
) -> Path:
    """Reliability diagram: accuracy per confidence bin vs the diagonal, ECE in the title.

    Bars below the diagonal mean over-confidence. With ``probs_after`` (the
    same images after temperature scaling, ``temperature`` for the label) a
    second panel shows the effect of calibration side by side. A histogram of
    confidences under each panel shows how many images each bar stands on.
    """
    p, t = check_probs_targets(probs, y)
    panels: list[tuple[np.ndarray, str]] = [(p, "")]
    if probs_after is not None:
        pa, _ = check_probs_targets(probs_after, t, n_classes=p.shape[1])
        t_label = f" (T = {temperature:.3g})" if temperature is not None else ""
        panels = [(p, "before: "), (pa, f"after temperature scaling{t_label}: ")]
    fig = Figure(figsize=(5.2 * len(panels), 6.2), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    scores = []
    for k, (pk, label) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        ax_hist = fig.add_subplot(grid[1, k], sharex=ax)
        scores.append(_reliability_panel(ax, ax_hist, pk, t, n_bins, label))
    head = title if title is not None else "Reliability diagram"
    if len(panels) == 1:
        head = f"{head} (ECE = {scores[0]:.4f})"
    else:
        head = f"{head} (ECE {scores[0]:.4f} → {scores[1]:.4f})"
    fig.suptitle(head)
    return _save(fig, path)


# --------------------------------------------------------------------------- gallery


def _as_rgb(img: Any, i: int) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise LeukoError(f"images[{i}] must be an HxW or HxWx3 array, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if a.max(initial=0) > 1.0:
            a = a / 255.0
        a = np.clip(a, 0.0, 1.0)
    return a


def plot_misclassified_gallery(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | Path,
    ncols: int = 6,
    *,
    title: str | None = None,
) -> Path:
    """A grid of images with a caption each (e.g. ``"true: monocyte\\npred: lymphocyte 0.93"``).

    Looking at the errors is the fastest way to find label noise and
    confusable classes. An empty list still writes a figure saying so, so a
    report can link it unconditionally.
    """
    if len(images) != len(titles):
        raise LeukoError(f"images has {len(images)} entries but titles has {len(titles)}")
    if ncols < 1:
        raise LeukoError(f"ncols must be at least 1, got {ncols}")
    n = len(images)
    if n == 0:
        fig = Figure(figsize=(5, 1.5))
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12, color="grey")
        if title:
            fig.suptitle(title)
        return _save(fig, path)
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.3 * cols, 2.7 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k >= n:
            continue
        a = _as_rgb(images[k], k)
        ax.imshow(a, cmap="gray" if a.ndim == 2 else None, interpolation="nearest" if max(a.shape[:2]) < 64 else "antialiased")
        ax.set_title("\n".join(_wrap(line, 26) for line in str(titles[k]).split("\n")), fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_gradcam_grid(
    items: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    path: str | Path | BinaryIO,
    *,
    panel_titles: Sequence[str] | None = None,
    ncols: int = 2,
    title: str | None = None,
) -> Path | BinaryIO:
    """Explanations in a grid: each item is an image and its heat-map overlays side by side.

    ``items[k]`` is a row of RGB arrays (e.g. the image, the Grad-CAM of the
    predicted class, that of the true class) under the caption ``titles[k]``;
    ``panel_titles`` labels the panels of every item. ``path`` may be a
    binary file object (PNG is written to it), so one picture can go straight
    into an HTTP answer without a temporary file.

    Panels are pasted as pixels (``figimage``) at fixed sizes rather than
    drawn in axes: a report draws a few of these per run and a web service
    one per request, and two dozen axes cost seconds; images keep their
    aspect ratio inside a square panel.
    """
    if len(items) != len(titles):
        raise LeukoError(f"items has {len(items)} entries but titles has {len(titles)}")
    if ncols < 1:
        raise LeukoError(f"ncols must be at least 1, got {ncols}")
    if not items:
        fig = Figure(figsize=(5, 1.5))
        fig.text(0.5, 0.5, "no images to explain", ha="center", va="center", fontsize=12, color="grey")
        if title:
            fig.suptitle(title)
    else:
        n_panels = max(len(row) for row in items)
        if n_panels == 0:
            raise LeukoError("every item needs at least one image")
        cols = min(ncols, len(items))
        rows = math.ceil(len(items) / cols)
        captions = ["\n".join(_wrap(line, 17 * n_panels) for line in str(t).split("\n")) for t in titles]
        side, gap, item_gap, margin = 2.2, 0.08, 0.4, 0.15  # inches
        cap_h = 0.17 * max(c.count("\n") + 1 for c in captions) + 0.08
        label_h = 0.22 if panel_titles else 0.0
        head_h = 0.45 if title else 0.0
        item_w = n_panels * side + (n_panels - 1) * gap
        row_h = cap_h + label_h + side + margin
        width = 2 * margin + cols * item_w + (cols - 1) * item_gap
        height = head_h + rows * row_h + margin
        fig = Figure(figsize=(width, height), dpi=DPI)
        px = int(round(side * DPI))
        for k, row in enumerate(items):
            r, c = divmod(k, cols)
            x0 = margin + c * (item_w + item_gap)
            top = height - head_h - r * row_h  # inches from the bottom
            fig.text((x0 + item_w / 2) / width, (top - 0.04) / height, captions[k], ha="center", va="top", fontsize=9)
            bottom = top - cap_h - label_h - side
            for j, img in enumerate(row):
                x = x0 + j * (side + gap)
                panel = _fit_panel(_as_rgb(img, k), px)
                ph, pw = panel.shape[:2]
                fig.figimage(panel, xo=int(round(x * DPI)) + (px - pw) // 2, yo=int(round(bottom * DPI)) + (px - ph) // 2,
                             origin="upper", cmap="gray" if panel.ndim == 2 else None)
                if panel_titles is not None and j < len(panel_titles):
                    fig.text((x + side / 2) / width, (bottom + side + 0.04) / height, _wrap(panel_titles[j], 34),
                             ha="center", va="bottom", fontsize=8)
        if title:
            fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=11)
    if isinstance(path, (str, Path)):
        return _save(fig, path)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    fig.clear()
    return path


def _fit_panel(a: np.ndarray, px: int) -> np.ndarray:
    """``a`` resized to fit a ``px`` square, aspect kept (nearest-neighbour when enlarging a lot, so pixels stay pixels)."""
    from PIL import Image

    u8 = a if a.dtype == np.uint8 else np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    h, w = u8.shape[:2]
    f = px / max(h, w)
    size = (max(1, int(round(w * f))), max(1, int(round(h * f))))
    method = Image.NEAREST if f >= 3 else Image.BILINEAR if f >= 1 else Image.LANCZOS
    return np.asarray(Image.fromarray(u8).resize(size, method))


# --------------------------------------------------------------------------- comparison


def plot_compare_bars(
    table: pandas.DataFrame,
    metric_columns: Sequence[str],
    path: str | Path,
    *,
    label_column: str | None = None,
    title: str | None = None,
) -> Path:
    """Grouped bars comparing runs or architectures on a few metrics.

    One group per metric, one bar per row of ``table``. Rows are labelled by
    ``label_column``, else by a non-default index, else by the first text
    column. A ``<metric>_std`` column, when present (as in a K-fold summary),
    becomes error bars.
    """
    import pandas as pd

    if not isinstance(table, pd.DataFrame) or table.empty:
        raise LeukoError("table must be a non-empty DataFrame with one row per run")
    metrics = list(metric_columns)
    if not metrics:
        raise LeukoError("metric_columns must name at least one column")
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise LeukoError(f"table has no column(s) {missing}; columns are {list(table.columns)}")
    if label_column is not None:
        if label_column not in table.columns:
            raise LeukoError(f"label_column {label_column!r} is not a column of table")
        labels = [str(v) for v in table[label_column]]
    elif not isinstance(table.index, pd.RangeIndex):
        labels = [str(v) for v in table.index]
    else:
        text_cols = [c for c in table.columns if c not in metrics and not pd.api.types.is_numeric_dtype(table[c])]
        labels = [str(v) for v in table[text_cols[0]]] if text_cols else [f"run {i}" for i in range(len(table))]
    values = table[metrics].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    n_runs, n_metrics = values.shape
    width = 0.8 / n_runs
    x = np.arange(n_metrics)
    fig = Figure(figsize=(max(6.0, 1.0 + n_metrics * (0.45 * n_runs + 0.6)), 4.8), layout="constrained")
    ax = fig.add_subplot()
    annotate = n_runs * n_metrics <= 40
    for r in range(n_runs):
        err = None
        stds = [f"{m}_std" for m in metrics]
        if all(s in table.columns for s in stds):
            err = pd.to_numeric(table[stds].iloc[r], errors="coerce").to_numpy(dtype=np.float64)
        pos = x - 0.4 + width * (r + 0.5)
        bars = ax.bar(pos, np.nan_to_num(values[r]), width, yerr=err, capsize=3 if err is not None else 0,
                      label=labels[r], color=f"C{r % 10}")
        if annotate:
            tops = np.nan_to_num(values[r]) + (np.nan_to_num(err) if err is not None else 0.0)
            for b, v, top in zip(bars, values[r], np.broadcast_to(tops, values[r].shape)):
                if np.isfinite(v):
                    ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, top), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=7,
                                rotation=90 if n_runs > 2 else 0)
    ax.set_xticks(x, [_wrap(m.replace("_", " ")) for m in metrics])
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        ax.set_ylim(0, 1.2)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=min(n_runs, 4))
    ax.set_title(title if title is not None else "Comparison")
    return _save(fig, path)


__all__ = [
    "DPI",
    "plot_compare_bars",
    "plot_confusion_matrix",
    "plot_gradcam_grid",
    "plot_misclassified_gallery",
    "plot_per_class_bars",
    "plot_reliability",
    "plot_roc_curves",
    "plot_training_curves",
]
