"""Tests of leuko.data.audit on generated "cells" (and one on real PBC, marked shared)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from leuko.data.audit import (
    DIHEDRAL,
    AuditReport,
    DuplicatePair,
    audit,
    cross_pairs,
    dihedral,
    leakage_warning,
    signatures,
    split_leakage,
)
from leuko.data.samples import Sample
from leuko.errors import LeukoError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
SIDE = 160


def make_cell(seed: int, side: int = SIDE) -> Image.Image:
    """A pale field of red-cell rings around a textured purple nucleus, all random."""
    rng = np.random.default_rng(seed)
    bg = np.array([235, 215, 205]) + rng.integers(-10, 10, 3)
    im = Image.new("RGB", (side, side), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(7, 12)):
        r = int(rng.integers(side // 12, side // 7))
        x, y = (int(v) for v in rng.integers(0, side, 2))
        c = tuple(int(v) for v in np.array([205, 150, 160]) + rng.integers(-20, 20, 3))
        d.ellipse([x - r, y - r, x + r, y + r], fill=c, outline=(170, 110, 130), width=3)
        d.ellipse([x - r // 3, y - r // 3, x + r // 3, y + r // 3], fill=tuple(min(255, v + 25) for v in c))
    # nucleus: a few overlapping lobes with a speckled texture
    cx, cy = side // 2 + rng.integers(-8, 8), side // 2 + rng.integers(-8, 8)
    for _ in range(rng.integers(2, 5)):
        r = int(rng.integers(side // 10, side // 6))
        ox, oy = (int(v) for v in rng.integers(-side // 8, side // 8, 2))
        d.ellipse([cx + ox - r, cy + oy - r, cx + ox + r, cy + oy + r], fill=(90, 40, 130))
    a = np.asarray(im).astype(np.int16)
    speck = rng.normal(0, 18, (side, side, 1))
    dark = a.sum(axis=2, keepdims=True) < 400
    a = np.where(dark, a + speck, a + rng.normal(0, 3, (side, side, 1)))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


def save(im: Image.Image, path: Path, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=quality)
    return path


def shifted(im: Image.Image, dx: int, dy: int) -> Image.Image:
    a = np.asarray(im)
    h, w = a.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return Image.fromarray(a[ys][:, xs])


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    root = tmp_path_factory.mktemp("orig")
    labels = ("lymphocyte", "neutrophil", "monocyte")
    return [
        Sample(save(make_cell(i), root / labels[i % 3] / f"cell_{i:02d}.jpg"), labels[i % 3])
        for i in range(24)
    ]


COPY_TRANSFORMS = {
    "hflip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "rot90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "jpeg60": lambda im: im,
    "bright": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "shift": lambda im: shifted(im, 5, -4),
    "vflip+dark": lambda im: ImageEnhance.Brightness(im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)).enhance(0.85),
}


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory, originals: list[Sample]) -> dict[str, tuple[Sample, str]]:
    """Transformed copies of the first originals: copy key -> (original, transform)."""
    root = tmp_path_factory.mktemp("copies")
    out = {}
    for k, (name, fn) in enumerate(COPY_TRANSFORMS.items()):
        src = originals[k]
        im = fn(Image.open(src.path).convert("RGB"))
        dst = save(im, root / src.label / f"{src.path.stem}_{name}.jpg", quality=60 if name == "jpeg60" else 92)
        out[str(dst)] = (Sample(dst, src.label), name)
    return out


def test_signatures_of_flips_and_rotations_are_exact() -> None:
    x = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    sig = signatures(x)
    for v in range(len(DIHEDRAL)):
        direct = signatures(np.ascontiguousarray(dihedral(x, v)))[0]
        np.testing.assert_allclose(sig[v], direct, atol=1e-4)


def test_exact_duplicates_found(tmp_path: Path, originals: list[Sample]) -> None:
    twin = tmp_path / "twin.jpg"
    twin.write_bytes(originals[3].path.read_bytes())
    other_label = Sample(twin, "eosinophil")
    report = audit([originals + [other_label]], progress=False)
    exact = report.by_kind("exact")
    assert len(exact) == 1
    p = exact[0]
    assert {p.a, p.b} == {originals[3].key, str(twin)}
    assert p.distance == 0.0 and p.cross_class and not p.cross_set
    assert report.summary()["across_classes"] == 1
    # an exact pair is not reported again by the hash stage
    assert not any({q.a, q.b} == {p.a, p.b} for q in report.by_kind("hash"))


def test_distinct_images_not_paired(originals: list[Sample]) -> None:
    report = audit([originals], progress=False)
    assert report.pairs == []
    s = report.summary()
    assert s["images"] == len(originals) and s["pairs"] == 0 and s["duplicate_groups"] == 0


def test_transformed_copies_found_across_sets(
    originals: list[Sample], copies: dict[str, tuple[Sample, str]]
) -> None:
    copy_samples = [c for c, _ in copies.values()]
    report = audit([originals, copy_samples], names=["orig", "copies"], progress=False)
    found = {p.b: p for p in report.pairs}
    for key, (sample, name) in copies.items():
        assert key in found, f"copy made by {name} not found"
        p = found[key]
        assert p.kind == "hash" and p.cross_set and p.set_a == 0 and p.set_b == 1
        assert not p.cross_class
        assert Path(p.a).stem == sample.path.stem.split("_")[0] + "_" + sample.path.stem.split("_")[1]
    assert len(report.pairs) == len(copies), [(Path(p.a).name, Path(p.b).name) for p in report.pairs]
    transforms = {copies[p.b][1]: p.transform for p in report.pairs}
    assert transforms["hflip"] == "hflip"
    assert transforms["rot90"] == "rot90ccw"  # PIL's ROTATE_90 turns counter-clockwise
    assert transforms["jpeg60"] == "identity"
    s = report.summary()
    assert s["across_sets"] == {"orig x copies": {"exact": 0, "hash": len(copies), "embedding": 0}}
    assert s["within_sets"] == {}


def test_within_false_ignores_pairs_inside_a_set(originals: list[Sample], copies: dict[str, tuple[Sample, str]]) -> None:
    copy_samples = [c for c, _ in copies.values()]
    mixed = originals[:10] + copy_samples  # copies sit next to their originals
    report = audit([mixed, originals[10:]], within=False, progress=False)
    assert report.pairs == []
    assert len(audit([mixed], progress=False).pairs) == len(copies)


def test_json_output(tmp_path: Path, originals: list[Sample], copies: dict[str, tuple[Sample, str]]) -> None:
    report = audit([originals, [c for c, _ in copies.values()]], progress=False)
    out = report.to_json(tmp_path / "sub" / "report.json")
    data = json.loads(out.read_text())
    assert set(data) >= {"pairs", "details", "summary"}
    assert len(data["pairs"]) == len(copies)
    for (a, b, dist), d in zip(data["pairs"], data["details"]):
        assert isinstance(a, str) and isinstance(b, str) and 0.0 <= dist < 0.2
        assert d["a"] == a and d["b"] == b and d["kind"] == "hash" and "transform" in d
    assert data["summary"]["near_pairs"] == len(copies)
    assert "exact duplicate pairs: 0" in report.format_summary()


def test_cross_pairs_and_split_leakage(originals: list[Sample], copies: dict[str, tuple[Sample, str]]) -> None:
    copy_samples = [c for c, _ in copies.values()]
    report = audit([originals + copy_samples], progress=False)
    train = originals[:3] + copy_samples[3:]
    test = originals[3:] + copy_samples[:3]
    across = cross_pairs(report, train, test)
    assert len(across) == len(copies)
    assert cross_pairs(report, originals, []) == []
    leaks = split_leakage(train, test)
    assert {frozenset((p.a, p.b)) for p in leaks} == {frozenset((p.a, p.b)) for p in across}
    assert all(p.set_a == 0 and p.set_b == 1 for p in leaks)
    msg = leakage_warning(leaks, n_b=len(test))
    assert msg is not None and "DATA LEAK" in msg and str(len(leaks)) in msg
    assert leakage_warning([]) is None


def _rotated_copy(src: Path, dst: Path, degrees: float) -> Path:
    im = Image.open(src).convert("RGB")
    rot = im.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    return save(rot.transpose(Image.Transpose.FLIP_LEFT_RIGHT), dst)


def test_embedding_stage_uses_embed_and_keypoints(tmp_path: Path, originals: list[Sample]) -> None:
    rotated = [
        Sample(_rotated_copy(originals[k].path, tmp_path / f"rot{k}.jpg", deg), originals[k].label)
        for k, deg in ((0, 15.0), (1, 15.0), (2, -12.0))
    ]
    calls: list[tuple[int, tuple[int, ...]]] = []

    def fake_embed(images: list[np.ndarray]) -> np.ndarray:
        calls.append((len(images), images[0].shape))
        # a crude, rotation-blind "embedding": colour means and a tiny thumbnail
        feats = [np.concatenate([im.mean(axis=(0, 1)), im[::32, ::32].ravel() / 8.0]) for im in images]
        return np.asarray(feats, dtype=np.float32)

    report = audit(
        [originals, rotated], embed=fake_embed, embed_size=96, embed_threshold=2.0,
        embed_candidates=len(originals), progress=False,
    )
    assert calls and all(shape == (96, 96, 3) for _, shape in calls)
    assert sum(n for n, _ in calls) == len(originals) + len(rotated)
    emb = report.by_kind("embedding")
    assert {p.b for p in emb} == {s.key for s in rotated}, [(Path(p.a).name, Path(p.b).name, p.inliers) for p in emb]
    rotated_keys = {s.key for s in rotated}
    # two distinct cells rotated alike share black fill wedges, which must not match
    assert not any(p.a in rotated_keys and p.b in rotated_keys for p in report.pairs)
    for p in emb:
        assert p.inliers is not None and p.inliers >= 15
        assert Path(p.a).name == f"cell_{int(Path(p.b).stem[3:]):02d}.jpg"
    # unchecked: every pair within the threshold is reported
    loose = audit([originals, rotated], embed=fake_embed, embed_size=64, embed_threshold=2.0,
                  verify=False, hash_threshold=None, exact=False, progress=False)
    n = len(originals) + len(rotated)
    assert len(loose.by_kind("embedding")) == n * (n - 1) // 2


def test_unreadable_images_are_listed_not_fatal(tmp_path: Path, originals: list[Sample]) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    report = audit([originals[:4] + [Sample(bad, "lymphocyte")]], progress=False)
    assert [k for k, _ in report.unreadable] == [str(bad)]
    assert report.summary()["unreadable"] == 1


def test_progress_callback_and_names(originals: list[Sample]) -> None:
    seen: list[str] = []
    report = audit([originals[:5], originals[5:9]], names=["a", "b"], progress=lambda s, d, t: seen.append(s))
    assert report.set_names == ["a", "b"] and report.set_sizes == [5, 4]
    assert any(s.startswith("exact") for s in seen) and any(s.startswith("hash") for s in seen)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hash_threshold": 1.5},
        {"embed_threshold": -0.1},
        {"max_shift": 0.5},
        {"candidates": 0},
        {"embed": "not callable"},
    ],
)
def test_bad_arguments_raise(kwargs: dict, originals: list[Sample]) -> None:
    with pytest.raises(LeukoError):
        audit([originals[:3]], progress=False, **kwargs)


def test_bad_sets_raise(originals: list[Sample]) -> None:
    with pytest.raises(LeukoError, match="at least one"):
        audit([], progress=False)
    with pytest.raises(LeukoError, match="no images"):
        audit([originals[:2], []], progress=False)
    with pytest.raises(LeukoError, match="two sets"):
        audit([originals[:2]], within=False, progress=False)


def test_report_groups() -> None:
    pairs = [
        DuplicatePair("a", "b", 0.0, "exact"),
        DuplicatePair("b", "c", 0.01, "hash"),
        DuplicatePair("x", "y", 0.02, "hash"),
    ]
    report = AuditReport(pairs=pairs, set_names=["s"], set_sizes=[5])
    assert report.groups() == [["a", "b", "c"], ["x", "y"]]
    assert report.summary()["images_with_duplicates"] == 5


@pytest.mark.shared
def test_pbc_has_17_exact_pairs_one_across_classes() -> None:
    pbc = SHARED / "pbc"
    if not pbc.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED}")
    from leuko.data import load_dataset

    index = load_dataset(pbc, "pbc")
    report = audit([index], hash_threshold=None, progress=False)
    exact = report.by_kind("exact")
    assert len(exact) == 17
    names = {frozenset(Path(k).relative_to(pbc).as_posix() for k in (p.a, p.b)) for p in exact if p.cross_class}
    assert names == {frozenset({"eosinophil/EO_225902.jpg", "neutrophil/BNE_191112.jpg"})}


@pytest.mark.shared
@pytest.mark.slow
def test_pbc_has_no_near_duplicates_between_distinct_cells() -> None:
    pbc = SHARED / "pbc"
    if not pbc.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED}")
    from leuko.data import load_dataset

    report = audit([load_dataset(pbc, "pbc")], progress=False)
    assert len(report.by_kind("exact")) == 17
    assert report.by_kind("hash") == []
