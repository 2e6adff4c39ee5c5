"""Find exact and near-duplicate images within and across datasets.

Duplicates are the quiet way a test set leaks into training: PBC holds 17
byte-identical pairs (one of them filed under two classes), and Mooney's
images are augmented copies of a few hundred source cells, so any random split
of them puts copies of one cell on both sides. :func:`audit` finds three kinds
of pairs:

``exact``
    The same bytes (BLAKE2b of the file, plus the crop box for crops).
``hash``
    The same picture after a flip or 90° rotation, a small shift, JPEG
    re-compression, resizing or a brightness/contrast change. Every image gets a
    perceptual hash signature, the 63 lowest non-DC DCT coefficients of a 32×32
    grey thumbnail (the numbers pHash thresholds into bits), computed for all 8
    flips/rotations at once by sign changes and transposition of the DCT block.
    Cosine similarity of signatures proposes a few candidates per image
    (blocked all-pairs matrix products, so 6,000 images take seconds); each
    candidate is then checked on 64×64 grey pixels: the normalised correlation,
    maximised over shifts of up to ±``max_shift`` of the image side, must be at
    least ``1 - hash_threshold``. Cells that merely look alike (PBC cells are all
    a dark blob on a pale field) fail that check because their red cells and
    nuclei do not line up. ``distance`` is ``1 - correlation``.
``embedding``
    Copies the pixel check cannot align (rotations by ±20° and shear: Mooney's
    augmentation), when an ``embed`` function is given. The data layer does not
    know about models; the caller passes ``embed(list of HxWx3 uint8 arrays) ->
    (n, d) array`` (e.g. pooled CNN features). Each image's ``embed_candidates``
    nearest neighbours by cosine are candidates; each candidate is then checked
    with SIFT keypoints (rotation invariant; mirrored descriptors are a fixed
    permutation, so flips cost nothing): one plausible affine map (rotation,
    shift, scale 0.7-1.4, mild shear, optionally mirrored) must explain at least
    ``min_inliers`` matches. Cosine distance alone cannot tell copies from
    distinct cells: on Mooney, distinct cells of one class are as close as
    rotated copies. ``distance`` is ``1 - cosine``; ``verify=False`` reports
    every pair within ``embed_threshold`` unchecked.

Thresholds were chosen by measurement (``benchmarks/audit_checks.py``): on
PBC, flipped/rotated/re-compressed/brightened/shifted copies of 300 cells
against all 5,966 originals; on Mooney, inlier counts of embedding candidates,
with pairs above the threshold checked by warping one image onto the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from leuko.data.imageio import load_rgb
from leuko.data.samples import DatasetIndex, Sample
from leuko.errors import LeukoError

EmbedFn = Callable[[list[np.ndarray]], np.ndarray]
ProgressFn = Callable[[str, int, int], None]

KINDS = ("exact", "hash", "embedding")

DEFAULT_HASH_THRESHOLD = 0.06
"""Largest ``1 - aligned correlation`` of a ``hash`` pair (see module docs)."""
DEFAULT_EMBED_THRESHOLD = 0.30
"""Largest cosine distance of an ``embedding`` candidate. Candidates are then
checked with keypoints (``verify=True``); without that check use a strict
value (about 0.03-0.05), since distinct cells of one class have close embeddings."""
DEFAULT_EMBED_CANDIDATES = 10
"""Nearest embedding neighbours per image that get the keypoint check."""
DEFAULT_MAX_SHIFT = 0.0625
"""Largest shift searched by the pixel check, as a fraction of the image side
(4 px of a 64 px thumbnail: about 22 px of a 360 px PBC image)."""
DEFAULT_CANDIDATES = 8
"""Candidates per image that the signature stage hands to the pixel check."""
DEFAULT_CANDIDATE_DISTANCE = 0.35
"""Centred-signature cosine distance above which a pair is never checked."""
KEYPOINT_SIDE = 256
"""Long side of the grey image SIFT runs on."""
KEYPOINT_FEATURES = 160
"""SIFT keypoints kept per image (strongest first)."""
DEFAULT_MIN_INLIERS = 15
"""Keypoint matches that one plausible affine map must explain for a verified
pair. Measured on Mooney's embedding candidates: distinct cells stay at 3-11;
copies mostly reach 20-60. Every inspected pair at 15 or more overlaid exactly
after warping, including Mooney TRAIN x TEST pairs and lymphocyte/monocyte
pairs (one source cell filed under both classes)."""
CENTRE_PRIOR = 100.0
"""Images' worth of prior weight pulling the mean signature to zero (small sets)."""

THUMB = 64  # side of the grey thumbnail used for the pixel check
SIG = 32  # side of the thumbnail the DCT signature is computed from
SIG_K = 8  # low-frequency block kept (8x8 minus DC = 63 coefficients, as pHash)

# The 8 flips/rotations (dihedral group of the square) as (transpose, hflip, vflip),
# applied in that order; names say what was done to the first image of a pair.
DIHEDRAL: tuple[tuple[str, bool, bool, bool], ...] = (
    ("identity", False, False, False),
    ("hflip", False, True, False),
    ("vflip", False, False, True),
    ("rot180", False, True, True),
    ("transpose", True, False, False),
    ("rot90cw", True, True, False),
    ("rot90ccw", True, False, True),
    ("antitranspose", True, True, True),
)
INVERSE: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 5, 7)
"""``INVERSE[v]`` undoes ``DIHEDRAL[v]`` (only the two quarter turns are not their own inverse)."""

