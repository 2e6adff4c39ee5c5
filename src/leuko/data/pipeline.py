"""The input pipeline: samples -> decoded, preprocessed, cached -> tensors in batches.

On a CPU, decoding JPEGs costs more than a small network's forward pass, so
three things keep it off the critical path:

1. **Draft decoding** (:func:`leuko.data.imageio.load_rgb`): libjpeg decodes
   at 1/2, 1/4 or 1/8 scale when the target is that much smaller.
2. **A decoded-image cache** (:class:`DecodedCache`): every sample, decoded and
   deterministically preprocessed (resize, centre crop, CLAHE), stored once as
   one ``uint8`` ``.npy`` file and memory-mapped afterwards. From the second
   epoch (and the second run, and by every DataLoader worker) reading an image
   is a memory copy. Random augmentation runs after the cache, per epoch.
3. **Worker processes** (:func:`make_loader`), sized for the machine.

Typical use::

    t = build_transforms(128, train=True, augment="cells", mean=m, std=s)
    ds = SampleDataset(train_samples, index.class_to_index, 128, transform=t, cache=True)
    loader = make_loader(ds, batch_size=64, shuffle=True, seed=0)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from leuko.data.imageio import ResizeMode, load_rgb
from leuko.data.preprocess import Preprocess, available_cpus
from leuko.data.preprocess import decode_sample as _decode_sample
from leuko.data.samples import Sample
from leuko.data.transforms import Transform
from leuko.errors import LeukoError
from leuko.paths import cache_dir

CACHE_FORMAT_VERSION = 1
"""Bumped when the cache layout or decoding changes, so old files are not reused."""

_PARALLEL_MIN = 64
"""Below this many images a process pool costs more than it saves."""

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``, called while a cache is being built."""


def decode_sample(sample: Sample, preprocess: Preprocess, *, draft: bool = True) -> np.ndarray:
    """Decode one sample and run the deterministic steps (:func:`leuko.data.preprocess.decode_sample`).

    Kept here, passing this module's ``load_rgb``, so the cache and the
    dataset decode through one seam that tests can count.
    """
    return _decode_sample(sample, preprocess, draft=draft, load=load_rgb)


# --------------------------------------------------------------------------- #
# Decoded-image cache
# --------------------------------------------------------------------------- #


