"""Input-pipeline throughput: leuko's fast paths against a naive PIL loop, same run, same images.

Rows (images/s, higher is better):

* ``naive``: ``PIL.Image.open -> convert("RGB") -> resize -> ToTensor -> Normalize``,
  one image at a time in this process (what a first training script does).
* ``leuko draft decode``: :class:`leuko.data.pipeline.SampleDataset` without a
  cache (JPEG draft-mode decoding, then normalisation), through a DataLoader,
  with 0 workers and with :func:`make_loader`'s default number of workers.
* ``leuko cache build``: the one-off first epoch that fills the decoded cache.
* ``leuko cached``: a later epoch served from the memory-mapped cache.

Loader rows with workers time the *second* epoch (workers already started);
all rows see warm OS file caches (every file is read once before timing), and
torch uses ``--threads`` intra-op threads everywhere, so no row wins by
contention. Usage::

    .venv/bin/python benchmarks/bench_pipeline.py                 # 1000 images, 128 and 224 px
    .venv/bin/python benchmarks/bench_pipeline.py --size 128 -n 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "pbc"
TARGET_SPEEDUP = 3.0
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as most backbones use
STD = (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PBC dataset folder (default: %(default)s)")
    p.add_argument("-n", "--images", type=int, default=1000, help="images per pass (default: %(default)s)")
    p.add_argument(
        "--size", type=int, action="append", help="input size; repeat for several (default: 128 and 224)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: make_loader's choice)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every row (default: 1)")
    p.add_argument("--keep-cache", action="store_true", help="use the real cache_dir() instead of a temp folder")
    p.add_argument("--strict", action="store_true", help="exit 1 when the 3x target is missed")
    return p.parse_args(argv)


def timed(fn: Callable[[], int]) -> float:
    """Run ``fn`` (which returns how many images it produced); return images/s."""
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def drain(batches: Iterable) -> int:
    return sum(len(y) for _, y in batches)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data: Path = args.data
    if not data.is_dir():
        print(
            f"error: dataset folder {data} not found; this benchmark needs the PBC images "
            "(../shared/datasets/pbc next to the repository, or --data PATH)",
            file=sys.stderr,
        )
        return 2
    sizes = args.size or [128, 224]
    if args.keep_cache:
        return run(args, sizes)
    tmp = tempfile.mkdtemp(prefix="leuko-bench-")
    os.environ["LEUKO_CACHE_DIR"] = tmp  # a fresh cache: the build row really builds
    try:
        return run(args, sizes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # up to ~1 GB of decoded images


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def run(args: argparse.Namespace, sizes: list[int]) -> int:
    data: Path = args.data

    import torch
    from PIL import Image
    from torchvision import transforms as tvt

    from leuko.data import load_dataset
    from leuko.data.pipeline import SampleDataset, available_cpus, default_num_workers, make_loader
    from leuko.data.transforms import build_transforms

    torch.set_num_threads(args.threads)
    index = load_dataset(data)
    step = max(1, len(index.samples) // args.images)
    samples = index.samples[::step][: args.images]  # spread over all classes
    for s in samples:  # warm the OS page cache so no row pays for the disk
        s.path.read_bytes()

    print(
        f"leuko input pipeline benchmark: {len(samples)} PBC images "
        f"({len(index.samples)} available), batch {args.batch_size}, {available_cpus()} CPUs, "
        f"torch threads {args.threads}"
    )
    exit_code = 0
    for size in sizes:
        naive_tf = tvt.Compose([tvt.ToTensor(), tvt.Normalize(MEAN, STD)])

        def naive() -> int:
            for s in samples:
                with Image.open(s.path) as im:
                    x = naive_tf(im.convert("RGB").resize((size, size), Image.BILINEAR))
                assert x.shape[-1] == size
            return len(samples)

        t = build_transforms(size, train=False, mean=MEAN, std=STD)
        plain = SampleDataset(samples, index.class_to_index, size, transform=t, cache=False)
        workers = args.workers if args.workers is not None else default_num_workers(plain)

        rows: list[tuple[str, float]] = []
        rows.append(("naive PIL + ToTensor/Normalize (1 process)", timed(naive)))
        rows.append(
            (
                "leuko draft decode, no cache, 0 workers",
                timed(lambda: drain(make_loader(plain, args.batch_size, num_workers=0))),
            )
        )
        if workers > 0:
            loader = make_loader(plain, args.batch_size, num_workers=workers)
            drain(loader)  # epoch 1 starts the persistent workers
            rows.append((f"leuko draft decode, no cache, {plural(workers, 'worker')}", timed(lambda: drain(loader))))
            del loader

        build_t0 = time.perf_counter()
        cached = SampleDataset(samples, index.class_to_index, size, transform=t, cache=True)
        build_rate = len(samples) / (time.perf_counter() - build_t0)
        rows.append((f"leuko cache build, once ({available_cpus()} processes)", build_rate))
        rows.append(
            (
                "leuko cached (later epoch), 0 workers",
                timed(lambda: drain(make_loader(cached, args.batch_size, num_workers=0))),
            )
        )
        cworkers = args.workers if args.workers is not None else default_num_workers(cached)
        if cworkers > 0:
            loader = make_loader(cached, args.batch_size, num_workers=cworkers)
            drain(loader)
            rows.append((f"leuko cached (second epoch), {plural(cworkers, 'worker')}", timed(lambda: drain(loader))))
            del loader

        # the fast path computes the same inputs as the naive one (up to draft-decode rounding)
        x_fast, _ = plain[0]
        with Image.open(samples[0].path) as im:
            x_naive = naive_tf(im.convert("RGB").resize((size, size), Image.BILINEAR))
        diff = float((x_fast - x_naive).abs().mean())

        base = rows[0][1]
        print()
        print(f"size {size}x{size}  (mean |leuko - naive| per input value: {diff:.3f} std units)")
        print(f"  {'path':<50} {'images/s':>10} {'vs naive':>9}")
        print(f"  {'-' * 50} {'-' * 10} {'-' * 9}")
        for name, rate in rows:
            print(f"  {name:<50} {rate:>10.0f} {rate / base:>8.1f}x")
        cached_rates = [r for name, r in rows if name.startswith("leuko cached")]
        best = max(cached_rates)
        if size == sizes[0]:
            met = best / base >= TARGET_SPEEDUP
            print(
                f"  fast path (cached) speedup at {size} px: {best / base:.1f}x "
                f"(target {TARGET_SPEEDUP:.0f}x: {'met' if met else 'NOT met'})"
            )
            if not met and args.strict:
                exit_code = 1
        else:
            print(f"  fast path (cached) speedup at {size} px: {best / base:.1f}x")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
