"""``leuko predict``: classify image files and folders, write CSV/JSON, report unreadable files.

Folders are searched recursively for image files; each unreadable file is
named with its reason and the rest are still classified. The model is a run
folder, its ``model.pt`` (PyTorch) or an exported ``.onnx`` (onnxruntime,
without importing torch): :func:`leuko.infer.load_predictor` decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from leuko.data.imageio import is_image_name
from leuko.errors import LeukoError
from leuko.infer.load import load_predictor


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named directly, or found (recursively) in folders; sorted, unique."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.is_file() and is_image_name(q)))
        elif p.is_file():
            found.append(p)
        else:
            raise LeukoError(f"no such file or folder: {p}")
    seen: set[Path] = set()
    unique = []
    for p in found:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    if not unique:
        raise LeukoError("no image files found in the given paths")
    return unique


@dataclass
class PredictResult:
    """Per-image predictions and the files that could not be read."""

    frame: pd.DataFrame
    failed: list[tuple[str, str]]
    classes: list[str]
    magnification: dict | None = None
    """A routed run: the batch's magnification check (:func:`leuko.infer.route.lab_magnification`)."""


def predict_images(
    model: str | Path,
    inputs: Sequence[str | Path],
    *,
    tta: bool = False,
    top_k: int = 1,
    batch_size: int = 64,
) -> PredictResult:
    """Classify images with a run folder, its ``model.pt`` or a ``.onnx``; rows follow the sorted file list.

    Each row carries the model's review flag and its reasons (low confidence,
    unlike the training data; :mod:`leuko.infer.review`), so drift shows in the
    output a lab counts from; a routed run adds which network answered and why.
    """
    paths = collect_images(inputs)
    predictor = load_predictor(model, batch_size=batch_size)
    if not 1 <= top_k <= len(predictor.classes):
        raise LeukoError(f"--top-k must be between 1 and {len(predictor.classes)}; got {top_k}")
    pred = predictor.predict_paths(paths, tta=tta)
    classes = predictor.classes
    reasons = predictor.review_reasons(pred)
    rows = []
    for i, (key, p) in enumerate(zip(pred.keys, pred.probs)):
        order = np.argsort(-p)[:top_k]
        row: dict[str, object] = {"path": key, "pred": classes[order[0]], "confidence": float(p[order[0]])}
        for rank, j in enumerate(order[1:], start=2):
            row[f"top{rank}"] = classes[j]
            row[f"top{rank}_p"] = float(p[j])
        for c, v in zip(classes, p):
            row[f"p_{c}"] = float(v)
        row["review"] = bool(reasons[i])
        row["review_reasons"] = "; ".join(reasons[i])
        if pred.answered_by is not None:
            row["answered_by"] = pred.answered_by[i]
            row["routed_because"] = pred.route_reasons[i]  # type: ignore[index]
            row["red_cell_ratio"] = float(pred.red_cell_ratio[i]) if pred.red_cell_ratio is not None else float("nan")
        rows.append(row)
    magnification = None
    if pred.answered_by is not None:
        from leuko.infer.route import lab_magnification

        magnification = lab_magnification(pred.red_cell_ratio)
    return PredictResult(pd.DataFrame(rows), pred.failed, classes, magnification)


def write_predictions(result: PredictResult, out: Path) -> Path:
    """CSV (``.csv``) or JSON (``.json``) by suffix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        payload = {
            "classes": result.classes,
            "predictions": json.loads(result.frame.to_json(orient="records")),  # NaN -> null: valid JSON
            "failed": [{"path": p, "reason": r} for p, r in result.failed],
        }
        out.write_text(json.dumps(payload, indent=1))
    elif out.suffix.lower() == ".csv":
        result.frame.to_csv(out, index=False)
    else:
        raise LeukoError(f"--out must end in .csv or .json; got {out.name}")
    return out
