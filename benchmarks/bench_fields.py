"""White cells in whole smear fields: detection on BCCD, robustness, repeats, and counting speed.

Sections (all by default; pick with ``--only``):

* ``detect``: :func:`leuko.fields.find_cells` against BCCD's VOC ``WBC`` boxes at IoU 0.5:
  precision, recall, F1 at the operating score threshold and VOC AP. The threshold is
  chosen on the ``trainval`` fields only (5-fold cross-validation there gives the
  honest estimate of choosing it; the value chosen on all of trainval is what
  :data:`leuko.fields.find.DEFAULT_MIN_SCORE` holds); ``test`` (72 fields, never
  used to choose anything) is reported once at that threshold.
* ``robust``: the same finder on trainval fields rescaled (another magnification or
  camera), with another stain hue, white balance, exposure or focus: it is sized by
  the red cells and thresholds relative to each field, so none of these should matter.
* ``dedupe``: overlapping fields of one sample, made by cutting two windows out of each
  BCCD test field with a random stage move (the second one re-encoded as JPEG with a
  small exposure change and noise, as a second photograph would be). A pair of found
  cells in the two windows is the same cell when both overlap one true WBC box (in the
  original field's coordinates); pairs from different fields are different cells.
  Reports how many repeats the check merges and how many distinct pairs it wrongly merges.
* ``count``: ``count_fields`` with a classifier run (``--run``; without one, a stand-in with
  pbc-robust's network and input, untrained, which costs the same) over BCCD's test fields as
  one sample: fields/s and the share of time spent reading, finding (red-cell ruler included),
  classifying (crops and the network) and merging repeats.

* ``classify``: with ``--run``, the classifier's accuracy on BCCD's annotated boxes against its
  accuracy on the cells the finder found, in the fields whose labels.csv names one type (the
  issue asks that finding lose at most 2 points).

    .venv/bin/python benchmarks/bench_fields.py                       # every section
    .venv/bin/python benchmarks/bench_fields.py --only count --run /work/runs/pbc-robust
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "bccd"
PUBLISHED = "published WBC detection on BCCD: AP@0.5 0.98 (YOLOv7, WBC class); overall mAP 0.90-0.95 (YOLOv8 variants)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bccd", type=Path, default=DEFAULT_BCCD, help="BCCD folder (default: %(default)s)")
    p.add_argument("--only", action="append", choices=["detect", "robust", "dedupe", "count", "classify"], help="run only these sections")
    p.add_argument("--run", type=Path, default=None, help="classifier run for the count section (e.g. /work/runs/pbc-robust)")
    p.add_argument("--count-fields", type=int, default=72, help="fields counted in the count section (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="write the test split's detection report (and pictures) here")
    p.add_argument("--folds", type=int, default=5)
    return p.parse_args(argv)


def fmt(s: dict) -> str:
    return (f"P {s['precision']:.4f}  R {s['recall']:.4f}  F1 {s['f1']:.4f}  AP {s['ap']:.4f}  "
            f"(tp {s['tp']}, fp {s['fp']}, missed {s['fn']}, {s['true_cells']} true boxes, {s['fields']} fields)")


def detect(bccd: Path, folds: int, out: Path | None) -> None:
    from leuko.fields.evaluate import evaluate_fields
    from leuko.fields.find import DEFAULT_MIN_SCORE
    from leuko.fields.read import voc_fields

    print("== detect: BCCD WBC boxes, IoU 0.5")
    t = time.perf_counter()
    trainval = evaluate_fields(voc_fields(bccd, split="trainval"), min_score=0.0)
    names = [f.name for f in trainval.fields]
    cv_tp = cv_fp = cv_fn = 0
    chosen = []
    for k in range(folds):
        held = [n for i, n in enumerate(names) if i % folds == k]
        rest = [n for i, n in enumerate(names) if i % folds != k]
        thr = trainval.subset(rest).best_threshold()
        chosen.append(thr)
        r = trainval.subset(held).at_score(thr)
        cv_tp, cv_fp, cv_fn = cv_tp + r.tp, cv_fp + r.fp, cv_fn + r.fn
    p, rc = cv_tp / max(1, cv_tp + cv_fp), cv_tp / max(1, cv_tp + cv_fn)
    print(f"trainval {folds}-fold CV of the score threshold (chosen per fold: {', '.join(f'{c:.2f}' for c in chosen)}): "
          f"P {p:.4f}  R {rc:.4f}  F1 {2 * p * rc / (p + rc):.4f}")
    best = trainval.best_threshold()
    print(f"threshold with the best F1 on all trainval: {best:.3f} (leuko.fields.find.DEFAULT_MIN_SCORE = {DEFAULT_MIN_SCORE})")
    print(f"trainval at {DEFAULT_MIN_SCORE}: {fmt(trainval.at_score(DEFAULT_MIN_SCORE).summary())}")
    test = evaluate_fields(voc_fields(bccd, split="test"), min_score=DEFAULT_MIN_SCORE)
    s = test.summary()
    print(f"test     at {DEFAULT_MIN_SCORE}: {fmt(s)}")
    edge_fp = sum(1 for f in test.kept for i, m in enumerate(f.matched) if m < 0 and f.edge[i])
    print(f"  test false positives cut by the frame's edge: {edge_fp} of {s['fp']}")
    unboxed = fields_without_wbc_box(bccd, test)
    if unboxed:
        keep = [f.name for f in test.fields if f.name not in unboxed]
        print(f"test without the {len(unboxed)} field(s) whose annotation has no WBC box although labels.csv names a "
              f"white-cell type for them ({', '.join(sorted(unboxed))}): {fmt(test.subset(keep).summary())}")
    for line in test.error_lines():
        print(f"  {line}")
    n = len(trainval.fields) + len(test.fields)
    print(f"finding: {sum(f.seconds for f in trainval.fields + test.fields) / n * 1000:.1f} ms per field "
          f"({n} fields, {time.perf_counter() - t:.1f} s with decoding and matching)")
    print(PUBLISHED)
    if out is not None:
        print(f"written: {test.write(out)}")


def fields_without_wbc_box(bccd: Path, report) -> set[str]:
    """Fields with no true WBC box although BCCD's labels.csv names a white-cell type for them
    (an annotation that missed its cell: the pictures show one in each)."""
    from leuko.data.layouts.bccd import read_labels

    labels = read_labels(bccd / "labels.csv") if (bccd / "labels.csv").is_file() else {}
    out = set()
    for f in report.fields:
        try:
            number = int(f.name.rsplit("_", 1)[-1])
        except ValueError:
            continue
        if not f.truth and labels.get(number):
            out.add(f.name)
    return out


def robust(bccd: Path) -> None:
    import cv2

    from leuko.fields.evaluate import evaluate_fields
    from leuko.fields.read import read_field, voc_fields

    print("== robust: trainval fields (every other), changed as another lab's would be")
    fields = voc_fields(bccd, split="trainval")[::2]

    def hue(img: np.ndarray, deg: float) -> np.ndarray:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL).astype(np.int32)
        hsv[..., 0] = (hsv[..., 0] + int(deg * 256 / 360)) % 256
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)

    def gains(img: np.ndarray, g: tuple[float, float, float]) -> np.ndarray:
        return np.clip(img.astype(np.float32) * np.asarray(g, np.float32), 0, 255).astype(np.uint8)

    variants = {
        "as is": (1.0, lambda x: x),
        "scale 0.5 (320x240)": (0.5, lambda x: x),
        "scale 0.75": (0.75, lambda x: x),
        "scale 1.5 (960x720)": (1.5, lambda x: x),
        "hue +10 deg": (1.0, lambda x: hue(x, 10)),
        "hue -10 deg": (1.0, lambda x: hue(x, -10)),
        "warm white balance": (1.0, lambda x: gains(x, (1.08, 1.0, 0.9))),
        "20% darker": (1.0, lambda x: gains(x, (0.8, 0.8, 0.8))),
        "defocus (blur 2 px)": (1.0, lambda x: cv2.GaussianBlur(x, (0, 0), 2.0)),
    }
    with tempfile.TemporaryDirectory() as td:
        for name, (s, fn) in variants.items():
            items = []
            for p, truth in fields:
                img = read_field(p)
                if s != 1.0:
                    img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
                q = Path(td) / f"{p.stem}.png"
                cv2.imwrite(str(q), cv2.cvtColor(fn(img), cv2.COLOR_RGB2BGR))
                items.append((q, [tuple(v * s for v in b) for b in truth]))
            print(f"{name:22s} {fmt(evaluate_fields(items).summary())}", flush=True)


def dedupe(bccd: Path) -> None:
    import cv2

    from leuko.fields.dedupe import (
        MIN_CORRELATION,
        cell_patch,
        find_repeats,
        repeat_score,
    )
    from leuko.fields.find import field_ruler, find_cells
    from leuko.fields.read import read_field, voc_fields

    print("== dedupe: two overlapping 512x384 windows of each BCCD test field")
    rng = np.random.default_rng(0)
    W, H = 512, 384
    cells = []  # (field index, window, patch, true box index or -1)

    def owner(box, truth):
        best, arg = 0.0, -1
        area = max(1e-6, (box[2] - box[0]) * (box[3] - box[1]))
        for j, t in enumerate(truth):
            ix = max(0.0, min(box[2], t[2]) - max(box[0], t[0]))
            iy = max(0.0, min(box[3], t[3]) - max(box[1], t[1]))
            if ix * iy / area > best:
                best, arg = ix * iy / area, j
        return arg if best >= 0.5 else -1

    for fi, (p, truth) in enumerate(voc_fields(bccd, split="test")):
        img = read_field(p)
        d = field_ruler(img) or 91.0
        dx, dy = int(rng.integers(40, 129)), int(rng.integers(30, 97))
        for wi, (ox, oy) in enumerate(((0, 0), (dx, dy))):
            win = img[oy:oy + H, ox:ox + W].copy()
            if wi == 1:
                win = np.clip(win.astype(np.float32) * 1.03 + rng.normal(0, 2, win.shape), 0, 255).astype(np.uint8)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(win, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
                win = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            for c in find_cells(win, rbc_diameter=d):
                b = c.box
                cells.append((fi, wi, cell_patch(win, b, d, c.edge), owner((b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy), truth)))
    same, other, scores_same, scores_other = 0, 0, [], []
    t = time.perf_counter()
    for i in range(len(cells)):
        for j in range(i + 1, len(cells)):
            a, b = cells[i], cells[j]
            if (a[0], a[1]) == (b[0], b[1]):
                continue
            s = repeat_score(a[2], b[2])
            if a[0] == b[0] and a[3] >= 0 and a[3] == b[3]:
                same += 1
                scores_same.append(s)
            elif a[0] != b[0] or (a[3] >= 0 and b[3] >= 0):
                other += 1
                scores_other.append(s)
    dt = time.perf_counter() - t
    ss, so = np.asarray(scores_same), np.asarray(scores_other)
    print(f"{len(cells)} found cells; {same} repeat pairs (same true cell in both windows), {other} distinct pairs; "
          f"{dt / max(1, same + other) * 1000:.2f} ms per pair checked")
    print(f"repeat pairs' correlation: min {ss.min():.3f}, 5th percentile {np.percentile(ss, 5):.3f}; "
          f"distinct pairs': 99th percentile {np.percentile(so, 99):.3f}, max {so.max():.3f}")
    print(f"at MIN_CORRELATION {MIN_CORRELATION}: {int((ss >= MIN_CORRELATION).sum())} of {same} repeats merged, "
          f"{int((so >= MIN_CORRELATION).sum())} of {other} distinct pairs wrongly merged")
    # the same through find_repeats (hash candidates + pixel check), one sample per field
    found = {(fi, wi) for fi, wi, _, _ in cells}
    t = time.perf_counter()
    merged = 0
    for fi in sorted({fi for fi, _ in found}):
        idx = [k for k, c in enumerate(cells) if c[0] == fi]
        reps = find_repeats([cells[k][2] for k in idx], [f"w{cells[k][1]}" for k in idx])
        merged += sum(1 for r in reps if cells[idx[r.a]][3] >= 0 and cells[idx[r.a]][3] == cells[idx[r.b]][3])
    print(f"find_repeats per sample (hash candidates, then the pixel check): {merged} of {same} repeats merged "
          f"in {time.perf_counter() - t:.2f} s")


def count(bccd: Path, run: Path | None, n_fields: int) -> None:
    from leuko.fields.count import count_fields
    from leuko.fields.read import voc_fields
    from leuko.infer import load_predictor

    print("== count: fields/s of count_fields")
    tmp = None
    if run is None:
        tmp = tempfile.TemporaryDirectory()
        run = stand_in_run(Path(tmp.name) / "run")
        print("no --run: a stand-in with pbc-robust's network and input (EfficientNet-Lite0, bundled weights, "
              "128 px, cell-crop:0.7 + smear-norm, 8 classes) times the same work; its classes mean nothing")
    predictor = load_predictor(run)
    paths = [p for p, _ in voc_fields(bccd, split="test")][:n_fields]
    count_fields(predictor, paths[:4])  # warm-up: model, threads, caches
    t = time.perf_counter()
    result = count_fields(predictor, paths, sample="bccd-test")
    wall = time.perf_counter() - t
    sec = result.seconds
    total = sum(sec.values())
    share = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sec.items())
    print(f"{len(paths)} fields in {wall:.1f} s: {len(paths) / wall:.2f} fields/s ({share}); "
          f"{len(result.rows)} cells found, {result.n_cells} counted, {result.merged} merged, "
          f"{result.n_review} flagged; {predictor.describe()}")
    if tmp is None:
        for c in result.counts:
            if c.count:
                print(f"  {c.label:14s} {c.count:4d}  {c.percent:5.1f}%  ({c.ci95_low:.1f}-{c.ci95_high:.1f})")
    else:
        tmp.cleanup()


def classify(bccd: Path, run: Path | None, split: str | None) -> None:
    """Does finding cost classification accuracy? BCCD fields whose labels.csv names one type:
    the classifier on the annotated boxes (the ``bccd`` layout's crops, what ``leuko evaluate
    --data bccd`` scores) against the same classifier on the cells :func:`find_cells` found
    (every found cell of such a field should be of its type)."""
    from leuko.data.layouts.bccd import load_bccd
    from leuko.fields.count import predict_fields
    from leuko.infer import load_predictor

    print(f"== classify: the classifier on true boxes vs on found cells (BCCD single-type fields{', ' + split if split else ''})")
    if run is None:
        print("skipped: needs --run (a trained classifier)")
        return
    predictor = load_predictor(run)
    index = load_bccd(bccd)
    keep = None
    if split:
        keep = {x.strip() for x in (bccd / "ImageSets" / "Main" / f"{split}.txt").read_text().split()}
    samples = [x for x in index.samples if keep is None or Path(x.path).stem in keep]
    classes = list(predictor.classes)
    target = classes
    m = np.eye(len(classes))
    if "ig" in classes:  # PBC's eight classes onto the five white-cell types, as `leuko evaluate --class-map pbc-to-five`
        from leuko.data.classmap import ClassMap, map_probs

        target = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
        m, _ = ClassMap.load("pbc-to-five").matrix(classes, target)
        print("PBC classes mapped onto the five white-cell types (pbc-to-five: ig -> neutrophil; erythroblast, platelet excluded)")
    else:
        from leuko.data.classmap import map_probs

    def label(probs: np.ndarray) -> str:
        return target[int(np.argmax(map_probs(np.asarray(probs, float)[None], m)[0]))]

    pred = predictor.predict_samples(samples)
    by_key = {k: label(p) for k, p in zip(pred.keys, pred.probs)}
    crop_ok = [by_key[x.key] == x.label for x in samples if x.key in by_key]
    label_of = {str(x.path): x.label for x in samples}
    fields = sorted(label_of)
    t = time.perf_counter()
    result = predict_fields(predictor, fields, shared_ruler=False)
    found_ok = [label([r.probs[c] for c in classes]) == label_of[r.field] for r in result.rows]
    with_cells = {r.field for r in result.rows}
    print(f"true boxes: {len(crop_ok)} crops of {len(fields)} fields, accuracy {np.mean(crop_ok):.4f}")
    print(f"found cells: {len(found_ok)} cells in {len(with_cells)} fields ({len(fields) - len(with_cells)} fields with none), "
          f"accuracy {np.mean(found_ok):.4f} (difference {np.mean(found_ok) - np.mean(crop_ok):+.4f}); "
          f"{time.perf_counter() - t:.1f} s")


def stand_in_run(folder: Path) -> Path:
    """A run folder with pbc-robust's architecture and input, untrained head (speed only)."""
    import torch

    from leuko.models import build_model
    from leuko.run.card import ModelCard
    from leuko.run.folder import save_model

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 8, pretrained="bundled")
    info = model.leuko_info
    card = ModelCard.from_meta({
        "model": {"name": "efficientnet_lite0", "head": "linear", "dropout": None, "pretrained": "bundled"},
        "classes": ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"],
        "input": {"image_size": 128, "resize": "stretch", "preprocess": ["cell-crop:0.7", "smear-norm"],
                  "mean": list(info.mean), "std": list(info.std)},
        "temperature": 1.0,
    })
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "model.pt", model, card)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.bccd.is_dir():
        print(f"no BCCD folder at {args.bccd}", file=sys.stderr)
        return 2
    only = set(args.only or ["detect", "robust", "dedupe", "count", "classify"])
    if "detect" in only:
        detect(args.bccd, args.folds, args.out)
    if "robust" in only:
        robust(args.bccd)
    if "dedupe" in only:
        dedupe(args.bccd)
    if "count" in only:
        count(args.bccd, args.run, args.count_fields)
    if "classify" in only:
        classify(args.bccd, args.run, None)
        classify(args.bccd, args.run, "test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
