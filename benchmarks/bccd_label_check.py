"""Are BCCD's missed eosinophils eosinophils? A look at the cells without the model.

A PBC-trained model calls about 40% of BCCD's "eosinophils" neutrophils. Either
the model misses an eosinophil cue BCCD has, or those cells do not show one.
This script measures the cue an eosinophil is defined by, red-orange granules
in the cytoplasm, on the raw BCCD white-cell box (no preprocessing, no model):
the mean CIELAB a* (redness, OpenCV 8-bit scale) of the cytoplasm, i.e. the
inner ellipse of the box minus the nucleus (purple and dark) and its brightest
tenth. It groups the cells by label and by what the run predicted
(``RUN/eval/bccd-test/predictions.csv``, from ``leuko evaluate RUN --data
../shared/datasets/bccd --layout bccd --class-map pbc-to-bccd``) and, with
``--sheet``, writes a contact sheet of the eosinophils the run called
something else, for a person to judge.

Usage::

    .venv/bin/python benchmarks/bccd_label_check.py runs/robust/rb-I-soft [--sheet runs/robust/eos-missed.png]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from leuko.data import load_dataset
from leuko.data.layouts.bccd import read_voc
from leuko.data.locate import resolve_data
from leuko.data.samples import Sample

RED = 150.0
"""a* above which a cytoplasm counts as red (BCCD's neutrophils: 3% above it)."""


def wbc_box(sample: Sample) -> tuple[int, int, int, int]:
    """The annotated WBC box whose square crop ``sample`` is (the box nearest the crop's centre)."""
    _, _, objects = read_voc(sample.path.parent.parent / "Annotations" / (sample.path.stem + ".xml"))
    left, top, right, bottom = sample.crop  # type: ignore[misc]
    cx, cy = (left + right) / 2, (top + bottom) / 2
    boxes = [b for name, b in objects if name.upper() == "WBC"]
    return min(boxes, key=lambda b: ((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2)


def cytoplasm_redness(image: np.ndarray) -> float:
    """Mean CIELAB a* of a white-cell box's cytoplasm: inner ellipse, minus nucleus and brightest tenth."""
    rgb = image.astype(np.float32)
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    inner = ((xx - w / 2) / (0.45 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 < 1
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    nucleus = (rgb[..., 2] - rgb[..., 0] > 25) & (lab[..., 0] < 150)
    bright = lab[..., 0] > np.quantile(lab[..., 0][inner], 0.9)
    cytoplasm = inner & ~nucleus & ~bright
    return float(lab[..., 1][cytoplasm].mean()) if cytoplasm.any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--bccd", type=Path, default=None, help="BCCD folder (default: found like the datasets)")
    ap.add_argument("--sheet", type=Path, default=None, help="write the missed eosinophils' boxes here (PNG)")
    args = ap.parse_args()
    preds_file = args.run / "eval" / "bccd-test" / "predictions.csv"
    if not preds_file.is_file():
        sys.exit(f"error: {preds_file} not found; run leuko evaluate {args.run} --data ../shared/datasets/bccd "
                 "--layout bccd --class-map pbc-to-bccd first")
    with open(preds_file, newline="") as fh:
        pred = {r["path"].split("/")[-1]: r["pred"] for r in csv.DictReader(fh)}
    index = load_dataset(resolve_data("bccd", args.bccd), "bccd")
    groups: dict[str, list[float]] = {}
    missed: list[np.ndarray] = []
    for s in index.samples:
        if s.label not in ("eosinophil", "neutrophil"):
            continue
        called = pred.get(f"{s.path.name}#{','.join(map(str, s.crop or ()))}")
        if called is None:
            continue
        x0, y0, x1, y1 = wbc_box(s)
        box = np.asarray(Image.open(s.path).convert("RGB"))[max(y0, 0) : y1, max(x0, 0) : x1]
        groups.setdefault(f"{s.label} called {called}", []).append(cytoplasm_redness(box))
        if s.label == "eosinophil" and called != "eosinophil":
            missed.append(cv2.resize(box, (128, 128), interpolation=cv2.INTER_AREA))
    print(f"{'BCCD label, called':32s} {'n':>4s} {'cytoplasm a*':>13s} {'share a* > ' + str(int(RED)):>15s}")
    for key in sorted(groups):
        v = np.array(groups[key])
        print(f"{key:32s} {len(v):4d} {np.nanmean(v):8.1f} +-{np.nanstd(v):3.1f} {np.mean(v > RED):15.2f}")
    if args.sheet is not None and missed:
        cols = 9
        missed += [np.full_like(missed[0], 255)] * (-len(missed) % cols)
        sheet = np.concatenate([np.concatenate(missed[i : i + cols], 1) for i in range(0, len(missed), cols)], 0)
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.sheet), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        print(f"written: {args.sheet}")


if __name__ == "__main__":
    main()
