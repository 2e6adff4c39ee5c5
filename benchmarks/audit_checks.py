"""Checks of ``leuko.data.audit`` on the shared datasets (numbers for the issue and the docs).

Run from the project root::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/audit_checks.py            # all checks
    .venv/bin/python benchmarks/audit_checks.py --checks exact copies       # no model needed
    .venv/bin/python benchmarks/audit_checks.py --checks mooney --mooney-embed

Checks:

1. ``exact``: byte-identical pairs in PBC (expected: 17, one across classes,
   ``eosinophil/EO_225902.jpg`` = ``neutrophil/BNE_191112.jpg``).
2. ``copies``: 300 PBC images copied into a temporary folder with a horizontal
   flip, a 90° rotation, JPEG re-compression (quality 70), +20% brightness, a
   4-8 px shift, or all of flip+shift+darkening+re-compression together; the
   copies are audited against all 5,966 originals (hash stage, and with
   ``--copies-embed`` the embedding stage too). Prints recall of the copies
   per transform and the share of reported pairs that are not true copies.
3. ``mooney``: cross-side near-duplicate pairs of a random 80/20 split of
   Mooney's TRAIN against those between TRAIN and TEST (which come from
   different source cells), in total and per possible pair.

Mooney's copies are rotated by up to ±20° and sheared, which the pixel check
cannot align, so check 3 needs the embedding stage (``make_default_embedder``
below: EfficientNet-Lite0 with the weights bundled in a pip package, offline).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from leuko.data import load_dataset  # noqa: E402
from leuko.data.audit import DuplicatePair, audit, cross_pairs  # noqa: E402
from leuko.data.samples import Sample  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
TRANSFORMS = ("hflip", "rot90", "jpeg70", "bright120", "shift", "combo")


# ----------------------------------------------------------------------------
# The embedder the CLI builds (kept out of leuko.data, which must not import models)
# ----------------------------------------------------------------------------


def make_default_embedder(
    name: str = "efficientnet_lite0", *, threads: int | None = None
) -> Callable[[list[np.ndarray]], np.ndarray]:
    """``embed(images) -> (n, d)`` pooled features of a bundled-weight backbone.

    Images arrive as ``H x W x 3`` uint8 arrays at ``audit(embed_size=...)``
    (224 px by default); they are normalised with the model's own mean/std.
    """
    import torch

    from leuko.models import build_model

    if threads:
        torch.set_num_threads(threads)
    model = build_model(name, num_classes=0, pretrained="bundled").eval()
    model = model.to(memory_format=torch.channels_last)
    info = model.leuko_info
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def embed(images: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return model(x).float().numpy()

    return embed


# ----------------------------------------------------------------------------
# Check 1: exact pairs in PBC
# ----------------------------------------------------------------------------


def check_exact(pbc: Path) -> dict[str, object]:
    index = load_dataset(pbc, "pbc")
    t = time.perf_counter()
    report = audit([index], hash_threshold=None, progress=False)
    secs = time.perf_counter() - t
    exact = report.by_kind("exact")
    rel = {(Path(p.a).relative_to(index.root).as_posix(), Path(p.b).relative_to(index.root).as_posix()) for p in exact}
    cross = [p for p in exact if p.cross_class]
    want = {"eosinophil/EO_225902.jpg", "neutrophil/BNE_191112.jpg"}
    found_cross = any({a, b} == want for a, b in rel)
    return {
        "images": len(index),
        "exact pairs": len(exact),
        "across classes": len(cross),
        "EO_225902 = BNE_191112": found_cross,
        "seconds": round(secs, 1),
    }


# ----------------------------------------------------------------------------
# Check 2: transformed copies of PBC images
# ----------------------------------------------------------------------------


def _shift(im: Image.Image, rng: random.Random) -> Image.Image:
    dx = rng.randint(4, 8) * rng.choice((-1, 1))
    dy = rng.randint(4, 8) * rng.choice((-1, 1))
    a = np.asarray(im)
    h, w = a.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return Image.fromarray(a[ys][:, xs])  # translate, repeating the edge


def make_copy(src: Path, dst: Path, transform: str, rng: random.Random) -> None:
    im = Image.open(src).convert("RGB")
    quality = 95
    if transform == "hflip":
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif transform == "rot90":
        im = im.transpose(Image.Transpose.ROTATE_90)
    elif transform == "jpeg70":
        quality = 70
    elif transform == "bright120":
        im = ImageEnhance.Brightness(im).enhance(1.2)
    elif transform == "shift":
        im = _shift(im, rng)
    elif transform == "combo":
        im = _shift(im.transpose(Image.Transpose.FLIP_TOP_BOTTOM), rng)
        im = ImageEnhance.Brightness(im).enhance(0.9)
        quality = 75
    else:
        raise ValueError(transform)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())


def check_copies(
    pbc: Path,
    n: int = 300,
    seed: int = 0,
    embed: Callable[[list[np.ndarray]], np.ndarray] | None = None,
    hash_threshold: float | None = None,
    embed_threshold: float | None = None,
) -> dict[str, object]:
    index = load_dataset(pbc, "pbc")
    rng = random.Random(seed)
    picked = rng.sample(range(len(index.samples)), n)
    kwargs: dict[str, object] = {}
    if hash_threshold is not None:
        kwargs["hash_threshold"] = hash_threshold
    if embed_threshold is not None:
        kwargs["embed_threshold"] = embed_threshold
    with tempfile.TemporaryDirectory(prefix="leuko-audit-copies-") as tmp:
        copies: list[Sample] = []
        origin: dict[str, str] = {}
        tkind: dict[str, str] = {}
        for k, i in enumerate(picked):
            s = index.samples[i]
            t = TRANSFORMS[k % len(TRANSFORMS)]
            dst = Path(tmp) / s.label / f"{s.path.stem}_{t}.jpg"
            make_copy(s.path, dst, t, rng)
            c = Sample(path=dst, label=s.label)
            copies.append(c)
            origin[c.key] = s.key
            tkind[c.key] = t
        t0 = time.perf_counter()
        report = audit([index, copies], names=["pbc", "copies"], embed=embed, progress=False, **kwargs)
        secs = time.perf_counter() - t0
    # ground truth: a copy matches its original and the original's byte-identical twins
    twins: dict[str, set[str]] = {}
    for p in report.by_kind("exact"):
        twins.setdefault(p.a, {p.a}).add(p.b)
        twins.setdefault(p.b, {p.b}).add(p.a)

    def is_true(p: DuplicatePair) -> bool:
        if p.kind == "exact" and not p.cross_set:
            return True  # PBC's own byte-identical pairs
        ka, kb = p.a, p.b
        oa, ob = origin.get(ka, ka), origin.get(kb, kb)
        return oa == ob or ob in twins.get(oa, set())

    near = [p for p in report.pairs if p.kind != "exact" or p.cross_set]
    with_copy = [p for p in near if p.a in origin or p.b in origin]
    false = [p for p in with_copy if not is_true(p)]
    # pairs of two originals: outside what the copy test knows (PBC has overlapping
    # fields: two adjacent cells photographed once each, sharing most pixels)
    originals_only = [p for p in near if p.a not in origin and p.b not in origin]
    found: set[str] = set()
    found_by: dict[str, set[str]] = {}
    for p in with_copy:
        if is_true(p):
            for k in (p.a, p.b):
                if k in origin:
                    found.add(k)
                    found_by.setdefault(k, set()).add(p.kind)
    per_t = {}
    for t in TRANSFORMS:
        keys = [k for k, v in tkind.items() if v == t]
        per_t[t] = f"{sum(k in found for k in keys)}/{len(keys)}"
    dist_true = [p.distance for p in with_copy if is_true(p) and p.kind == "hash"]
    kinds_orig: dict[str, int] = {}
    for p in originals_only:
        kinds_orig[p.kind] = kinds_orig.get(p.kind, 0) + 1
    return {
        "copies": n,
        "recall": round(len(found) / n, 4),
        "per transform": per_t,
        "found only by embedding": sum(1 for k in found if found_by[k] == {"embedding"}),
        "pairs with a copy": len(with_copy),
        "  not a true copy": len(false),
        "  false-pair rate": round(len(false) / max(1, len(with_copy)), 4),
        "worst true hash distance": round(max(dist_true), 4) if dist_true else None,
        "false examples": [
            (Path(p.a).name, Path(p.b).name, p.kind, round(p.distance, 4)) for p in false[:5]
        ],
        "near pairs between two originals": f"{len(originals_only)} {kinds_orig or ''}",
        "  examples": [
            (Path(p.a).name, Path(p.b).name, p.kind, round(p.distance, 4), p.inliers) for p in originals_only[:9]
        ],
        "  rate if those count as false": round(
            (len(false) + len(originals_only)) / max(1, len(with_copy) + len(originals_only)), 4
        ),
        "seconds": round(secs, 1),
    }


# ----------------------------------------------------------------------------
# Check 3: Mooney, random split of TRAIN vs TRAIN x TEST
# ----------------------------------------------------------------------------


def check_mooney(
    mooney: Path,
    embed: Callable[[list[np.ndarray]], np.ndarray] | None,
    seed: int = 0,
    embed_threshold: float | None = None,
) -> dict[str, object]:
    index = load_dataset(mooney, "mooney")
    train = [s for s in index.samples if s.source_split == "TRAIN"]
    test = [s for s in index.samples if s.source_split == "TEST"]
    kwargs: dict[str, object] = {}
    if embed_threshold is not None:
        kwargs["embed_threshold"] = embed_threshold
    t0 = time.perf_counter()
    report = audit([train, test], names=["TRAIN", "TEST"], embed=embed, progress=True, **kwargs)
    secs = time.perf_counter() - t0
    rng = random.Random(seed)
    order = list(train)
    rng.shuffle(order)
    cut = int(round(0.8 * len(order)))
    side_a, side_b = order[:cut], order[cut:]
    split_pairs = cross_pairs(report, side_a, side_b)
    tt_pairs = cross_pairs(report, train, test)
    n_split = len(side_a) * len(side_b)
    n_tt = len(train) * len(test)

    def kinds(ps: list[DuplicatePair]) -> str:
        c: dict[str, int] = {}
        for p in ps:
            c[p.kind] = c.get(p.kind, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"

    per_split = len(split_pairs) / n_split
    per_tt = len(tt_pairs) / n_tt
    return {
        "TRAIN / TEST images": f"{len(train)} / {len(test)}",
        "random 80/20 split of TRAIN: cross pairs": f"{len(split_pairs)} ({kinds(split_pairs)})",
        "  per possible pair (split)": f"{per_split:.2e} of {n_split}",
        "  images with a copy on the other side": len({p.a for p in split_pairs} | {p.b for p in split_pairs}),
        "TRAIN x TEST: cross pairs": f"{len(tt_pairs)} ({kinds(tt_pairs)})",
        "  per possible pair (TRAIN x TEST)": f"{per_tt:.2e} of {n_tt}",
        "ratio per possible pair": round(per_split / per_tt, 1) if per_tt else "inf",
        "pairs within TRAIN (all)": sum(1 for p in report.pairs if p.set_a == p.set_b == 0),
        "pairs within TEST (all)": sum(1 for p in report.pairs if p.set_a == p.set_b == 1),
        "seconds": round(secs, 1),
    }


def _table(title: str, rows: dict[str, object]) -> str:
    width = max(len(k) for k in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=DATASETS)
    ap.add_argument("--checks", nargs="+", default=["exact", "copies", "mooney"], choices=["exact", "copies", "mooney"])
    ap.add_argument("--copies", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies-embed", action="store_true", help="also run the embedding stage in the copy test")
    ap.add_argument("--no-mooney-embed", action="store_true", help="Mooney with the hash stage only")
    ap.add_argument("--hash-threshold", type=float, default=None)
    ap.add_argument("--embed-threshold", type=float, default=None)
    args = ap.parse_args(argv)
    pbc, mooney = args.datasets / "pbc", args.datasets / "mooney"
    embedder = None

    def get_embedder() -> Callable[[list[np.ndarray]], np.ndarray]:
        nonlocal embedder
        if embedder is None:
            embedder = make_default_embedder()
        return embedder

    if "exact" in args.checks:
        print(_table("1. PBC byte-identical pairs", check_exact(pbc)), "\n", flush=True)
    if "copies" in args.checks:
        res = check_copies(
            pbc, args.copies, args.seed, get_embedder() if args.copies_embed else None,
            args.hash_threshold, args.embed_threshold,
        )
        print(_table("2. PBC copies (flip, rot90, JPEG q70, +20% brightness, 4-8 px shift, combo)", res), "\n", flush=True)
    if "mooney" in args.checks:
        res = check_mooney(mooney, None if args.no_mooney_embed else get_embedder(), args.seed, args.embed_threshold)
        print(_table("3. Mooney: random split of TRAIN vs TRAIN x TEST", res), "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
