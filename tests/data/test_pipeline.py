"""Input pipeline: dataset targets, decoded-image cache (reuse, invalidation), crops, loaders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import leuko.data.pipeline as pipeline
from leuko.data.pipeline import (
    DecodedCache,
    SampleDataset,
    clear_decoded_cache,
    default_num_workers,
    make_loader,
)
from leuko.data.samples import Sample
from leuko.data.transforms import Preprocess, build_transforms
from leuko.errors import LeukoError

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
COLOURS = {"basophil": (200, 30, 30), "lymphocyte": (30, 200, 30), "neutrophil": (30, 30, 200)}
CLASS_TO_INDEX = {c: i for i, c in enumerate(sorted(COLOURS))}
SHARED_PBC = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "pbc"


def _write(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 36)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(root))
    return root


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    """Three classes of uniformly coloured JPEGs, one of them a large 800x600 smear-sized file."""
    out = []
    for label, colour in COLOURS.items():
        for i in range(3):
            p = tmp_path / "data" / label / f"{i}.jpg"
            _write(p, colour, (800, 600) if (label, i) == ("neutrophil", 2) else (40, 36))
            out.append(Sample(path=p, label=label))
    return out


class _CountingLoad:
    """Wraps ``load_rgb`` to count decodes (runs in this process only)."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = pipeline.load_rgb

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self._real(*args, **kwargs)


def _colour_of(x: torch.Tensor) -> np.ndarray:
    """Mean RGB (0-255) of a tensor normalised with MEAN/STD."""
    return ((x.mean(dim=(1, 2)).numpy() * 0.25 + 0.5) * 255).round()


@pytest.mark.parametrize("cache", [False, True])
def test_dataset_targets_and_pixels(samples: list[Sample], cache: bool) -> None:
    t = build_transforms(24, train=False, mean=MEAN, std=STD)
    ds = SampleDataset(samples, CLASS_TO_INDEX, 24, transform=t, cache=cache, cache_workers=0)
    assert len(ds) == len(samples)
    for i, s in enumerate(samples):
        x, y = ds[i]
        assert y == CLASS_TO_INDEX[s.label]
        assert tuple(x.shape) == (3, 24, 24) and x.dtype == torch.float32
        assert np.abs(_colour_of(x) - COLOURS[s.label]).max() < 12  # the right picture too
    assert ds.targets == [CLASS_TO_INDEX[s.label] for s in samples]