# ----------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DuplicatePair:
    """Two images that show the same picture.

    Attributes:
        a, b: sample keys (:attr:`Sample.key`); ``a`` comes first in the
            audited order (lower set, then earlier sample).
        distance: 0 for ``exact``; ``1 - correlation`` for ``hash``;
            ``1 - cosine`` for ``embedding``.
        kind: ``"exact"``, ``"hash"`` or ``"embedding"``.
        set_a, set_b: index of the set each image came from.
        label_a, label_b: the samples' labels.
        transform: for ``hash`` pairs, the flip/rotation that maps ``a`` onto ``b``.
        hamming: for ``hash`` pairs, the 64-bit pHash distance of that transform.
        inliers: for verified ``embedding`` pairs, the keypoint matches one
            affine map explains.
    """

    a: str
    b: str
    distance: float
    kind: str
    set_a: int = 0
    set_b: int = 0
    label_a: str | None = None
    label_b: str | None = None
    transform: str | None = None
    hamming: int | None = None
    inliers: int | None = None

    @property
    def cross_set(self) -> bool:
        return self.set_a != self.set_b

    @property
    def cross_class(self) -> bool:
        return self.label_a != self.label_b

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "a": self.a,
            "b": self.b,
            "distance": round(float(self.distance), 6),
            "kind": self.kind,
            "set_a": self.set_a,
            "set_b": self.set_b,
            "label_a": self.label_a,
            "label_b": self.label_b,
        }
        if self.transform is not None:
            out["transform"] = self.transform
        if self.hamming is not None:
            out["hamming"] = self.hamming
        if self.inliers is not None:
            out["inliers"] = self.inliers
        return out


