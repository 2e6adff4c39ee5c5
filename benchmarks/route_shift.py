"""Is a routed run safe in labs between its home lab and BCCD? Held-out home-lab images under made-up shifts.

A routed run (``leuko route``) lets its home network answer the images whose
smear colour is the home lab's and which the home network itself does not
call unlike its training data. The danger is a lab close enough to pass both
checks yet far enough to fool the home network. This script takes the routed
run's held-out split (images none of its networks trained on), shifts them
the ways labs differ - stain colour (a fraction of the measured PBC -> BCCD
shift of the smear's CIELAB mean), magnification (zoom in, zoom out onto the
smear's colour), focus (Gaussian blur) - and prints, per shift, the share the
home network answers and the accuracy of the home network alone, the robust
network alone and the routed run, and what the batch-level magnification
check (:func:`leuko.infer.route.lab_magnification`) says of the shifted set.
A safe gate keeps the routed column at or above the better of the two
wherever it sends images; where it cannot, the batch check should warn.

Usage::

    python benchmarks/route_shift.py runs/pbc-routed [--tta]
"""

from __future__ import annotations

import argparse
import sys
import time

import cv2
import numpy as np

from leuko.data.imageio import load_rgb
from leuko.errors import LeukoError
from leuko.infer import load_predictor
from leuko.infer.route import RoutedPredictor, lab_magnification
from leuko.run.folder import RunFolder
from leuko.run.config import load_config
from leuko.run.data import prepare_data

# Smear CIELAB mean, BCCD minus PBC (OpenCV 8-bit L, a, b; `SmearView` over all of each set, session 10).
BCCD_SHIFT = np.array([-20.0, -6.0, -10.6])


def colour_shift(image: np.ndarray, fraction: float) -> np.ndarray:
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab += fraction * BCCD_SHIFT
    return cv2.cvtColor(np.clip(np.rint(lab), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """Magnify by ``factor`` about the centre (> 1: crop and enlarge; < 1: shrink onto the border's median colour)."""
    h, w = image.shape[:2]
    if factor >= 1:
        ch, cw = int(round(h / factor)), int(round(w / factor))
        top, left = (h - ch) // 2, (w - cw) // 2
        return cv2.resize(image[top : top + ch, left : left + cw], (w, h), interpolation=cv2.INTER_CUBIC)
    small = cv2.resize(image, (int(round(w * factor)), int(round(h * factor))), interpolation=cv2.INTER_AREA)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    out = np.empty_like(image)
    out[...] = np.median(border, axis=0).astype(np.uint8)
    top, left = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma)


SHIFTS = {
    "none": lambda im: im,
    "colour 0.25 x BCCD": lambda im: colour_shift(im, 0.25),
    "colour 0.5 x BCCD": lambda im: colour_shift(im, 0.5),
    "colour 1.0 x BCCD": lambda im: colour_shift(im, 1.0),
    "zoom 1.4x (BCCD's magnification)": lambda im: zoom(im, 1.4),
    "zoom 0.7x": lambda im: zoom(im, 0.7),
    "blur sigma 1.5": lambda im: blur(im, 1.5),
    "zoom 1.4x + colour 0.25": lambda im: colour_shift(zoom(im, 1.4), 0.25),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("routed", help="a routed run folder (leuko route)")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="use the first N held-out images (quick look)")
    args = ap.parse_args(argv)
    try:
        predictor = load_predictor(args.routed)
        if not isinstance(predictor, RoutedPredictor):
            raise LeukoError(f"{args.routed} is not a routed run (make one with leuko route)")
        run = RunFolder.open(args.routed)
        cfg = load_config(run.config)
        test = prepare_data(cfg.data, seed=cfg.train.seed, split_file=run.split).test[: args.limit]
        images = [np.asarray(load_rgb(s.path)) for s in test]
    except LeukoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    y = np.array([predictor.classes.index(s.label) for s in test])
    keys = [s.key for s in test]
    print(f"{len(test)} held-out images of {run.path.name}{', TTA' if args.tta else ''}")
    print("| shift | home network answers | home alone | robust alone | routed | batch check: median red-cell size |")
    print("|---|---:|---:|---:|---:|---|")
    for name, fn in SHIFTS.items():
        t0 = time.time()
        shifted = [fn(im) for im in images]
        routed = predictor.predict_arrays(shifted, keys, tta=args.tta)
        home = predictor.home.predict_arrays(shifted, keys, tta=args.tta)
        robust = predictor.robust.predict_arrays(shifted, keys, tta=args.tta)
        acc = lambda p: float((p.pred == y[[keys.index(k) for k in p.keys]]).mean())  # noqa: E731
        share = float(np.mean(np.asarray(routed.answered_by) == "home"))
        check = lab_magnification(routed.red_cell_ratio)
        batch = "n/a" if check is None else f"{check['median_ratio']:.2f}x" + (", warns" if check["warning"] else "")
        print(f"| {name} | {share:.1%} | {acc(home):.4f} | {acc(robust):.4f} | {acc(routed):.4f} | {batch} |", flush=True)
        print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
