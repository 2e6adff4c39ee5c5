"""``cell-crop``, ``rbc-crop`` and ``reinhard``: the cell ends up the same size whatever the framing (or,
with ``rbc-crop``, the same size relative to its red cells); stains are matched.

The synthetic smears below place one white cell (purple two-lobed nucleus,
lavender cytoplasm) off-centre among red cells on a beige background, at two
scales; after the crop the cell must span the requested share of the side in
both. The shared-data tests check the search on real PBC and BCCD images.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leuko.data import load_dataset
from leuko.data.crops import crop_report, write_crops
from leuko.data.preprocess import (
    DEFAULT_CELL_SHARE,
    Preprocess,
    build_preprocess,
    decode_sample,
    find_cell,
    lab_stats,
    parse_preprocess,
    red_cell_diameter,
    reinhard,
    smear_norm,
    smear_stats,
    SMEAR_TARGETS,
)
from leuko.data.samples import Sample
from leuko.errors import LeukoError
from cells import call

BACKGROUND = (238, 222, 205)
RBC = (222, 160, 165)
CYTOPLASM = (200, 176, 218)
NUCLEUS = (88, 46, 152)


def smear(side: int, cx: float, cy: float, r: float, seed: int = 0, rbc_r: float | None = None, n_rbc: int = 40) -> np.ndarray:
    """A ``side`` square smear with a white cell of radius ``r`` at ``(cx, cy)`` and red cells
    (radius ``rbc_r``, default ``0.55 * r``) around it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    img = np.empty((side, side, 3), np.float32)
    img[...] = BACKGROUND
    rbc_r = 0.55 * r if rbc_r is None else rbc_r
    for _ in range(n_rbc):
        x, y = rng.uniform(0, side, 2)
        if np.hypot(x - cx, y - cy) < r + rbc_r + 4:
            continue
        img[(xx - x) ** 2 + (yy - y) ** 2 < rbc_r**2] = RBC
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = CYTOPLASM
    for dx in (-0.35 * r, 0.35 * r):  # two lobes: the search must join them
        img[(xx - cx - dx) ** 2 + (yy - cy) ** 2 < (0.4 * r) ** 2] = NUCLEUS
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def cell_extent_share(out: np.ndarray) -> float:
    """Longer side of the white cell's pixels (blue well above green) over the image side."""
    f = out.astype(np.int32)
    ys, xs = np.nonzero(f[..., 2] - f[..., 1] > 20)
    return max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / out.shape[0]


# ----------------------------------------------------------------- parsing


def test_steps_parse_validate_and_change_the_decode() -> None:
    assert parse_preprocess("cell-crop") == (f"cell-crop:{DEFAULT_CELL_SHARE:g}",)
    assert parse_preprocess(["reinhard", "Cell_Crop:0.5"]) == ("cell-crop:0.5", "reinhard:pbc")
    for bad, msg in (
        ("cell-crop:1.5", "cell share must be in"),
        ("cell-crop:x", "is not a number"),
        ("center-crop:0.8,cell-crop", "at most one geometric step"),
        ("cell-crop,rbc-crop", "at most one geometric step"),
        ("rbc-crop:1.5", "span must be in"),
        ("reinhard:mars", "unknown reinhard reference"),
        ("smear-norm:mars", "unknown smear-norm reference"),
    ):
        with pytest.raises(LeukoError, match=msg):
            parse_preprocess(bad)
    pre = build_preprocess(64, "cell-crop:0.5")
    assert pre.cell_share == 0.5 and pre.decode_size == 128
    assert pre.fingerprint != build_preprocess(64, "cell-crop:0.6").fingerprint != build_preprocess(64).fingerprint


# ----------------------------------------------------------------- the crop


