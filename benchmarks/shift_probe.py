"""Which part of another lab's look breaks a PBC model: colour, blur, or neither?

Takes a trained run and its own held-out PBC test images (neutrophils,
lymphocytes, monocytes, eosinophils: the classes BCCD has), and predicts them
as they are and with one of BCCD's differences imposed, keeping everything
else PBC's:

* ``blur``: a Gaussian blur (sigma in pixels of the decoded frame), since
  BCCD's fields are far softer (Laplacian variance ~34 vs ~250 at 128 px);
* ``BCCD colour``: Reinhard transfer onto the mean CIELAB statistics of BCCD's
  crops (bluer, paler, half the contrast);
* both.

A large drop for one of them says what to normalise or augment against.
It reads no BCCD labels. Usage::

    .venv/bin/python benchmarks/shift_probe.py runs/robust/probe-cell55 [-n 160]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import cv2
import numpy as np
import torch

from leuko.data import load_dataset
from leuko.data.locate import resolve_data
from leuko.data.preprocess import decode_raw, lab_stats, reinhard
from leuko.infer import Predictor
from leuko.run.config import load_config
from leuko.run.data import prepare_data

BCCD_CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("-n", type=int, default=160, help="PBC test images (random, seeded)")
    ap.add_argument("--bccd", type=Path, default=None, help="BCCD folder (default: found like the datasets)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    predictor = Predictor(args.run, num_workers=1)
    cfg = load_config(args.run / "config.yaml")
    data = prepare_data(cfg.data, seed=cfg.train.seed, split_file=args.run / "split.json")
    rng = random.Random(0)
    test = rng.sample([s for s in data.test if s.label in BCCD_CLASSES], args.n)
    pre = predictor.model_input.preprocess
    raws = [decode_raw(s, pre) for s in test]
    bccd = load_dataset(resolve_data("bccd", args.bccd), "bccd")
    bccd_stats = np.mean([lab_stats(pre(decode_raw(s, pre))) for s in rng.sample(bccd.samples, 60)], axis=0)
    y = np.array([s.label for s in test])

    def score(images: list[np.ndarray], name: str) -> None:
        probs = predictor.predict_arrays(images).probs
        pred = np.array(predictor.classes)[probs.argmax(1)]
        pred = np.where(pred == "ig", "neutrophil", pred)  # the pbc-to-bccd class map
        print(f"{name:28s} accuracy {np.mean(pred == y):.3f}   predicted monocyte {np.mean(pred == 'monocyte'):.2f}")

    score(raws, "PBC as is")
    for sigma in (1.5, 3.0):
        score([cv2.GaussianBlur(r, (0, 0), sigma) for r in raws], f"blur sigma {sigma}")
    score([reinhard(r, bccd_stats) for r in raws], "BCCD colour (Reinhard)")
    score([cv2.GaussianBlur(reinhard(r, bccd_stats), (0, 0), 3.0) for r in raws], "BCCD colour + blur 3")


if __name__ == "__main__":
    main()
