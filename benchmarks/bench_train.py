"""Training and inference speed of leuko against a naive PyTorch loop, and time-to-accuracy on PBC.

Part 1 (throughput): images/s of training steps and of inference for
EfficientNet-Lite0 and MobileNetV2 at 128 and 224 px, on real PBC images:

* naive: PIL open/convert + torchvision Resize/ToTensor/Normalize for every
  image of every batch, a plain ``model.train()`` loop, contiguous tensors;
* leuko: images decoded once into the decoded-image cache, channels-last
  tensors, the recipe's freezing (``--freeze``), same optimiser and batch.

Part 2 (time to accuracy): ``leuko train`` with a recipe (default
``configs/pbc-fast.yaml``) on PBC, then ``leuko evaluate`` on its held-out
test split; prints accuracy, macro-F1 and wall time, and the naive loop's
time for the same number of training images (measured on one epoch of the
same data, extrapolated), so the speed-up is measured in the same run.

    python benchmarks/bench_train.py                  # both parts
    python benchmarks/bench_train.py --skip-accuracy  # throughput only
    python benchmarks/bench_train.py --skip-throughput --recipe configs/pbc-best.yaml --tta \
        --budget-min 30 --target 0.99 --target-f1 0.99   # issue 11's pbc-best targets
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "pbc"


def naive_batches(paths: list[Path], labels: list[int], size: int, mean, std, batch: int):
    """The loop people write first: decode every image, every time, with PIL + torchvision."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(mean, std)])
    for i in range(0, len(paths), batch):
        xs = [tf(Image.open(p).convert("RGB")) for p in paths[i : i + batch]]
        yield torch.stack(xs), torch.tensor(labels[i : i + batch])


def leuko_batches(samples, c2i, size: int, mean, std, batch: int, train: bool, augment: str = "none"):
    from leuko.data.pipeline import SampleDataset, make_loader
    from leuko.data.transforms import build_transforms

    tf = build_transforms(size, train=train, augment=augment if train else "none", mean=mean, std=std, seed=0)
    ds = SampleDataset(samples, c2i, size, transform=tf, cache=True)
    loader = make_loader(ds, batch, shuffle=train, num_workers=0, seed=0)
    for x, y in loader:
        yield x.contiguous(memory_format=torch.channels_last), y


