"""Result tables as the studies print them: CSV for machines, Markdown for papers and READMEs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

#: Headline columns of a comparison/cross-validation row, with their Markdown headers.
#: "precision", "recall" and "F-measure" are macro averages, as in the four-network study's table.
ROW_COLUMNS: dict[str, str] = {
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F-measure",
    "balanced_accuracy": "Balanced acc.",
    "weighted_f1": "Weighted F1",
    "ece": "ECE",
}


def metrics_row(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of one ``metrics.json`` (macro-averaged precision/recall/F1)."""
    macro = metrics["macro_avg"]
    return {
        "accuracy": float(metrics["accuracy"]),
        "precision": float(macro["precision"]),
        "recall": float(macro["recall"]),
        "f1": float(macro["f1"]),
        "balanced_accuracy": float(metrics["balanced_accuracy"]),
        "weighted_f1": float(metrics["weighted_f1"]),
        "ece": float(metrics["ece"]) if metrics.get("ece") is not None else math.nan,
    }


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return "" if v is None else str(v)


def markdown_table(frame: pd.DataFrame, *, headers: Mapping[str, str] | None = None, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (floats to ``digits`` places, NaN as blank)."""
    headers = dict(headers or {})
    cols = list(frame.columns)
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in cols) + " |",
        "| " + " | ".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in cols) + " |",
    ]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(frame: pd.DataFrame, stem: Path, *, title: str, headers: Mapping[str, str] | None = None, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """``stem.csv`` (full precision) and ``stem.md`` (title, table, notes); returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    frame.to_csv(csv_path, index=False)
    text = f"# {title}\n\n" + markdown_table(frame, headers=headers)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    md_path.write_text(text)
    return csv_path, md_path


def epoch_table(metrics_csv: str | Path) -> pd.DataFrame:
    """Per-epoch accuracy/loss (the MobileNetV2 study's Table 1) from a run's ``metrics.csv``."""
    frame = pd.read_csv(metrics_csv)
    keep = [c for c in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s") if c in frame.columns]
    return frame[keep]
