"""Peer benchmark: leuko's pbc-best recipe against Ultralytics YOLO11n-cls, same split, same wall-time budget.

1. leuko trains ``configs/pbc-best.yaml`` on PBC (or ``--leuko-run`` reuses a finished run of it) and is evaluated on
   the run's held-out test split (with TTA, as the recipe says).
2. YOLO11n-cls is built from ``yolo11n-cls.yaml`` (its pretrained weights need the internet), trained on exactly the
   same training/validation images (a symlinked ``train/ val/ test/`` tree made from the run's ``split.json``) with
   Ultralytics' ``time=`` budget set to leuko's training time, then scored on the same test images.

Both rows are printed together. Ultralytics is a benchmark extra (``pip install -e '.[bench]'``), never a runtime
dependency of leuko.

    python benchmarks/bench_peer.py                              # trains both (~2 x 30 min on 2 cores)
    python benchmarks/bench_peer.py --leuko-run runs/pbc-best    # reuse a finished pbc-best run
    # on a shared machine, YOLO can train at the same time as leuko (same contention), then the rows are joined:
    python benchmarks/bench_peer.py --yolo-only --split-from RUN --budget-min 30 --yolo-json yolo.json
    python benchmarks/bench_peer.py --leuko-run runs/pbc-best --yolo-json yolo.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np  # noqa: E402
from bench_train import cpu_now  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs as a script)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "pbc"


def leuko_row(data: Path, recipe: Path, run: Path | None, tta: bool) -> dict:
    from leuko.evaluate.run import evaluate_run
    from leuko.run.folder import RunFolder
    from leuko.train import train

    cpu_s = None
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="leuko-peer-")) / "pbc-best"
        t0, cpu0 = time.perf_counter(), cpu_now()
        train(recipe, run, data_path=data, echo=lambda s: print("   ", s, flush=True))
        train_s, cpu_s = time.perf_counter() - t0, cpu_now() - cpu0
    else:
        train_s = float(RunFolder.open(run).read_json("summary.json")["wall_time_s"])
    m = evaluate_run(run, data=data, echo=lambda s: None, figures=False, tta=tta, out=run / "eval" / "peer")
    return {"name": f"leuko {recipe.stem}", "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n_test": m["n"],
            "train_s": train_s, "cpu_s": cpu_s, "run": run}


def yolo_tree(run: Path, data: Path, dest: Path) -> tuple[list[Path], list[str], list[str]]:
    """train/ val/ test/ class folders of symlinks to the run's split; returns test paths, labels and classes."""
    from leuko.train import load_config
    from leuko.run.data import prepare_data

    cfg = load_config(run / "config.yaml")
    prepared = prepare_data(cfg.data, seed=cfg.train.seed, split_file=run / "split.json", data_path=data)
    for role, samples in (("train", prepared.train), ("val", prepared.val), ("test", prepared.test)):
        for i, s in enumerate(samples):
            link = dest / role / s.label / f"{i:05d}_{Path(s.path).name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(s.path).resolve())
    return [Path(s.path) for s in prepared.test], [s.label for s in prepared.test], list(prepared.classes)