def time_train(model, batches, n_batches: int, channels_last: bool) -> float:
    """Images/s of optimiser steps (first batch is warm-up, not timed)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    seen, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        if i == 1:
            t0, seen = time.perf_counter(), 0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        if i >= n_batches:
            break
    return seen / (time.perf_counter() - t0)


@torch.no_grad()
def time_infer(model, batches, n_batches: int, channels_last: bool) -> float:
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    seen, t0 = 0, None
    for i, (x, _) in enumerate(batches):
        if i == 1:
            t0, seen = time.perf_counter(), 0
        model(x)
        seen += len(x)
        if i >= n_batches:
            break
    return seen / (time.perf_counter() - t0)


def throughput(data: Path, n_batches: int, batch: int, freeze_mode: str) -> list[tuple]:
    from leuko.data import load_dataset
    from leuko.models import build_model, freeze

    index = load_dataset(data)
    rng = np.random.default_rng(0)
    n = batch * (n_batches + 1)
    chosen = [index.samples[i] for i in rng.choice(len(index.samples), size=min(n, len(index.samples)), replace=False)]
    c2i = index.class_to_index
    labels = [c2i[s.label] for s in chosen]
    rows = []
    for name in ("efficientnet_lite0", "mobilenetv2"):
        for size in (128, 224):
            info = build_model(name, 0, pretrained="none").leuko_info
            res = {}
            for kind in ("naive", "leuko"):
                torch.manual_seed(0)
                model = build_model(name, len(index.classes), pretrained="none")
                if kind == "leuko":
                    freeze(model, freeze_mode)
                    batches = lambda train: leuko_batches(chosen, c2i, size, info.mean, info.std, batch, train)  # noqa: E731
                else:
                    batches = lambda train: naive_batches([s.path for s in chosen], labels, size, info.mean, info.std, batch)  # noqa: E731
                if kind == "leuko":
                    list(leuko_batches(chosen, c2i, size, info.mean, info.std, batch, False))  # build the cache (once per dataset)
                res[kind] = (
                    time_train(model, batches(True), n_batches, kind == "leuko"),
                    time_infer(model, batches(False), n_batches, kind == "leuko"),
                )
            rows.append((name, size, *res["naive"], *res["leuko"]))
            print(
                f"  {name:<20} {size:>4}px  train {res['naive'][0]:7.1f} -> {res['leuko'][0]:7.1f} img/s "
                f"({res['leuko'][0] / res['naive'][0]:.1f}x)   infer {res['naive'][1]:7.1f} -> {res['leuko'][1]:7.1f} img/s "
                f"({res['leuko'][1] / res['naive'][1]:.1f}x)",
                flush=True,
            )
    return rows


def cpu_now() -> float:
    """CPU seconds used so far by this process and its finished children (DataLoader workers)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def accuracy_run(data: Path, recipe: Path, overrides: list[str], tta: bool = False) -> dict:
    from leuko.evaluate.run import evaluate_run
    from leuko.models import build_model
    from leuko.train import load_config, train
    from leuko.run.data import prepare_data

    out = Path(tempfile.mkdtemp(prefix="leuko-bench-")) / "run"
    t0, cpu0 = time.perf_counter(), cpu_now()
    result = train(recipe, out, overrides=overrides, data_path=data, echo=lambda s: print("   ", s, flush=True))
    train_s = time.perf_counter() - t0
    # CPU seconds of this process and its finished data-loader workers: on a shared machine wall time includes
    # waiting for other jobs; CPU time / cores is about what the same run needs on idle cores.
    cpu_s = cpu_now() - cpu0
    m = evaluate_run(out, echo=lambda s: None, figures=False, tta=tta)
    # the naive loop on the same training images: one epoch, timed, extrapolated to the run's epochs
    cfg = load_config(out / "config.yaml")
    prepared = prepare_data(cfg.data, seed=cfg.train.seed, split_file=out / "split.json", data_path=data)
    info = build_model(cfg.model.name, 0, pretrained="none").leuko_info
    c2i = {c: i for i, c in enumerate(prepared.classes)}
    paths = [s.path for s in prepared.train]
    labels = [c2i[s.label] for s in prepared.train]
    order = np.random.default_rng(0).permutation(len(paths))[: 20 * cfg.train.batch_size]
    model = build_model(cfg.model.name, len(prepared.classes), pretrained=cfg.model.pretrained)
    naive_ips = time_train(
        model,
        naive_batches([paths[i] for i in order], [labels[i] for i in order], cfg.data.image_size, info.mean, info.std, cfg.train.batch_size),
        19,
        False,
    )
    naive_s = len(prepared.train) * result.epochs_run / naive_ips
    import pandas as pd

    leuko_ips = float(pd.read_csv(out / "metrics.csv")["images_per_s"].median())
    return {"leuko_ips": leuko_ips,"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n_test": m["n"], "train_s": train_s, "cpu_s": cpu_s, "naive_s": naive_s,
            "naive_ips": naive_ips, "n_train": len(prepared.train), "epochs": result.epochs_run, "run": str(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "pbc-fast.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override a recipe key")
    ap.add_argument("--batches", type=int, default=6, help="timed batches per throughput cell")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--freeze", default="bn", help="leuko's freezing in the throughput cells (the recipe's)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--budget-min", type=float, default=15.0, help="target training time for the accuracy part")
    ap.add_argument("--target", type=float, default=0.98, help="target held-out accuracy")
    ap.add_argument("--target-f1", type=float, default=0.0, help="target held-out macro-F1")
    ap.add_argument("--tta", action="store_true", help="evaluate with test-time augmentation (as pbc-best does)")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"error: PBC images not found at {args.data} (pass --data)", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, data {args.data}")
    if not args.skip_throughput:
        print("throughput (naive PyTorch loop -> leuko), batch", args.batch_size)
        throughput(args.data, args.batches, args.batch_size, args.freeze)
    if not args.skip_accuracy:
        print(f"time to accuracy: {args.recipe.name}")
        r = accuracy_run(args.data, args.recipe, args.overrides, tta=args.tta)
        ok = r["accuracy"] >= args.target and r["macro_f1"] >= args.target_f1 and r["train_s"] <= args.budget_min * 60
        print(
            f"  leuko: {r['n_train']} training images x {r['epochs']} epochs in {r['train_s'] / 60:.1f} min -> "
            f"held-out accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f} on {r['n_test']} images{' (TTA)' if args.tta else ''}"
        )
        print(f"  training CPU time {r['cpu_s'] / 60:.1f} CPU-min = {r['cpu_s'] / 60 / (os.cpu_count() or 1):.1f} min on "
              f"{os.cpu_count()} idle cores (wall {r['train_s'] / 60:.1f} min at load {os.getloadavg()[1]:.1f})")
        print(
            f"  training loop: leuko {r['leuko_ips']:.1f} img/s (median epoch) vs naive loop {r['naive_ips']:.1f} img/s on the "
            f"same images and model ({r['leuko_ips'] / r['naive_ips']:.1f}x); the naive loop would need "
            f"{r['naive_s'] / 60:.1f} min for the same epochs, leuko took {r['train_s'] / 60:.1f} min end to end"
        )
        print(f"  target: accuracy >= {args.target}, macro-F1 >= {args.target_f1} within {args.budget_min:.0f} min: "
              f"{'MET' if ok else 'NOT MET'}  (run: {r['run']}; machine load {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