@pytest.mark.parametrize(
    "side, cx, cy, r",
    [
        (360, 130.0, 220.0, 40.0),  # PBC-like: a small cell, off-centre in a wide field
        (200, 115.0, 90.0, 70.0),  # another lab's tight crop: the cell fills most of it
    ],
)
def test_cell_is_found_and_cropped_to_the_same_share(side: int, cx: float, cy: float, r: float) -> None:
    img = smear(side, cx, cy, r)
    box = find_cell(img)
    assert box is not None
    bx, by = box.center
    assert abs(bx - cx) < 0.12 * r and abs(by - cy) < 0.12 * r
    assert box.size == pytest.approx(2 * r, rel=0.15)
    for share in (0.45, 0.65):
        res = Preprocess(96, (f"cell-crop:{share}",)).run(img)
        assert not res.fell_back and res.image.shape == (96, 96, 3)
        assert cell_extent_share(res.image) == pytest.approx(share, abs=0.06)
        # and centred: the nucleus's middle is the crop's middle
        f = res.image.astype(np.int32)
        ys, xs = np.nonzero(f[..., 2] - f[..., 1] > 80)
        assert abs(xs.mean() - 47.5) < 6 and abs(ys.mean() - 47.5) < 6


def test_two_framings_of_one_cell_give_the_same_crop() -> None:
    wide = smear(360, 150.0, 200.0, 40.0, seed=1)
    tight = np.ascontiguousarray(wide[200 - 60 : 200 + 60, 150 - 60 : 150 + 60])  # 120 px around the cell
    pre = build_preprocess(96, "cell-crop:0.55")
    a, b = pre(wide), pre(tight)
    assert cell_extent_share(a) == pytest.approx(cell_extent_share(b), abs=0.04)
    inner = slice(24, 72)  # the cell itself (the rims differ: red cells vs filled background)
    assert np.abs(a[inner, inner].astype(int) - b[inner, inner].astype(int)).mean() < 12


def test_a_box_sample_is_cut_from_its_field_not_from_padding(tmp_path: Path) -> None:
    """A tight annotation box (BCCD) is searched with CELL_CONTEXT of its field around it: the
    crop's rim is the smear's red cells, as in a whole-frame sample, not flat fill."""
    field = smear(480, 240.0, 240.0, 40.0, seed=2)
    Image.fromarray(field).save(tmp_path / "field.png")
    pre = build_preprocess(96, "cell-crop:0.7")
    box = Sample(tmp_path / "field.png", "?", crop=(196, 196, 284, 284))  # the cell, margin 0.05
    a = decode_sample(box, pre)
    b = pre(field[120:360, 120:360])  # the same cell framed by its field
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 6
    rim = np.concatenate([a[:4].reshape(-1, 3), a[-4:].reshape(-1, 3)]).astype(int)
    assert np.abs(rim - np.array(RBC)).sum(axis=1).min() < 30  # a red cell reaches the rim
    # a box at the field's edge: the part past the image is background-coloured, not black
    edge = Sample(tmp_path / "field.png", "?", crop=(0, 0, 60, 60))
    assert decode_sample(edge, pre).min(axis=(0, 1)).max() > 60


def test_no_cell_falls_back_to_the_whole_frame_and_is_reported(tmp_path: Path) -> None:
    blank = np.full((300, 300, 3), 235, np.uint8)
    blank += np.random.default_rng(0).integers(0, 6, blank.shape, dtype=np.uint8)
    pre = build_preprocess(64, "cell-crop")
    assert find_cell(blank) is None
    res = pre.run(blank)
    assert res.fell_back and res.cell is None and res.image.shape == (64, 64, 3)
    assert abs(int(res.image.mean()) - int(blank.mean())) <= 1  # the frame, resized
    Image.fromarray(blank).save(tmp_path / "blank.png")
    Image.fromarray(smear(200, 100, 100, 40)).save(tmp_path / "cell.png")
    samples = [Sample(tmp_path / "blank.png", "?"), Sample(tmp_path / "cell.png", "?"), Sample(tmp_path / "gone.png", "?")]
    report = crop_report(samples, pre, workers=1)
    assert report.fallbacks == [str(tmp_path / "blank.png")]
    assert [k for k, _ in report.failed] == [str(tmp_path / "gone.png")]
    assert report.found_share == 0.5 and "cell found in 1 of 2 images" in report.summary()
    # decode_sample (training, inference, ONNX) gives the same pixels as run()
    assert np.array_equal(decode_sample(samples[1], pre), pre.run(np.asarray(Image.open(samples[1].path).convert("RGB").resize((128, 128), Image.BILINEAR))).image)