def yolo_row(run: Path, data: Path, budget_s: float, imgsz: int, batch: int) -> dict:
    try:
        from ultralytics import YOLO
    except ImportError:
        raise SystemExit("error: ultralytics is not installed (pip install -e '.[bench]')") from None
    from leuko.evaluate.metrics import compute_metrics

    work = Path(tempfile.mkdtemp(prefix="leuko-yolo-"))
    test_paths, test_labels, classes = yolo_tree(run, data, work / "data")
    model = YOLO("yolo11n-cls.yaml")
    t0, cpu0 = time.perf_counter(), cpu_now()
    model.train(data=str(work / "data"), epochs=100, time=budget_s / 3600.0, imgsz=imgsz, batch=batch, device="cpu",
                workers=2, pretrained=False, amp=False, plots=False, project=str(work / "runs"), name="yolo11n-cls",
                exist_ok=True, verbose=False, seed=0)
    train_s, cpu_s = time.perf_counter() - t0, cpu_now() - cpu0
    best = YOLO(str(work / "runs" / "yolo11n-cls" / "weights" / "best.pt"))
    names = best.names  # index -> class folder name
    probs = []
    for i in range(0, len(test_paths), 64):
        for r in best.predict([str(p) for p in test_paths[i : i + 64]], imgsz=imgsz, device="cpu", verbose=False):
            p = r.probs.data.cpu().numpy()
            probs.append([float(p[[k for k, n in names.items() if n == c][0]]) for c in classes])
    probs_arr = np.asarray(probs)
    probs_arr /= probs_arr.sum(1, keepdims=True)
    y = np.array([classes.index(lbl) for lbl in test_labels])
    m = compute_metrics(y, probs_arr, classes, n_bootstrap=0)
    return {"name": "Ultralytics YOLO11n-cls (from yaml)", "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "n_test": len(y), "train_s": train_s, "cpu_s": cpu_s, "run": work}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "pbc-best.yaml")
    ap.add_argument("--leuko-run", type=Path, default=None, help="a finished run of the recipe (skips leuko's training)")
    ap.add_argument("--budget-min", type=float, default=None, help="YOLO's wall-time budget (default: leuko's training time)")
    ap.add_argument("--imgsz", type=int, default=None, help="YOLO input size (default: the recipe's image size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--yolo-only", action="store_true", help="train and score YOLO only (needs --split-from)")
    ap.add_argument("--split-from", type=Path, default=None, help="run folder whose split YOLO uses (default: leuko's run)")
    ap.add_argument("--yolo-json", type=Path, default=None, help="--yolo-only writes its row here; otherwise reuse the row in it")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"error: PBC images not found at {args.data} (pass --data)", file=sys.stderr)
        return 2
    from leuko.train import load_config

    cfg = load_config(args.recipe)
    imgsz = args.imgsz or cfg.data.image_size
    if args.yolo_only:
        if args.split_from is None or args.budget_min is None or args.yolo_json is None:
            print("error: --yolo-only needs --split-from, --budget-min and --yolo-json", file=sys.stderr)
            return 2
        yolo = yolo_row(args.split_from, args.data, args.budget_min * 60, imgsz, args.batch)
        args.yolo_json.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in yolo.items()}))
        print(f"{yolo['name']}: accuracy {yolo['accuracy']:.4f}, macro-F1 {yolo['macro_f1']:.4f}, "
              f"{yolo['train_s'] / 60:.1f} min wall, {yolo['cpu_s'] / 60:.1f} CPU-min (load {os.getloadavg()[1]:.1f})")
        return 0
    leuko = leuko_row(args.data, args.recipe, args.leuko_run, True)
    if args.yolo_json is not None and args.yolo_json.is_file():
        yolo = json.loads(args.yolo_json.read_text())
        print(f"YOLO row from {args.yolo_json} (trained on the same split, {yolo['train_s'] / 60:.1f} min)")
    else:
        budget = args.budget_min * 60 if args.budget_min else leuko["train_s"]
        print(f"YOLO11n-cls gets {budget / 60:.1f} min of training (leuko's), imgsz {imgsz}", flush=True)
        yolo = yolo_row(args.split_from or leuko["run"], args.data, budget, imgsz, args.batch)
    print(f"\nsame split: {leuko['n_test']} held-out PBC images; machine load {os.getloadavg()[0]:.1f}")
    print(f"{'model':<40} {'accuracy':>9} {'macro-F1':>9} {'train min':>10} {'CPU min':>8}")
    for r in (leuko, yolo):
        cpu = "n/a" if r.get("cpu_s") is None else f"{r['cpu_s'] / 60:.1f}"
        print(f"{r['name']:<40} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['train_s'] / 60:>10.1f} {cpu:>8}")
    (Path(leuko["run"]) / "peer.json").write_text(json.dumps(
        [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in (leuko, yolo)], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