@dataclass
class AuditReport:
    """What :func:`audit` found.

    ``pairs`` are sorted by kind (exact, hash, embedding), then distance.
    ``unreadable`` lists ``(key, reason)`` for images that could not be
    decoded (they still take part in the exact check).
    """

    pairs: list[DuplicatePair]
    set_names: list[str]
    set_sizes: list[int]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.pairs)

    def by_kind(self, kind: str) -> list[DuplicatePair]:
        return [p for p in self.pairs if p.kind == kind]

    def groups(self) -> list[list[str]]:
        """Connected groups of keys (each image with all its copies), largest first."""
        return _components((p.a, p.b) for p in self.pairs)

    def summary(self) -> dict[str, Any]:
        """Counts for people: per set, per kind, within/across sets, across classes."""
        kinds = Counter(p.kind for p in self.pairs)
        within: dict[str, dict[str, int]] = {}
        across: dict[str, dict[str, int]] = {}
        for p in self.pairs:
            if p.cross_set:
                name = f"{self.set_names[p.set_a]} x {self.set_names[p.set_b]}"
                bucket = across.setdefault(name, {k: 0 for k in KINDS})
            else:
                bucket = within.setdefault(self.set_names[p.set_a], {k: 0 for k in KINDS})
            bucket[p.kind] += 1
        involved = {k for p in self.pairs for k in (p.a, p.b)}
        return {
            "sets": [
                {"name": n, "images": s} for n, s in zip(self.set_names, self.set_sizes)
            ],
            "images": int(sum(self.set_sizes)),
            "unreadable": len(self.unreadable),
            "pairs": len(self.pairs),
            "exact_pairs": kinds.get("exact", 0),
            "near_pairs": kinds.get("hash", 0) + kinds.get("embedding", 0),
            "by_kind": {k: kinds.get(k, 0) for k in KINDS},
            "within_sets": within,
            "across_sets": across,
            "across_classes": sum(1 for p in self.pairs if p.cross_class),
            "images_with_duplicates": len(involved),
            "duplicate_groups": len(self.groups()),
            "settings": dict(self.settings),
            "seconds": round(self.seconds, 2),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": [[p.a, p.b, round(float(p.distance), 6)] for p in self.pairs],
            "details": [p.to_dict() for p in self.pairs],
            "summary": self.summary(),
            "unreadable": [{"key": k, "reason": r} for k, r in self.unreadable],
        }

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``{"pairs": [[a, b, distance], ...], "details": [...], "summary": {...}}``."""
        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            raise LeukoError(f"cannot write audit report {out}: {exc.strerror or exc}") from None
        return out

    def format_summary(self) -> str:
        """A few plain lines for a terminal (the CLI may render it its own way)."""
        s = self.summary()
        lines = [
            "audited " + ", ".join(f"{d['name']} ({d['images']} images)" for d in s["sets"])
            + f" in {s['seconds']:.1f} s",
            f"exact duplicate pairs: {s['exact_pairs']}; near-duplicate pairs: {s['near_pairs']}"
            f" (hash {s['by_kind']['hash']}, embedding {s['by_kind']['embedding']})",
        ]
        for name, c in s["within_sets"].items():
            lines.append(f"  within {name}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
        for name, c in s["across_sets"].items():
            lines.append(f"  across {name}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
        lines.append(f"pairs whose labels differ: {s['across_classes']}")
        lines.append(
            f"images with a duplicate: {s['images_with_duplicates']} in {s['duplicate_groups']} groups"
        )
        if self.unreadable:
            lines.append(f"unreadable images (hash/embedding skipped): {len(self.unreadable)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------


def audit(
    sets: Sequence[DatasetIndex | Sequence[Sample]],
    *,
    names: Sequence[str] | None = None,
    hash_threshold: float | None = DEFAULT_HASH_THRESHOLD,
    embed: EmbedFn | None = None,
    embed_threshold: float = DEFAULT_EMBED_THRESHOLD,
    embed_size: int = 224,
    embed_batch: int = 32,
    embed_candidates: int = DEFAULT_EMBED_CANDIDATES,
    verify: bool = True,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    exact: bool = True,
    within: bool = True,
    max_shift: float = DEFAULT_MAX_SHIFT,
    candidates: int = DEFAULT_CANDIDATES,
    workers: int | None = None,
    progress: bool | ProgressFn = True,
) -> AuditReport:
    """Find exact and near-duplicate pairs within and across ``sets``.

    Args:
        sets: one or more datasets (a :class:`DatasetIndex` or a list of samples).
        names: a name per set for the summary (default: the dataset folder, or ``set<i>``).
        hash_threshold: largest ``1 - correlation`` of a ``hash`` pair, in
            ``[0, 1)``; ``None`` turns the perceptual-hash stage off.
        embed: ``embed(images) -> features`` for the embedding stage (``None``: off).
            ``images`` is a list of ``embed_size`` × ``embed_size`` × 3 uint8 arrays.
        embed_threshold: largest cosine distance of an embedding candidate, in ``[0, 2]``.
        embed_size: side of the images handed to ``embed``.
        embed_batch: images per ``embed`` call.
        embed_candidates: nearest embedding neighbours per image that get the keypoint check.
        verify: check embedding candidates with keypoints (``False``: report every
            pair within ``embed_threshold``; then use a strict threshold).
        min_inliers: keypoint matches a verified embedding pair needs.
        exact: look for byte-identical files.
        within: also pair images of the same set (``False``: only across sets,
            which is what a train/test leakage check needs).
        max_shift: largest shift searched by the pixel check, as a fraction of the side.
        candidates: signature neighbours per image that get the pixel check.
        workers: decoding threads (default: up to 4, one per CPU).
        progress: ``True`` prints stage lines to stderr, ``False`` is silent,
            or a function ``progress(stage, done, total)``.

    Raises:
        LeukoError: no sets, an empty set, or an argument out of range.
    """
    t0 = time.perf_counter()
    items, set_names = _flatten(sets, names)
    _check_args(
        hash_threshold, embed, embed_threshold, embed_size, embed_batch, embed_candidates, min_inliers,
        max_shift, candidates,
    )
    report_progress = _progress_fn(progress)
    n_sets = len(set_names)
    if n_sets < 2 and not within:
        raise LeukoError("within=False needs at least two sets to compare")
    nworkers = workers or max(1, min(4, os.cpu_count() or 1))

    found: dict[tuple[int, int], DuplicatePair] = {}
    set_of = np.array([s for s, _ in items], dtype=np.int64)

    def allowed(i: int, j: int) -> bool:
        return within or set_of[i] != set_of[j]

    def add(i: int, j: int, distance: float, kind: str, **extra: Any) -> None:
        if i == j:
            return
        if j < i:
            i, j = j, i
        if (i, j) in found or not allowed(i, j):
            return
        (si, a), (sj, b) = items[i], items[j]
        found[(i, j)] = DuplicatePair(
            a=a.key, b=b.key, distance=float(distance), kind=kind, set_a=si, set_b=sj,
            label_a=a.label, label_b=b.label, **extra,
        )

    if exact:
        report_progress("exact: reading files", 0, len(items))
        digests = _digests([s for _, s in items], nworkers, report_progress)
        by_digest: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(digests):
            if d is not None:
                by_digest[d].append(i)
        for members in by_digest.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    add(members[x], members[y], 0.0, "exact")

    unreadable: list[tuple[str, str]] = []
    if hash_threshold is not None:
        report_progress("hash: decoding thumbnails", 0, len(items))
        thumbs, ok, unreadable = _thumbnails([s for _, s in items], nworkers, report_progress)
        idx = np.flatnonzero(ok)
        if len(idx) > 1:
            report_progress("hash: comparing", 0, len(idx))
            for i, j, dist, variant, ham in _hash_pairs(
                thumbs[idx], set_of[idx], within, 1.0 - hash_threshold, max_shift, candidates
            ):
                if j < i:  # the pair is stored a-first: name the transform from a to b
                    i, j, variant = j, i, INVERSE[variant]
                add(int(idx[i]), int(idx[j]), dist, "hash", transform=DIHEDRAL[variant][0], hamming=ham)
        del thumbs

    if embed is not None:
        report_progress("embedding", 0, len(items))
        samples = [s for _, s in items]
        feats, ok_e, bad = _embed_all(samples, embed, embed_size, embed_batch, nworkers, report_progress)
        known = {k for k, _ in unreadable}
        unreadable.extend((k, r) for k, r in bad if k not in known)
        idx = np.flatnonzero(ok_e)
        ci, cj, cd = _embedding_candidates(
            feats[idx], set_of[idx], within, embed_threshold, embed_candidates if verify else None
        )
        ci, cj = idx[ci], idx[cj]
        # pairs the exact/hash stages already found need no second look
        fresh = np.array([(int(i), int(j)) not in found for i, j in zip(ci, cj)], dtype=bool)
        ci, cj, cd = ci[fresh], cj[fresh], cd[fresh]
        if verify:
            inliers = _verify_keypoints(samples, ci, cj, nworkers, report_progress)
            for i, j, d, n_in in zip(ci, cj, cd, inliers):
                if n_in >= min_inliers:
                    add(int(i), int(j), float(d), "embedding", inliers=int(n_in))
        else:
            for i, j, d in zip(ci, cj, cd):
                add(int(i), int(j), float(d), "embedding")

    order = {k: n for n, k in enumerate(KINDS)}
    pairs = sorted(found.values(), key=lambda p: (order[p.kind], p.distance, p.a, p.b))
    settings = {
        "exact": exact,
        "hash_threshold": hash_threshold,
        "embed": embed is not None,
        "embed_threshold": embed_threshold if embed is not None else None,
        "embed_size": embed_size if embed is not None else None,
        "embed_candidates": embed_candidates if embed is not None and verify else None,
        "verify": ("keypoints" if verify else None) if embed is not None else None,
        "min_inliers": min_inliers if embed is not None and verify else None,
        "within": within,
        "max_shift": max_shift,
        "candidates": candidates,
    }
    report = AuditReport(
        pairs=pairs,
        set_names=set_names,
        set_sizes=[sum(1 for s, _ in items if s == k) for k in range(n_sets)],
        unreadable=unreadable,
        settings=settings,
        seconds=time.perf_counter() - t0,
    )
    return report


def cross_pairs(
    report: AuditReport | Iterable[DuplicatePair],
    side_a: Iterable[str | Sample],
    side_b: Iterable[str | Sample],
) -> list[DuplicatePair]:
    """Pairs with one image in ``side_a`` and the other in ``side_b`` (keys or samples).

    E.g. audit a whole dataset once, then ask how many pairs each candidate
    split would put across train and test.
    """
    a_keys = {x.key if isinstance(x, Sample) else str(x) for x in side_a}
    b_keys = {x.key if isinstance(x, Sample) else str(x) for x in side_b}
    pairs = report.pairs if isinstance(report, AuditReport) else list(report)
    return [
        p for p in pairs
        if (p.a in a_keys and p.b in b_keys) or (p.a in b_keys and p.b in a_keys)
    ]


def split_leakage(
    train: DatasetIndex | Sequence[Sample],
    test: DatasetIndex | Sequence[Sample],
    *,
    embed: EmbedFn | None = None,
    hash_threshold: float | None = DEFAULT_HASH_THRESHOLD,
    embed_threshold: float = DEFAULT_EMBED_THRESHOLD,
    exact: bool = True,
    progress: bool | ProgressFn = False,
    **kwargs: Any,
) -> list[DuplicatePair]:
    """Duplicate pairs that a split puts on both sides (``a`` in ``train``, ``b`` in ``test``).

    Only pairs across the two sides are searched, so this costs one pass over
    both. An empty result means no leak this audit can see. Use
    :func:`leakage_warning` for the message to show.
    """
    report = audit(
        [train, test], names=["train", "test"], embed=embed, hash_threshold=hash_threshold,
        embed_threshold=embed_threshold, exact=exact, within=False, progress=progress, **kwargs,
    )
    return report.pairs


def leakage_warning(
    pairs: Sequence[DuplicatePair],
    *,
    sides: tuple[str, str] = ("train", "test"),
    n_b: int | None = None,
    examples: int = 3,
) -> str | None:
    """A loud one-paragraph warning about ``pairs`` across a split, or ``None`` when there are none."""
    if not pairs:
        return None
    kinds = Counter(p.kind for p in pairs)
    leaked = len({p.b for p in pairs})
    share = f" ({leaked / n_b:.1%} of {sides[1]})" if n_b else ""
    parts = ", ".join(f"{v} {k}" for k, v in kinds.items())
    ex = "; ".join(f"{Path(p.a).name} ~ {Path(p.b).name}" for p in list(pairs)[:examples])
    return (
        f"DATA LEAK: {len(pairs)} duplicate pair(s) ({parts}) cross the {sides[0]}/{sides[1]} split: "
        f"{leaked} {sides[1]} image(s){share} have a copy in {sides[0]}, so {sides[1]} scores will be "
        f"optimistic. Examples: {ex}. Run `leuko data audit` for the full list and use a group-aware split."
    )


# ----------------------------------------------------------------------------
# Inputs and progress
# ----------------------------------------------------------------------------


def _flatten(
    sets: Sequence[DatasetIndex | Sequence[Sample]], names: Sequence[str] | None
) -> tuple[list[tuple[int, Sample]], list[str]]:
    if isinstance(sets, DatasetIndex):
        sets = [sets]
    if not sets:
        raise LeukoError("audit needs at least one set of images")
    if names is not None and len(names) != len(sets):
        raise LeukoError(f"names has {len(names)} entries for {len(sets)} sets")
    items: list[tuple[int, Sample]] = []
    out_names: list[str] = []
    for k, s in enumerate(sets):
        samples = list(s.samples if isinstance(s, DatasetIndex) else s)
        if not samples:
            raise LeukoError(f"set {k} has no images to audit")
        if not all(isinstance(x, Sample) for x in samples):
            raise LeukoError(f"set {k} must be a DatasetIndex or a list of Sample records")
        if names is not None:
            out_names.append(str(names[k]))
        elif isinstance(s, DatasetIndex):
            out_names.append(s.root.name or str(s.root))
        else:
            out_names.append(f"set{k}")
        seen: set[str] = set()
        for x in samples:  # a sample listed twice in one set is one image
            if x.key not in seen:
                seen.add(x.key)
                items.append((k, x))
    # disambiguate equal names ("pbc", "pbc" -> "pbc[0]", "pbc[1]")
    dup = {n for n, c in Counter(out_names).items() if c > 1}
    out_names = [f"{n}[{k}]" if n in dup else n for k, n in enumerate(out_names)]
    return items, out_names


def _check_args(
    hash_threshold: float | None,
    embed: EmbedFn | None,
    embed_threshold: float,
    embed_size: int,
    embed_batch: int,
    embed_candidates: int,
    min_inliers: int,
    max_shift: float,
    candidates: int,
) -> None:
    if hash_threshold is not None and not 0.0 <= float(hash_threshold) < 1.0:
        raise LeukoError(f"hash_threshold must be in [0, 1) (1 - correlation) or None; got {hash_threshold}")
    if embed is not None and not callable(embed):
        raise LeukoError("embed must be a function images -> features, or None")
    if not 0.0 <= float(embed_threshold) <= 2.0:
        raise LeukoError(f"embed_threshold must be a cosine distance in [0, 2]; got {embed_threshold}")
    if int(embed_size) < 16:
        raise LeukoError(f"embed_size must be at least 16 pixels; got {embed_size}")
    if int(embed_batch) < 1:
        raise LeukoError(f"embed_batch must be at least 1; got {embed_batch}")
    if int(embed_candidates) < 1:
        raise LeukoError(f"embed_candidates must be at least 1; got {embed_candidates}")
    if int(min_inliers) < 4:
        raise LeukoError(f"min_inliers must be at least 4 (an affine map needs 3 points); got {min_inliers}")
    if not 0.0 <= float(max_shift) <= 0.25:
        raise LeukoError(f"max_shift must be a fraction of the image side in [0, 0.25]; got {max_shift}")
    if int(candidates) < 1:
        raise LeukoError(f"candidates must be at least 1; got {candidates}")


def _progress_fn(progress: bool | ProgressFn) -> ProgressFn:
    if callable(progress):
        return progress
    if not progress:
        return lambda stage, done, total: None
    last = {"stage": "", "t": 0.0}

    def show(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage != last["stage"] or done >= total or now - last["t"] > 2.0:
            print(f"audit: {stage} {done}/{total}", file=sys.stderr, flush=True)
            last["stage"], last["t"] = stage, now

    return show


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)


# ----------------------------------------------------------------------------
# Exact duplicates
# ----------------------------------------------------------------------------


def _digest(sample: Sample) -> str | None:
    h = hashlib.blake2b(digest_size=20)
    try:
        with open(sample.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    if sample.crop is not None:
        h.update(("#" + ",".join(str(v) for v in sample.crop)).encode())
    return h.hexdigest()


def _digests(samples: list[Sample], workers: int, progress: ProgressFn) -> list[str | None]:
    out: list[str | None] = []
    with ThreadPoolExecutor(workers) as ex:
        for s, e in _chunks(len(samples), 512):
            out.extend(ex.map(_digest, samples[s:e]))
            progress("exact: reading files", e, len(samples))
    return out


# ----------------------------------------------------------------------------
# Perceptual hash stage
# ----------------------------------------------------------------------------

_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _grey_thumb(sample: Sample) -> tuple[np.ndarray | None, str | None]:
    try:
        rgb = load_rgb(sample.path, THUMB, crop=sample.crop)
    except LeukoError as exc:
        return None, str(exc)
    return rgb.astype(np.float32) @ _GREY, None


def _thumbnails(
    samples: list[Sample], workers: int, progress: ProgressFn
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    thumbs = np.zeros((len(samples), THUMB, THUMB), dtype=np.float32)
    ok = np.zeros(len(samples), dtype=bool)
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(workers) as ex:
        for s, e in _chunks(len(samples), 256):
            for k, (g, err) in enumerate(ex.map(_grey_thumb, samples[s:e]), start=s):
                if g is None:
                    bad.append((samples[k].key, err or "cannot decode"))
                else:
                    thumbs[k] = g
                    ok[k] = True
            progress("hash: decoding thumbnails", e, len(samples))
    return thumbs, ok, bad


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


def dihedral(img: np.ndarray, variant: int) -> np.ndarray:
    """Apply flip/rotation ``variant`` (index into :data:`DIHEDRAL`) to the last two axes."""
    _, transpose, hflip, vflip = DIHEDRAL[variant]
    out = np.swapaxes(img, -1, -2) if transpose else img
    if hflip:
        out = out[..., :, ::-1]
    if vflip:
        out = out[..., ::-1, :]
    return out


def signatures(thumbs: np.ndarray) -> np.ndarray:
    """DCT signatures ``(8, n, 63)`` of grey thumbnails ``(n, H, W)``, one per flip/rotation.

    Row ``v`` is the signature of ``dihedral(thumb, v)``, obtained from one DCT
    by transposing the coefficient block and flipping the signs of odd
    frequencies (a flip mirrors every cosine of odd order), so it costs one DCT.
    """
    n = thumbs.shape[0]
    f = thumbs.shape[-1] // SIG
    small = thumbs.reshape(n, SIG, f, SIG, f).mean(axis=(2, 4)) if f > 1 else thumbs
    d = _dct_matrix(SIG)
    coef = (d @ small @ d.T)[:, :SIG_K, :SIG_K]
    odd = (np.arange(SIG_K) % 2 == 1)
    out = np.empty((len(DIHEDRAL), n, SIG_K * SIG_K - 1), dtype=np.float32)
    for v, (_, transpose, hflip, vflip) in enumerate(DIHEDRAL):
        c = np.swapaxes(coef, 1, 2) if transpose else coef
        sign = np.ones((SIG_K, SIG_K), dtype=np.float32)
        if hflip:
            sign[:, odd] *= -1
        if vflip:
            sign[odd, :] *= -1
        out[v] = (c * sign).reshape(n, -1)[:, 1:]
    return out


def phash_bits(sig: np.ndarray) -> np.ndarray:
    """64-bit pHash (coefficient above the median, plus a zero bit) of signatures ``(..., 63)``."""
    bits = sig > np.median(sig, axis=-1, keepdims=True)
    bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (1,), dtype=bool)], axis=-1)
    return np.packbits(bits, axis=-1).view(">u8")[..., 0].astype(np.uint64)


def _centred(sig: np.ndarray, prior: float = CENTRE_PRIOR) -> np.ndarray:
    """Unit signatures minus what all audited images share, renormalised.

    Cell images all look alike at this scale (a dark blob on a pale field), so
    raw signatures of distinct cells are close; removing the mean signature
    (averaged over images *and* flips/rotations, so that the comparison stays
    symmetric) leaves what tells cells apart. The mean is shrunk towards zero
    for small sets (weight ``n / (n + prior)``), where it would be the images
    themselves.
    """
    sig = sig / (np.linalg.norm(sig, axis=-1, keepdims=True) + 1e-8)
    n = sig.shape[1]
    mu = sig.mean(axis=(0, 1)) * (n / (n + prior))
    out = sig - mu
    out /= np.linalg.norm(out, axis=-1, keepdims=True) + 1e-8
    return out.astype(np.float32)


def _candidates(
    sig: np.ndarray, set_of: np.ndarray, within: bool, k: int, max_distance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``k`` nearest images per image by signature (any flip/rotation), unordered pairs once.

    Returns ``(i, j, variant)`` with ``variant`` mapping image ``i`` onto image ``j``.
    """
    nv, n, d = sig.shape
    ref = np.ascontiguousarray(sig[0].T)  # (d, n) identity signatures
    kk = min(k, n - 1)
    if kk < 1:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    min_sim = 1.0 - max_distance
    cols = np.arange(n)
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    block = max(16, 16_000_000 // max(1, n * nv))
    for s, e in _chunks(n, block):
        q = np.ascontiguousarray(sig[:, s:e]).reshape(nv * (e - s), d)
        best = (q @ ref).reshape(nv, e - s, n).max(axis=0)  # (b, n), best over flips/rotations
        rows = np.arange(s, e)
        mask = cols[None, :] == rows[:, None]
        if not within:
            mask |= set_of[None, :] == set_of[rows][:, None]
        best[mask] = -np.inf
        top = np.argpartition(-best, kk - 1, axis=1)[:, :kk]
        top_sim = np.take_along_axis(best, top, axis=1)
        r, c = np.nonzero(top_sim >= min_sim)
        out_i.append(rows[r])
        out_j.append(top[r, c])
    ci = np.concatenate(out_i) if out_i else np.zeros(0, dtype=np.int64)
    cj = np.concatenate(out_j) if out_j else np.zeros(0, dtype=np.int64)
    if ci.size == 0:
        return ci, cj, ci.copy()
    key = np.minimum(ci, cj).astype(np.int64) * n + np.maximum(ci, cj)
    _, first = np.unique(key, return_index=True)
    ci, cj = ci[first], cj[first]
    # the flip/rotation that maps i onto j, for the selected pairs only
    cv = np.einsum("vpd,pd->vp", sig[:, ci], sig[0, cj]).argmax(axis=0)
    return ci, cj, cv


def _hash_pairs(
    thumbs: np.ndarray,
    set_of: np.ndarray,
    within: bool,
    min_corr: float,
    max_shift: float,
    k: int,
) -> Iterator[tuple[int, int, float, int, int]]:
    """Yield ``(i, j, 1 - corr, variant, hamming)`` for verified pairs.

    ``variant`` maps image ``i`` onto image ``j``; ``i`` may be larger than ``j``.
    """
    raw = signatures(thumbs)
    bits = phash_bits(raw)  # (8, n)
    ci, cj, cv = _candidates(_centred(raw), set_of, within, k, DEFAULT_CANDIDATE_DISTANCE)
    del raw
    if ci.size == 0:
        return
    shift = int(round(max_shift * thumbs.shape[-1]))
    corr = np.empty(len(ci), dtype=np.float32)
    for s, e in _chunks(len(ci), 1024):
        corr[s:e] = _aligned_correlation(thumbs, ci[s:e], cj[s:e], cv[s:e], shift)
    for p in np.flatnonzero(corr >= min_corr):
        i, j, v = int(ci[p]), int(cj[p]), int(cv[p])
        ham = int(np.bitwise_count(bits[v, i] ^ bits[0, j]))
        yield i, j, float(max(0.0, 1.0 - corr[p])), v, ham


def _aligned_correlation(
    thumbs: np.ndarray, ci: np.ndarray, cj: np.ndarray, cv: np.ndarray, shift: int
) -> np.ndarray:
    """Normalised correlation of ``dihedral(thumbs[i], v)`` with ``thumbs[j]``, maximised over shifts.

    The central ``(S - 2 shift)`` square of the transformed ``i`` slides over
    ``j``; each window of ``j`` is standardised on its own, so brightness and
    contrast changes do not matter. Computed with FFTs for a batch of pairs.
    """
    side = thumbs.shape[-1]
    h = side - 2 * shift
    a = np.empty((len(ci), side, side), dtype=np.float32)
    for v in np.unique(cv):
        sel = cv == v
        a[sel] = dihedral(thumbs[ci[sel]], int(v))
    tmpl = a[:, shift : shift + h, shift : shift + h]
    tmpl = tmpl - tmpl.mean(axis=(1, 2), keepdims=True)
    tnorm = np.sqrt((tmpl**2).sum(axis=(1, 2))) + 1e-6
    b = thumbs[cj]
    if shift == 0:
        bb = b - b.mean(axis=(1, 2), keepdims=True)
        num = (tmpl * bb).sum(axis=(1, 2))
        return num / (tnorm * (np.sqrt((bb**2).sum(axis=(1, 2))) + 1e-6))
    pad = np.zeros_like(b)
    pad[:, :h, :h] = tmpl
    num = np.fft.irfft2(np.fft.rfft2(b) * np.conj(np.fft.rfft2(pad)), s=(side, side))
    w = 2 * shift + 1
    num = num[:, :w, :w]
    # window sums of b and b^2 over h x h windows at each shift (integral images)
    csum = _window_sums(b, h, w)
    csq = _window_sums(b.astype(np.float64) ** 2, h, w)
    var = np.maximum(csq - csum.astype(np.float64) ** 2 / (h * h), 1e-6)
    ncc = num / (np.sqrt(var) * tnorm[:, None, None])
    return ncc.reshape(len(ci), -1).max(axis=1).astype(np.float32)


def _window_sums(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums of ``h x h`` windows of ``x`` (batch, S, S) at offsets ``[0, w) x [0, w)``."""
    ii = np.zeros((x.shape[0], x.shape[1] + 1, x.shape[2] + 1), dtype=np.float64)
    ii[:, 1:, 1:] = x.cumsum(axis=1).cumsum(axis=2)
    return ii[:, h : h + w, h : h + w] - ii[:, 0:w, h : h + w] - ii[:, h : h + w, 0:w] + ii[:, 0:w, 0:w]


# ----------------------------------------------------------------------------
# Embedding stage
# ----------------------------------------------------------------------------


def _embed_all(
    samples: list[Sample],
    embed: EmbedFn,
    size: int,
    batch: int,
    workers: int,
    progress: ProgressFn,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    feats: np.ndarray | None = None
    ok = np.zeros(len(samples), dtype=bool)
    bad: list[tuple[str, str]] = []

    def load(s: Sample) -> np.ndarray | str:
        try:
            return load_rgb(s.path, size, crop=s.crop)
        except LeukoError as exc:
            return str(exc)

    with ThreadPoolExecutor(workers) as ex:
        for s, e in _chunks(len(samples), batch):
            imgs, rows = [], []
            for k, r in enumerate(ex.map(load, samples[s:e]), start=s):
                if isinstance(r, str):
                    bad.append((samples[k].key, r))
                else:
                    imgs.append(r)
                    rows.append(k)
            if imgs:
                out = np.asarray(embed(imgs), dtype=np.float32)
                if out.ndim != 2 or out.shape[0] != len(imgs):
                    raise LeukoError(
                        f"embed returned shape {out.shape} for {len(imgs)} images; expected (n, features)"
                    )
                if feats is None:
                    feats = np.zeros((len(samples), out.shape[1]), dtype=np.float32)
                feats[rows] = out
                ok[rows] = True
            progress("embedding", e, len(samples))
    if feats is None:
        feats = np.zeros((len(samples), 1), dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    ok &= norms[:, 0] > 0
    feats = feats / np.maximum(norms, 1e-12)
    return feats, ok, bad


def _embedding_candidates(
    feats: np.ndarray, set_of: np.ndarray, within: bool, max_distance: float, k: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, 1 - cos)`` with cosine distance at most ``max_distance``.

    With ``k``, only each image's ``k`` nearest such neighbours (the union over
    both images of a pair), which bounds the keypoint checks to ``k`` per image.
    """
    n = feats.shape[0]
    min_sim = 1.0 - max_distance
    cols = np.arange(n)
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    out_d: list[np.ndarray] = []
    block = max(16, 8_000_000 // max(1, n))
    kk = n - 1 if k is None else min(int(k), n - 1)
    if kk < 1:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float32)
    for s, e in _chunks(n, block):
        sims = feats[s:e] @ feats.T
        rows = np.arange(s, e)
        mask = cols[None, :] == rows[:, None]
        if not within:
            mask |= set_of[None, :] == set_of[rows][:, None]
        sims[mask] = -np.inf
        if kk < n - 1:
            top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            top_sim = np.take_along_axis(sims, top, axis=1)
            r, c = np.nonzero(top_sim >= min_sim)
            cj = top[r, c]
        else:
            r, cj = np.nonzero(sims >= min_sim)
        out_i.append(rows[r])
        out_j.append(cj)
        out_d.append(1.0 - sims[r, cj])
    ci = np.concatenate(out_i)
    cj = np.concatenate(out_j)
    cd = np.concatenate(out_d).astype(np.float32)
    lo, hi = np.minimum(ci, cj), np.maximum(ci, cj)
    _, first = np.unique(lo.astype(np.int64) * n + hi, return_index=True)
    return lo[first], hi[first], np.maximum(cd[first], 0.0)


# ----------------------------------------------------------------------------
# Keypoint check (for embedding candidates)
# ----------------------------------------------------------------------------



def _mirror_permutation() -> np.ndarray:
    # A SIFT descriptor is 4x4 spatial cells x 8 orientation bins in the keypoint's
    # own frame. Mirroring the image mirrors that frame's rows and negates angles,
    # so a mirrored image's descriptors are a fixed permutation of the originals.
    i = np.arange(4)[:, None, None]
    j = np.arange(4)[None, :, None]
    o = np.arange(8)[None, None, :]
    return (((3 - i) * 4 + j) * 8 + (-o) % 8).reshape(-1)


_MIRROR = _mirror_permutation()


@dataclass
class _Keypoints:
    pts: np.ndarray  # (m, 2) float32, x y
    mirrored: np.ndarray  # points with x mirrored
    desc: np.ndarray  # (m, 128) float32
    desc_m: np.ndarray  # descriptors of the mirrored image


def _keypoints(sample: Sample) -> _Keypoints | None:
    import cv2

    try:
        rgb = load_rgb(sample.path, None, crop=sample.crop)
    except LeukoError:
        return None
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    f = KEYPOINT_SIDE / max(h, w)
    if f < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    # Rotated copies carry black fill wedges whose corners would match between any
    # two images rotated alike; keep keypoints off the fill and its edge.
    fill = (grey <= 8).astype(np.uint8)
    mask = None
    if fill.any():
        mask = np.where(cv2.dilate(fill, np.ones((9, 9), np.uint8)) > 0, 0, 255).astype(np.uint8)
    sift = cv2.SIFT_create(nfeatures=KEYPOINT_FEATURES)
    kps, desc = sift.detectAndCompute(grey, mask)
    if desc is None or len(kps) < 4:
        return None
    pts = np.array([k.pt for k in kps], dtype=np.float32)
    mirrored = pts.copy()
    mirrored[:, 0] = grey.shape[1] - 1 - mirrored[:, 0]
    desc = desc.astype(np.float32)
    return _Keypoints(pts, mirrored, desc, np.ascontiguousarray(desc[:, _MIRROR]))


def _keypoint_inliers(a: _Keypoints, b: _Keypoints, ratio: float = 0.8) -> int:
    """Matches one plausible affine map explains (either way round, and mirrored).

    Plausible: the copies Mooney-style augmentation makes (rotation, small
    shear and zoom, shift): scale within 0.7-1.4 and axes within a factor 1.5.
    """
    import cv2

    best = 0
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    for pa, da in ((a.pts, a.desc), (a.mirrored, a.desc_m)):
        knn = matcher.knnMatch(da, b.desc, k=2)
        good = [m for m, n in (x for x in knn if len(x) == 2) if m.distance < ratio * n.distance]
        if len(good) < max(8, best + 1):
            continue
        src = pa[[m.queryIdx for m in good]]
        dst = b.pts[[m.trainIdx for m in good]]
        model, inl = cv2.estimateAffine2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0, maxIters=1000, confidence=0.995
        )
        if model is None or inl is None:
            continue
        sv = np.linalg.svd(model[:, :2], compute_uv=False)
        if np.linalg.det(model[:, :2]) <= 0 or not (0.7 <= np.sqrt(sv[0] * sv[1]) <= 1.4) or sv[0] > 1.5 * sv[1]:
            continue
        best = max(best, int(inl.sum()))
    return best


def _verify_keypoints(
    samples: list[Sample],
    ci: np.ndarray,
    cj: np.ndarray,
    workers: int,
    progress: ProgressFn,
) -> np.ndarray:
    """Inlier counts of candidate pairs (indices into ``samples``)."""
    need = sorted(set(ci.tolist()) | set(cj.tolist()))
    kp: dict[int, _Keypoints | None] = {}
    with ThreadPoolExecutor(workers) as ex:
        for s, e in _chunks(len(need), 256):
            for i, k in zip(need[s:e], ex.map(lambda i: _keypoints(samples[i]), need[s:e])):
                kp[i] = k
            progress("keypoints: extracting", e, len(need))

    def check(p: int) -> int:
        a, b = kp[int(ci[p])], kp[int(cj[p])]
        return 0 if a is None or b is None else _keypoint_inliers(a, b)

    out = np.zeros(len(ci), dtype=np.int32)
    with ThreadPoolExecutor(workers) as ex:
        for s, e in _chunks(len(ci), 512):
            out[s:e] = list(ex.map(check, range(s, e)))
            progress("keypoints: matching", e, len(ci))
    return out


def _components(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[str, list[str]] = defaultdict(list)
    for x in parent:
        groups[find(x)].append(x)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


__all__ = [
    "DEFAULT_EMBED_THRESHOLD",
    "DEFAULT_HASH_THRESHOLD",
    "DIHEDRAL",
    "AuditReport",
    "DuplicatePair",
    "EmbedFn",
    "audit",
    "cross_pairs",
    "dihedral",
    "leakage_warning",
    "phash_bits",
    "signatures",
    "split_leakage",
]