def test_data_crops_cli_writes_sheets_and_lists_fallbacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "lab"
    for cls, seed in (("neutrophil", 0), ("lymphocyte", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(smear(160, 70 + 5 * i, 90, 30, seed=seed * 10 + i)).save(root / cls / f"{i}.png")
    Image.fromarray(np.full((160, 160, 3), 230, np.uint8)).save(root / "lymphocyte" / "empty.png")
    out = tmp_path / "crops"
    code = call(["data", "crops", str(root), "--out", str(out), "--layout", "folder", "--image-size", "64"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "cell found in 6 of 7 images" in text and "empty.png" in text
    assert (out / "fallbacks.txt").read_text().strip().endswith("lymphocyte/empty.png")
    assert len(list((out / "crops").rglob("*.png"))) == 7 and (out / "sheet_01.png").stat().st_size > 1000
    assert len((out / "crops.csv").read_text().splitlines()) == 8
    code = call(["data", "crops", str(root), "--out", str(out)])  # never overwrites
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "exists and is not empty" in err[0]


# ----------------------------------------------------------------- rbc-crop


@pytest.mark.parametrize("side, r", [(400, 40.0), (200, 20.0)])
def test_red_cell_diameter_measures_the_red_cells(side: int, r: float) -> None:
    img = smear(side, side * 0.45, side * 0.55, r, rbc_r=0.5 * r, n_rbc=60)
    cell = find_cell(img)
    assert cell is not None
    assert red_cell_diameter(img, cell) == pytest.approx(r, rel=0.15)  # diameter 2 * 0.5 r


def test_rbc_crop_keeps_the_size_a_cell_crop_throws_away() -> None:
    """A big and a small white cell among the same red cells: cell-crop scales each to its own size
    (a fixed share of the side); rbc-crop keeps their ratio (the size cue) and gives one framing
    at two magnifications."""
    big, small = smear(400, 200, 200, 50, rbc_r=20, n_rbc=60, seed=3), smear(400, 200, 200, 30, rbc_r=20, n_rbc=60, seed=4)
    rbc_crop = build_preprocess(96, "rbc-crop:4")  # decoded at 192 px: red cells 40 -> 19.2 px across
    a, b = rbc_crop.run(big), rbc_crop.run(small)
    assert a.ruler == pytest.approx(19.2, rel=0.15) and b.ruler == pytest.approx(19.2, rel=0.15)
    assert a.window is not None and a.window[2] == pytest.approx(4 * 19.2, rel=0.15)
    assert cell_extent_share(a.image) == pytest.approx(100 / 160, abs=0.08)  # 2r over 4 diameters
    assert cell_extent_share(b.image) == pytest.approx(60 / 160, abs=0.08)
    assert cell_extent_share(a.image) / cell_extent_share(b.image) == pytest.approx(5 / 3, rel=0.15)
    # the same smear at half the magnification: the same crop (up to resampling)
    half = smear(200, 100, 100, 25, rbc_r=10, n_rbc=60, seed=3)
    assert cell_extent_share(rbc_crop(half)) == pytest.approx(cell_extent_share(a.image), abs=0.08)


def test_rbc_crop_without_red_cells_crops_as_cell_crop_and_is_reported(tmp_path: Path) -> None:
    """A tight crop of a lone cell (no red cells to measure): cell-crop's share, and the report says so."""
    lone = smear(200, 100, 100, 40, n_rbc=0)
    pre = build_preprocess(96, "rbc-crop")
    res = pre.run(lone)
    assert res.ruler is None and not res.fell_back
    assert cell_extent_share(res.image) == pytest.approx(DEFAULT_CELL_SHARE, abs=0.06)
    assert red_cell_diameter(lone) is None
    Image.fromarray(lone).save(tmp_path / "lone.png")
    Image.fromarray(smear(400, 200, 200, 40, rbc_r=20, n_rbc=60)).save(tmp_path / "field.png")
    samples = [Sample(tmp_path / "lone.png", "?"), Sample(tmp_path / "field.png", "?")]
    report = crop_report(samples, pre, workers=1)
    assert report.no_ruler == [str(tmp_path / "lone.png")]
    assert "red-cell ruler in 1 of 2" in report.summary()
    assert crop_report(samples, build_preprocess(96, "cell-crop"), workers=1).no_ruler == []
    # rbc-crop pixels never share a cache entry with cell-crop's
    assert pre.fingerprint != build_preprocess(96, "cell-crop").fingerprint
    assert pre.decode_size == 192


def test_data_crops_cli_lists_the_ruler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "lab" / "neutrophil"
    root.mkdir(parents=True)
    Image.fromarray(smear(400, 200, 200, 40, rbc_r=20, n_rbc=60)).save(root / "a.png")
    Image.fromarray(smear(200, 100, 100, 40, n_rbc=0)).save(root / "b.png")
    out = tmp_path / "crops"
    code = call(["data", "crops", str(tmp_path / "lab"), "--out", str(out), "--layout", "folder", "--preprocess", "rbc-crop"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "red-cell ruler in 1 of 2" in text
    rows = (out / "crops.csv").read_text().splitlines()
    assert rows[0].endswith("window_left,window_top,window_side,rbc_diameter")
    by_name = {r.split(",")[0].split("/")[-1]: r.split(",") for r in rows[1:]}
    assert by_name["b.png"][-1] == "" and float(by_name["a.png"][-1]) == pytest.approx(40 * 256 / 400, rel=0.15)  # decoded pixels


@pytest.mark.shared
def test_red_cell_ruler_agrees_between_labs(shared_datasets: Path) -> None:
    """Neutrophils are about 2.2 red cells across in PBC and in BCCD, whose magnifications differ
    by ~1.4x: the ruler measures the same physical scale in both labs."""
    pre = build_preprocess(128, "rbc-crop")
    ratios = {}
    for name, layout in (("pbc", None), ("bccd", "bccd")):
        index = load_dataset(shared_datasets / name, layout)
        neut = [s for s in index.samples if s.label == "neutrophil"]
        report = crop_report(random.Random(0).sample(neut, 40), pre)
        found = [r for r in report.records if r.ruler is not None]
        assert len(found) >= 28, report.summary()  # 70%: BCCD's crowded fields defeat it sometimes
        ratios[name] = float(np.median([r.cell.size / r.ruler for r in found]))
    assert 1.8 < ratios["pbc"] < 2.7 and 1.8 < ratios["bccd"] < 2.7, ratios
    assert abs(ratios["pbc"] - ratios["bccd"]) < 0.4, ratios


# ----------------------------------------------------------------- Reinhard


def test_reinhard_maps_lab_statistics_onto_the_target() -> None:
    ref = smear(200, 100, 100, 40, seed=3)
    rng = np.random.default_rng(0)
    # another "lab": bluer, paler, lower contrast
    src = np.clip(smear(200, 90, 110, 45, seed=4).astype(np.float32) * [0.85, 0.9, 1.0] + [20, 25, 30] + rng.normal(0, 3, (200, 200, 3)), 0, 255).astype(np.uint8)
    target = lab_stats(ref)
    before = np.array(lab_stats(src))
    after = np.array(lab_stats(reinhard(src, target)))
    t = np.array(target)
    assert np.abs(after[:3] - t[:3]).max() < 1.5  # means matched (up to uint8 rounding and clipping)
    assert np.abs(after[3:] / t[3:] - 1).max() < 0.08  # spreads matched
    assert np.abs(before - t).max() > 5  # ...and they were not before
    # the named reference is what the 'reinhard' step applies
    pre = build_preprocess(64, "reinhard")
    assert np.array_equal(pre(src), reinhard(np.asarray(Image.fromarray(src).resize((64, 64), Image.BILINEAR)), "pbc"))
    flat = np.full((32, 32, 3), 200, np.uint8)
    assert np.isfinite(reinhard(flat).astype(float)).all()  # no division blow-up on a flat image


def test_smear_norm_takes_its_map_from_the_smear_not_the_cell() -> None:
    """Two different white cells on one slide get the same colour map (per-image Reinhard does not),
    and another lab's smear (darker, bluer, lower contrast) is brought to the reference's smear."""
    small = smear(200, 100, 100, 40, seed=5)  # a cell with pale cytoplasm around two lobes
    big = small.copy()  # same slide, a cell that is almost all nucleus (a lymphocyte)
    yy, xx = np.mgrid[0:200, 0:200]
    big[(xx - 100) ** 2 + (yy - 100) ** 2 < 36**2] = NUCLEUS
    pre = build_preprocess(96, "cell-crop:0.7,smear-norm")
    assert pre.steps == ("cell-crop:0.7", "smear-norm:pbc")
    crops = [build_preprocess(96, "cell-crop:0.7")(im) for im in (small, big)]
    smear_means = [np.array(smear_stats(c, 0.7)[:3]) for c in crops]
    assert np.abs(smear_means[0] - smear_means[1]).max() < 4  # the smear looks the same around both cells...
    whole = [np.array(lab_stats(c)[:3]) for c in crops]
    assert np.abs(whole[0] - whole[1]).max() > 6  # ...while the whole crops differ (cell content)
    # the map is the same: the nucleus colour comes out the same around both cells
    nuc = np.array(NUCLEUS, np.uint8).reshape(1, 1, 3)
    maps = [smear_norm(np.concatenate([c, np.broadcast_to(nuc, (4, 96, 3))], 0), "pbc", None) for c in crops]
    assert np.abs(maps[0][-1, 0].astype(int) - maps[1][-1, 0].astype(int)).max() <= 3
    re = [reinhard(np.concatenate([c, np.broadcast_to(nuc, (4, 96, 3))], 0), "pbc") for c in crops]
    assert np.abs(re[0][-1, 0].astype(int) - re[1][-1, 0].astype(int)).max() > 6  # per-image Reinhard does not
    # another lab: the smear statistics land on the reference (L shifted and scaled, a and b shifted)
    other = np.clip(crops[0].astype(np.float32) * [0.85, 0.9, 1.0] + [0, 5, 25], 0, 255).astype(np.uint8)
    ref = np.array(SMEAR_TARGETS["pbc"])
    out = np.array(smear_stats(smear_norm(other, "pbc", 0.7), 0.7))
    assert np.abs(np.array(smear_stats(other, 0.7))[:3] - ref[:3]).max() > 5
    assert np.abs(out[:3] - ref[:3]).max() < 3 and abs(out[3] / ref[3] - 1) < 0.1
    # and the step is what the preprocessing applies after the crop
    assert np.array_equal(pre(small), smear_norm(crops[0], "pbc", 0.7))


# ----------------------------------------------------------------- real images


@pytest.mark.shared
@pytest.mark.parametrize("name, layout", [("pbc", None), ("bccd", "bccd")])
def test_cell_found_in_real_images(shared_datasets: Path, name: str, layout: str | None) -> None:
    index = load_dataset(shared_datasets / name, layout)
    samples = random.Random(0).sample(index.samples, 100)
    report = crop_report(samples, build_preprocess(128, "cell-crop"))
    assert not report.failed
    assert report.found_share >= 0.95, report.fallbacks
    # the found cell is a plausible white cell: between 10% and 100% of the decoded frame
    sizes = np.array([r.cell.size for r in report.records if r.cell is not None]) / 256
    assert np.median(sizes) > 0.25 and sizes.max() <= 1.0 + 1e-6


def test_write_crops_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(LeukoError, match="exists"):
        write_crops([], build_preprocess(32, "cell-crop"), tmp_path / "x")