def _file_signatures(samples: Iterable[Sample]) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` for each distinct file: what invalidates a cache."""
    out: dict[str, tuple[int, int]] = {}
    for s in samples:
        p = str(s.path)
        if p in out:
            continue
        try:
            st = os.stat(p)
        except OSError as exc:
            raise LeukoError(f"cannot read image {p}: {exc.strerror or exc}") from None
        out[p] = (st.st_size, st.st_mtime_ns)
    return out


class DecodedCache:
    """All samples of a set, decoded and preprocessed, in one memory-mapped ``uint8`` file.

    The file is ``cache_dir()/decoded/<hash>.npy`` with shape
    ``(n, image_size, image_size, 3)``; rows follow the sorted sample keys, so
    the order (or shuffling) of ``samples`` does not matter and any subset can
    be served by a cache built on the whole dataset. The hash covers each
    sample's key, its file's size and mtime, and the :class:`Preprocess`
    (size, resize mode, steps): change a file or a setting and a new file is
    built; the stale one is left for :func:`clear_decoded_cache`.

    It is safe to share between processes: the file is written to a temporary
    name and renamed into place (readers never see half a file, concurrent
    builders just race to an identical result), and each process opens its own
    read-only memory map lazily (the map is not pickled into DataLoader
    workers).

    Args:
        samples: the samples to hold (duplicates by key are stored once).
        preprocess: the deterministic steps (size, resize mode, CLAHE, crop).
        root: folder for cache files (default ``cache_dir()/decoded``).
    """

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess, *, root: Path | None = None) -> None:
        if not isinstance(preprocess, Preprocess):
            raise TypeError(f"preprocess must be a Preprocess, not {type(preprocess).__name__}")
        self.preprocess = preprocess
        by_key: dict[str, Sample] = {}
        for s in samples:
            by_key.setdefault(s.key, s)
        self.keys: list[str] = sorted(by_key)
        self._samples = [by_key[k] for k in self.keys]
        self._row = {k: i for i, k in enumerate(self.keys)}
        self.root = Path(root) if root is not None else cache_dir() / "decoded"
        self.key = self._compute_key()
        self.path = self.root / f"{self.key}.npy"
        self._array: np.ndarray | None = None

    # -- identity ---------------------------------------------------------- #

    def _compute_key(self) -> str:
        sigs = _file_signatures(self._samples)
        h = hashlib.sha256()
        h.update(f"leuko-decoded-v{CACHE_FORMAT_VERSION}|{self.preprocess.fingerprint}\n".encode())
        for k, s in zip(self.keys, self._samples):
            size, mtime = sigs[str(s.path)]
            h.update(f"{k}\t{size}\t{mtime}\n".encode())
        return h.hexdigest()[:32]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        s = self.preprocess.image_size
        return (len(self.keys), s, s, 3)

    @property
    def nbytes(self) -> int:
        n, h, w, c = self.shape
        return n * h * w * c

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def row(self, sample: Sample | str) -> int:
        """Row of ``sample`` (or of its key) in the cache file."""
        key = sample if isinstance(sample, str) else sample.key
        try:
            return self._row[key]
        except KeyError:
            raise LeukoError(f"sample {key} is not in this decoded-image cache") from None

    # -- building ---------------------------------------------------------- #

    def is_built(self) -> bool:
        """True when a complete cache file for exactly these inputs exists."""
        return self._open() is not None

    def build(
        self,
        *,
        num_workers: int | None = None,
        progress: ProgressFn | None = None,
    ) -> "DecodedCache":
        """Decode everything into the cache file unless it already exists; return ``self``.

        Args:
            num_workers: decoding processes (default: all available CPUs; 0 or 1
                decodes in this process). Decoding holds the GIL, so threads would
                not help.
            progress: called with ``(done, total)`` as chunks finish.

        Raises:
            LeukoError: an image cannot be decoded, or the disk is too full.
        """
        if self.is_built():
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < self.nbytes + (64 << 20):
            raise LeukoError(
                f"not enough disk space for the decoded-image cache in {self.root}: needs "
                f"{self.nbytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free "
                "(set LEUKO_CACHE_DIR elsewhere, or run without the cache)"
            )
        fd, tmp_name = tempfile.mkstemp(prefix=f"{self.key}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=self.shape)
            del mm  # header written; workers (or the loop below) fill the rows
            workers = available_cpus() if num_workers is None else int(num_workers)
            jobs = list(enumerate(self._samples))
            if workers <= 1 or len(jobs) < _PARALLEL_MIN:
                _fill_rows(tmp, self.preprocess, jobs, progress=progress, total=len(jobs))
            else:
                self._fill_parallel(tmp, jobs, workers, progress)
            os.replace(tmp, self.path)  # atomic: readers see the old state or the whole file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._array = None
        return self

    def _fill_parallel(
        self, tmp: Path, jobs: list[tuple[int, Sample]], workers: int, progress: ProgressFn | None
    ) -> None:
        # ~8 chunks per worker: even load across workers, and progress ticks.
        n_chunks = min(len(jobs), workers * 8)
        bounds = np.linspace(0, len(jobs), n_chunks + 1).astype(int)
        chunks = [jobs[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        done = 0
        with ProcessPoolExecutor(max_workers=workers) as ex:
            futures = [ex.submit(_fill_rows, tmp, self.preprocess, c) for c in chunks]
            try:
                for fut in futures:
                    done += fut.result()
                    if progress is not None:
                        progress(done, len(jobs))
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise

    # -- reading ----------------------------------------------------------- #

    def _open(self) -> np.ndarray | None:
        if self._array is not None:
            return self._array
        try:
            arr = np.load(self.path, mmap_mode="r")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # truncated or not an .npy: rebuild it
            return None
        if arr.dtype != np.uint8 or tuple(arr.shape) != self.shape:
            return None
        self._array = arr
        return arr

    def array(self) -> np.ndarray:
        """The read-only ``(n, S, S, 3)`` memory map (building it first if needed)."""
        arr = self._open()
        if arr is None:
            self.build()
            arr = self._open()
            if arr is None:  # pragma: no cover - only if the file vanished right after building
                raise LeukoError(f"decoded-image cache {self.path} disappeared after building")
        return arr

    def get(self, sample: Sample | str) -> np.ndarray:
        """The cached ``S x S x 3`` image of ``sample`` (a writable copy)."""
        return np.array(self.array()[self.row(sample)])

    def __getitem__(self, row: int) -> np.ndarray:
        return np.array(self.array()[row])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None  # each process maps the file itself
        return state

    def __repr__(self) -> str:
        p = self.preprocess
        return (
            f"DecodedCache(n={len(self)}, size={p.image_size}, resize={p.resize!r}, "
            f"steps={list(p.steps)}, path={str(self.path)!r}, built={self.is_built()})"
        )


def _fill_rows(
    tmp: Path,
    preprocess: Preprocess,
    jobs: Sequence[tuple[int, Sample]],
    *,
    progress: ProgressFn | None = None,
    total: int = 0,
) -> int:
    """Decode ``jobs`` into their rows of the ``.npy`` at ``tmp``; return how many.

    Runs in a pool worker: it opens the file itself, so only sample records
    travel between processes, never pixels.
    """
    mm = np.load(tmp, mmap_mode="r+")
    try:
        for n, (row, sample) in enumerate(jobs, 1):
            mm[row] = decode_sample(sample, preprocess)
            if progress is not None and (n % 256 == 0 or n == len(jobs)):
                progress(n, total)
        mm.flush()
    finally:
        del mm
    return len(jobs)


def clear_decoded_cache(root: Path | None = None) -> int:
    """Delete every decoded-image cache file (and leftover temporaries); return bytes freed."""
    folder = Path(root) if root is not None else cache_dir() / "decoded"
    freed = 0
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        if p.is_file() and (p.suffix in {".npy", ".tmp"}):
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
    return freed


# --------------------------------------------------------------------------- #
# Dataset and loader
# --------------------------------------------------------------------------- #


class SampleDataset(Dataset):
    """A torch ``Dataset`` of ``(image, target)`` pairs over :class:`Sample` records.

    Deterministic preprocessing runs before the (optional) cache; ``transform``'s
    random part runs after it, every time an item is read.

    Args:
        samples: the records to serve, in order.
        class_to_index: label -> integer target (e.g. ``DatasetIndex.class_to_index``).
        image_size: side of the decoded square image; must match ``transform``'s.
        resize: ``stretch``/``pad``/``crop`` for non-square sources; ``None``
            takes it from a :class:`Transform`, else ``stretch``.
        transform: a :class:`Transform` (its ``preprocess`` is cached, only its
            per-epoch half runs per item), any other callable on the
            ``S x S x 3`` uint8 image, or ``None`` to return that array.
        cache: ``True`` builds (or reuses) a :class:`DecodedCache` for these
            samples now; a :class:`DecodedCache` (e.g. one built on the whole
            dataset) is used as given; ``False`` decodes on every read.
        cache_workers: processes used to build the cache (default: all CPUs).
        soft_targets: optional ``N x C`` per-sample target distributions (a
            teacher's answers, :mod:`leuko.train.distill`); items are then
            ``(image, target, soft_target)``.

    Raises:
        LeukoError: a label missing from ``class_to_index``, a size mismatch, or
            a cache that lacks some samples or used other preprocessing.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_to_index: Mapping[str, int],
        image_size: int,
        resize: ResizeMode | None = None,
        transform: Transform | Callable[[np.ndarray], Any] | None = None,
        cache: bool | DecodedCache = False,
        *,
        cache_workers: int | None = None,
        progress: ProgressFn | None = None,
        soft_targets: np.ndarray | None = None,
    ) -> None:
        self.samples = list(samples)
        if soft_targets is not None:
            soft_targets = np.asarray(soft_targets, dtype=np.float32)
            if soft_targets.ndim != 2 or len(soft_targets) != len(self.samples):
                raise LeukoError(f"soft_targets must have one row per sample ({len(self.samples)}); got shape {soft_targets.shape}")
        self.soft_targets = soft_targets
        missing = sorted({s.label for s in self.samples} - set(class_to_index))
        if missing:
            raise LeukoError(
                f"labels not in class_to_index: {', '.join(missing)} "
                f"(known: {', '.join(sorted(class_to_index))})"
            )
        self.class_to_index = dict(class_to_index)
        self.targets: list[int] = [self.class_to_index[s.label] for s in self.samples]
        self.transform = transform

        if isinstance(transform, Transform):
            pre = transform.preprocess
            if pre.image_size != image_size:
                raise LeukoError(
                    f"image_size {image_size} does not match the transform's {pre.image_size}"
                )
            if resize is not None and resize != pre.resize:
                pre = Preprocess(pre.image_size, pre.steps, resize)
        else:
            pre = Preprocess(image_size, (), resize or "stretch")
        self.preprocess = pre

        self.cache: DecodedCache | None
        if isinstance(cache, DecodedCache):
            if cache.preprocess.fingerprint != pre.fingerprint:
                raise LeukoError(
                    "the decoded-image cache was built with other preprocessing "
                    f"({cache.preprocess}) than this dataset needs ({pre})"
                )
            absent = [s.key for s in self.samples if s.key not in cache]
            if absent:
                raise LeukoError(
                    f"{len(absent)} samples are not in the decoded-image cache, e.g. {absent[0]}"
                )
            self.cache = cache.build(num_workers=cache_workers, progress=progress)
        elif cache:
            self.cache = DecodedCache(self.samples, pre).build(num_workers=cache_workers, progress=progress)
        else:
            self.cache = None
        self._rows = [self.cache.row(s) for s in self.samples] if self.cache is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> np.ndarray:
        """The preprocessed ``S x S x 3`` uint8 image of item ``i`` (before augmentation)."""
        if self.cache is not None and self._rows is not None:
            return self.cache[self._rows[i]]
        return decode_sample(self.samples[i], self.preprocess)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image = self.load(i)
        t = self.transform
        if isinstance(t, Transform):
            image = t.from_preprocessed(image)
        elif t is not None:
            image = t(image)
        if self.soft_targets is not None:
            return image, self.targets[i], self.soft_targets[i]
        return image, self.targets[i]

    def reseed(self, seed: int | None) -> None:
        """Restart the augmentation stream (called in each DataLoader worker)."""
        reseed = getattr(self.transform, "reseed", None)
        if callable(reseed):
            reseed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a distinct augmentation stream per worker and epoch.

    Forked workers inherit identical albumentations generators, so without this
    every worker would produce the same "random" augmentations (and, without
    persistent workers, the same ones every epoch). torch gives each worker a
    seed derived from the loader's generator; pass it on.

    It deliberately does not call ``cv2.setNumThreads``: in a forked child whose
    parent has used OpenCV's thread pool that call deadlocks (torch already
    limits its own threads to one per worker).
    """
    info = get_worker_info()
    if info is None:  # pragma: no cover - only called inside workers
        return
    reseed = getattr(info.dataset, "reseed", None)
    if callable(reseed):
        reseed(info.seed % 2**32)


def default_num_workers(dataset: Dataset | None = None) -> int:
    """Loader processes that keep a small CPU busy without starving the model.

    * One CPU: 0 (a worker would only add copying and context switches).
    * Uncached decoding is the slow part and scales with processes: every CPU,
      at most 8.
    * Cached images cost a memory copy plus augmentation, so a worker mostly
      buys overlap with the model's step. Each worker also ships float batches
      through shared memory, which on a busy 2-CPU machine costs about as much
      as it saves (see ``benchmarks/bench_pipeline.py``): use one worker there,
      and half the CPUs (at most 4) on bigger machines.
    """
    cpus = available_cpus()
    if cpus <= 1:
        return 0
    cached = isinstance(dataset, SampleDataset) and dataset.cache is not None
    if cached:
        return 1 if cpus <= 2 else min(4, cpus // 2)
    return min(8, cpus)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int | None = None,
    seed: int | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int | None = None,
    sampler: Any | None = None,
) -> DataLoader:
    """A ``DataLoader`` with sensible settings for leuko datasets.

    Args:
        num_workers: default :func:`default_num_workers`.
        seed: makes shuffling and augmentation reproducible (given the same
            ``num_workers``).
        sampler: a custom sampler (e.g. class-balanced); needs ``shuffle=False``.
        pin_memory: default on only when CUDA is available (it is pure cost on CPU).
        persistent_workers: keep workers across epochs (saves the start-up cost
            each epoch); ignored with ``num_workers=0``.

    Raises:
        LeukoError: ``batch_size`` or ``num_workers`` out of range.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LeukoError(f"batch_size must be a positive integer; got {batch_size!r}")
    workers = default_num_workers(dataset) if num_workers is None else num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise LeukoError(f"num_workers must be an integer >= 0; got {num_workers!r}")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
        if workers == 0 and isinstance(dataset, SampleDataset):
            dataset.reseed(int(seed))
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        kwargs["worker_init_fn"] = seed_worker
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **kwargs,
    )


__all__ = [
    "CACHE_FORMAT_VERSION",
    "DecodedCache",
    "SampleDataset",
    "available_cpus",
    "clear_decoded_cache",
    "decode_sample",
    "default_num_workers",
    "make_loader",
    "seed_worker",
]