def test_large_jpeg_uses_draft_and_matches_full_decode(samples: list[Sample]) -> None:
    big = next(s for s in samples if s.path.name == "2.jpg" and s.label == "neutrophil")
    with Image.open(big.path) as im:
        im.draft("RGB", (40, 30))
        assert im.size[0] < 800  # libjpeg can decode this one at reduced scale
    fast = pipeline.decode_sample(big, Preprocess(32))
    slow = pipeline.load_rgb(big.path, 32, draft=False)
    assert fast.shape == (32, 32, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= 3


def test_no_transform_returns_uint8_array(samples: list[Sample]) -> None:
    ds = SampleDataset(samples, CLASS_TO_INDEX, 16)
    img, y = ds[0]
    assert isinstance(img, np.ndarray) and img.shape == (16, 16, 3) and img.dtype == np.uint8


def test_cache_built_once_and_reused(
    samples: list[Sample], monkeypatch: pytest.MonkeyPatch, _cache_in_tmp: Path
) -> None:
    counter = _CountingLoad()
    monkeypatch.setattr(pipeline, "load_rgb", counter)
    t = build_transforms(16, train=True, augment="study", mean=MEAN, std=STD, seed=0)

    ds = SampleDataset(samples, CLASS_TO_INDEX, 16, transform=t, cache=True, cache_workers=0)
    assert counter.calls == len(samples)
    files = list((_cache_in_tmp / "decoded").glob("*.npy"))
    assert files == [ds.cache.path]  # type: ignore[union-attr]
    assert not list((_cache_in_tmp / "decoded").glob("*.tmp"))  # temp file renamed away

    counter.calls = 0
    ds2 = SampleDataset(list(reversed(samples)), CLASS_TO_INDEX, 16, transform=t, cache=True, cache_workers=0)
    _ = [ds2[i] for i in range(len(ds2))]
    assert counter.calls == 0  # neither construction nor reading decoded again
    assert ds2.cache.path == ds.cache.path  # type: ignore[union-attr]
    assert ds2.targets == [CLASS_TO_INDEX[s.label] for s in reversed(samples)]


def test_cache_invalidates_when_a_file_changes(
    samples: list[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = build_transforms(16, train=False, mean=MEAN, std=STD)
    first = SampleDataset(samples, CLASS_TO_INDEX, 16, transform=t, cache=True, cache_workers=0)
    old_path = first.cache.path  # type: ignore[union-attr]

    changed = samples[0]
    _write(changed.path, (250, 250, 250), (44, 44))
    st = changed.path.stat()
    os.utime(changed.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    counter = _CountingLoad()
    monkeypatch.setattr(pipeline, "load_rgb", counter)
    second = SampleDataset(samples, CLASS_TO_INDEX, 16, transform=t, cache=True, cache_workers=0)
    assert second.cache.path != old_path  # type: ignore[union-attr]
    assert counter.calls == len(samples)
    assert _colour_of(second[0][0]).min() > 240  # the new picture, not the stale one


def test_cache_key_depends_on_preprocessing(samples: list[Sample]) -> None:
    a = DecodedCache(samples, Preprocess(16))
    assert a.key == DecodedCache(samples, Preprocess(16)).key
    assert a.key != DecodedCache(samples, Preprocess(16, ("clahe",))).key
    assert a.key != DecodedCache(samples, Preprocess(16, resize="pad")).key
    assert a.key != DecodedCache(samples, Preprocess(20)).key
    assert a.key != DecodedCache(samples[:-1], Preprocess(16)).key


def test_crops_are_honoured(tmp_path: Path) -> None:
    path = tmp_path / "field.jpg"
    img = np.zeros((60, 80, 3), np.uint8)
    img[:, :40] = (220, 20, 20)  # left half red
    img[:, 40:] = (20, 20, 220)  # right half blue
    Image.fromarray(img).save(path, quality=95)
    left = Sample(path=path, label="basophil", group="field", crop=(0, 0, 36, 60))
    right = Sample(path=path, label="neutrophil", group="field", crop=(44, 0, 80, 60))
    t = build_transforms(16, train=False, mean=MEAN, std=STD)
    for cache in (False, True):
        ds = SampleDataset([left, right], CLASS_TO_INDEX, 16, transform=t, cache=cache, cache_workers=0)
        (xl, yl), (xr, yr) = ds[0], ds[1]
        assert np.abs(_colour_of(xl) - (220, 20, 20)).max() < 15
        assert np.abs(_colour_of(xr) - (20, 20, 220)).max() < 15
        assert (yl, yr) == (CLASS_TO_INDEX["basophil"], CLASS_TO_INDEX["neutrophil"])


def test_shared_cache_serves_a_subset(samples: list[Sample]) -> None:
    t = build_transforms(16, train=False, mean=MEAN, std=STD)
    full = DecodedCache(samples, t.preprocess).build(num_workers=0)
    sub = SampleDataset(samples[2:5], CLASS_TO_INDEX, 16, transform=t, cache=full)
    assert sub.cache is full
    assert [sub[i][1] for i in range(3)] == [CLASS_TO_INDEX[s.label] for s in samples[2:5]]

    outsider = Sample(path=samples[0].path, label=samples[0].label, crop=(0, 0, 10, 10))
    with pytest.raises(LeukoError, match="not in the decoded-image cache"):
        SampleDataset([outsider], CLASS_TO_INDEX, 16, transform=t, cache=full)
    clahe_t = build_transforms(16, train=False, preprocess=["clahe"], mean=MEAN, std=STD)
    with pytest.raises(LeukoError, match="other preprocessing"):
        SampleDataset(samples, CLASS_TO_INDEX, 16, transform=clahe_t, cache=full)


def test_parallel_build_matches_serial(samples: list[Sample], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pipeline, "_PARALLEL_MIN", 1)
    pre = Preprocess(16, ("clahe",))
    serial = DecodedCache(samples, pre, root=tmp_path / "serial").build(num_workers=0)
    ticks: list[tuple[int, int]] = []
    parallel = DecodedCache(samples, pre, root=tmp_path / "parallel").build(
        num_workers=2, progress=lambda d, n: ticks.append((d, n))
    )
    assert np.array_equal(serial.array(), parallel.array())
    assert ticks[-1] == (len(samples), len(samples))


def test_truncated_cache_file_is_rebuilt(samples: list[Sample]) -> None:
    cache = DecodedCache(samples, Preprocess(16)).build(num_workers=0)
    good = cache.array().copy()
    cache.path.write_bytes(cache.path.read_bytes()[:200])
    again = DecodedCache(samples, Preprocess(16))
    assert not again.is_built()
    assert np.array_equal(again.build(num_workers=0).array(), good)


def test_bad_image_raises_leuko_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(LeukoError, match="bad.jpg"):
        SampleDataset([Sample(path=bad, label="basophil")], CLASS_TO_INDEX, 16, cache=True, cache_workers=0)
    assert not list((tmp_path / "cache" / "decoded").glob("*"))  # no half-written file left


def test_dataset_argument_errors(samples: list[Sample]) -> None:
    with pytest.raises(LeukoError, match="monocyte"):
        SampleDataset([Sample(path=samples[0].path, label="monocyte")], CLASS_TO_INDEX, 16)
    t = build_transforms(32, train=False, mean=MEAN, std=STD)
    with pytest.raises(LeukoError, match="image_size"):
        SampleDataset(samples, CLASS_TO_INDEX, 16, transform=t)
    with pytest.raises(LeukoError):
        make_loader(SampleDataset(samples, CLASS_TO_INDEX, 16), batch_size=0)


def test_clear_decoded_cache(samples: list[Sample], _cache_in_tmp: Path) -> None:
    cache = DecodedCache(samples, Preprocess(16)).build(num_workers=0)
    size = cache.path.stat().st_size
    assert clear_decoded_cache() == size
    assert not cache.path.exists()


def test_loader_with_two_workers(samples: list[Sample]) -> None:
    t = build_transforms(16, train=True, augment="cells", mean=MEAN, std=STD)
    ds = SampleDataset(samples, CLASS_TO_INDEX, 16, transform=t, cache=True, cache_workers=0)
    loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=0)
    assert loader.num_workers == 2 and loader.persistent_workers and not loader.pin_memory
    for _epoch in range(2):
        ys = []
        for x, y in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
            ys.extend(y.tolist())
        assert sorted(ys) == sorted(ds.targets)


def test_workers_get_distinct_augmentation_streams(tmp_path: Path) -> None:
    """Forked workers inherit identical RNGs; seed_worker must tell them apart."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[4:14, 2:20] = 255
    path = tmp_path / "one.png"
    Image.fromarray(img).save(path)
    same = [Sample(path=path, label="basophil")] * 4
    t = build_transforms(32, train=True, augment="study", mean=MEAN, std=STD)
    ds = SampleDataset(same, CLASS_TO_INDEX, 32, transform=t)
    batches = [x for x, _ in make_loader(ds, batch_size=1, num_workers=2, persistent_workers=False)]
    # batch 0 comes from worker 0 and batch 1 from worker 1, each its first draw
    assert not torch.equal(batches[0], batches[1])


def test_default_num_workers(samples: list[Sample], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "available_cpus", lambda: 1)
    assert default_num_workers() == 0
    monkeypatch.setattr(pipeline, "available_cpus", lambda: 2)
    assert default_num_workers(SampleDataset(samples, CLASS_TO_INDEX, 16)) == 2
    cached = SampleDataset(samples, CLASS_TO_INDEX, 16, cache=True, cache_workers=0)
    assert default_num_workers(cached) == 1
    assert make_loader(cached, batch_size=2).num_workers == 1


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_PBC.is_dir(), reason="../shared/datasets/pbc is not present")
def test_pbc_sample_through_cache() -> None:
    # a few real files per class (no full layout scan: that is test_layouts' job)
    classes = sorted(d.name for d in SHARED_PBC.iterdir() if d.is_dir())
    some = [
        Sample(path=p, label=c)
        for c in classes
        for p in sorted((SHARED_PBC / c).glob("[!.]*.jpg"))[:2]
    ]
    class_to_index = {c: i for i, c in enumerate(classes)}
    t = build_transforms(64, train=True, augment="cells", mean=MEAN, std=STD, seed=0)
    ds = SampleDataset(some, class_to_index, 64, transform=t, cache=True, cache_workers=0)
    for i in (0, len(ds) - 1):
        x, y = ds[i]
        assert tuple(x.shape) == (3, 64, 64) and y == class_to_index[some[i].label]
