"""Prediction throughput end to end from image files: a naive PyTorch loop, leuko's Predictor, leuko's ONNX predictor.

Same model in every row: EfficientNet-Lite0 with its bundled ImageNet weights
and an 8-class head (a run folder is built in a temp dir with the registry and
:func:`leuko.run.folder.save_model`, then exported with :func:`leuko.infer.export_onnx`;
training is not needed to measure speed). Rows (images/s, higher is better):

* ``naive``: what a user writes first: for each file ``PIL.Image.open ->
  convert("RGB") -> resize -> ToTensor -> Normalize``, then ``model(x[None])``
  one image at a time (eval mode, ``torch.no_grad``).
* ``leuko Predictor``: ``Predictor(run).predict_paths(paths)``: JPEG draft
  decoding on a thread pool overlapped with batched channels-last forward passes.
* ``leuko OnnxPredictor``: ``OnnxPredictor(model.onnx).predict_paths(paths)``:
  the same decoding feeding onnxruntime (all graph optimisations, intra-op
  threads = available CPUs), without torch.

Every row decodes every file (no decoded-image cache), and all rows see warm
OS file caches (each file is read once before timing). Model loading (and the
ONNX session's graph optimisation) is timed separately and not counted in
images/s; a warm-up call on a few images precedes each timed pass. The
agreement column is the share of images whose top class matches the naive
loop's (differences come from draft decoding and resampling, not the runtime).

    .venv/bin/python benchmarks/bench_predict.py                  # 500 images, 224 and 128 px
    .venv/bin/python benchmarks/bench_predict.py -n 200 --size 224
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "pbc"
TARGET_SPEEDUP = 3.0
"""The issue's target: ONNX prediction at least 3x the naive loop."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PBC dataset folder (default: %(default)s)")
    p.add_argument("-n", "--images", type=int, default=500, help="images per pass (default: %(default)s)")
    p.add_argument("--size", type=int, action="append", help="input size; repeat for several (default: 224 and 128)")
    p.add_argument("--batch-size", type=int, default=64, help="leuko's batch size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="leuko's decoding threads (default: available CPUs)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: available CPUs)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the 3x ONNX target is missed")
    return p.parse_args(argv)


def pick_images(data: Path, n: int) -> list[Path]:
    """``n`` JPEGs spread over the class folders (seeded), skipping macOS ``._``/``.DS`` strays."""
    import numpy as np

    from leuko.data.imageio import is_image_name

    files = sorted(p for p in data.rglob("*") if p.is_file() and is_image_name(p) and not p.name.startswith("."))
    if not files:
        raise SystemExit(f"error: no images under {data}")
    order = np.random.default_rng(0).permutation(len(files))[: min(n, len(files))]
    return [files[i] for i in sorted(order)]


def build_run(folder: Path, size: int, n_classes: int) -> tuple[Path, Path, float]:
    """A run folder with EfficientNet-Lite0 (bundled weights, ``n_classes`` head) at ``size`` px, and its ONNX export."""
    import torch

    from leuko.infer.onnx import export_onnx
    from leuko.models import build_model
    from leuko.run.folder import save_model

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", n_classes, pretrained="bundled")
    info = model.leuko_info
    meta = {
        "model": {"name": "efficientnet_lite0", "head": "linear", "dropout": None, "pretrained": "bundled"},
        "classes": [f"class{i}" for i in range(n_classes)],
        "input": {"image_size": size, "resize": "stretch", "preprocess": [], "mean": list(info.mean), "std": list(info.std)},
        "temperature": 1.0,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "model.pt", model, meta)
    result = export_onnx(folder, force=True)
    return folder, result.path, result.max_abs_diff or 0.0


def naive_predict(run: Path) -> Callable[[list[Path]], Any]:
    """The one-image-at-a-time loop: a function ``(paths) -> argmax array``."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms as tvt

    from leuko.run.folder import load_model

    model, meta = load_model(run)
    model.eval()
    size = meta["input"]["image_size"]
    tf = tvt.Compose([tvt.Resize((size, size)), tvt.ToTensor(), tvt.Normalize(meta["input"]["mean"], meta["input"]["std"])])

    @torch.no_grad()
    def predict(ps: list[Path]) -> np.ndarray:
        out = []
        for p in ps:
            x = tf(Image.open(p).convert("RGB"))
            out.append(int(model(x[None]).argmax(1)))
        return np.array(out)

    return predict


def measure(make: Callable[[], Callable[[list[Path]], Any]], paths: list[Path], warmup: int = 8) -> tuple[float, float, Any]:
    """``(load seconds, images/s, predicted classes)``: ``make()`` loads the model, its result predicts."""
    t0 = time.perf_counter()
    predict = make()
    load_s = time.perf_counter() - t0
    predict(paths[:warmup])
    t0 = time.perf_counter()
    pred = predict(paths)
    return load_s, len(paths) / (time.perf_counter() - t0), pred


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(
            f"error: dataset folder {args.data} not found; this benchmark needs the PBC images "
            "(../shared/datasets/pbc next to the repository, or --data PATH)",
            file=sys.stderr,
        )
        return 2
    import numpy as np
    import onnxruntime as ort
    import torch

    from leuko.data.preprocess import available_cpus
    from leuko.infer import OnnxPredictor, Predictor

    sizes = args.size or [224, 128]
    paths = pick_images(args.data, args.images)
    for p in paths:  # warm the OS file cache: every row reads from memory, none pays the first disk read
        p.read_bytes()
    load = os.getloadavg()
    print(
        f"{len(paths)} PBC images from {args.data}; {available_cpus()} CPUs available, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    exit_code = 0
    with tempfile.TemporaryDirectory(prefix="leuko-bench-predict-") as tmp:
        for size in sizes:
            run, onnx_path, diff = build_run(Path(tmp) / f"run{size}", size, 8)
            rows = []
            naive = measure(lambda: naive_predict(run), paths)
            rows.append(("naive PyTorch loop (1 image per call)", *naive))

            def leuko_row(cls: type, src: Path) -> Callable[[], Callable[[list[Path]], Any]]:
                def make() -> Callable[[list[Path]], Any]:
                    kw: dict[str, Any] = {"batch_size": args.batch_size, "num_workers": args.workers}
                    if cls is OnnxPredictor and args.threads:
                        kw["threads"] = args.threads
                    predictor = cls(src, **kw)
                    return lambda ps: predictor.predict_paths(ps).pred

                return make

            rows.append(("leuko Predictor (PyTorch, batched)", *measure(leuko_row(Predictor, run), paths)))
            rows.append(("leuko OnnxPredictor (onnxruntime)", *measure(leuko_row(OnnxPredictor, onnx_path), paths)))

            base = rows[0][2]
            print()
            print(f"size {size}x{size}, batch {args.batch_size}  (export: max |logit difference| ONNX vs PyTorch {diff:.1e})")
            print(f"  {'path':<40} {'load s':>7} {'images/s':>9} {'vs naive':>9} {'agree':>7}")
            print(f"  {'-' * 40} {'-' * 7} {'-' * 9} {'-' * 9} {'-' * 7}")
            for name, load_s, rate, pred in rows:
                agree = float(np.mean(np.asarray(pred) == np.asarray(rows[0][3])))
                print(f"  {name:<40} {load_s:>7.2f} {rate:>9.1f} {rate / base:>8.1f}x {agree:>7.1%}")
            speedup = rows[2][2] / base
            met = speedup >= TARGET_SPEEDUP
            print(f"  ONNX speed-up over the naive loop at {size} px: {speedup:.1f}x (target {TARGET_SPEEDUP:.0f}x: {'met' if met else 'NOT met'})")
            if not met and args.strict:
                exit_code = 1
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
