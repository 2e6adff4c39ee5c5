"""The ``stain`` augmentation preset: it moves colour, contrast and sharpness well beyond ``cells``."""

from __future__ import annotations

import numpy as np
import pytest

from leuko.data.preprocess import lab_stats
from leuko.data.transforms import build_transforms
from test_cell_crop import smear


def spread(augment: str, image: np.ndarray, n: int = 60) -> tuple[np.ndarray, float]:
    """Std over augmented copies of each LAB statistic, and the std of log sharpness (Laplacian variance)."""
    import cv2

    t = build_transforms(64, train=True, augment=augment, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0)
    stats, sharp = [], []
    for _ in range(n):
        out = t.augment_uint8(image.copy())
        assert out.shape == image.shape and out.dtype == np.uint8
        stats.append(lab_stats(out))
        sharp.append(cv2.Laplacian(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())
    return np.array(stats).std(axis=0), float(np.std(np.log(sharp)))


def test_stain_preset_varies_colour_and_focus_more_than_cells() -> None:
    image = np.asarray(__import__("cv2").resize(smear(200, 100, 100, 45), (64, 64)))
    cells, cells_sharp = spread("cells", image)
    stain, stain_sharp = spread("stain", image)
    assert stain[0] > 1.5 * cells[0]  # lightness mean (stain uptake, brightness)
    assert stain[3] > 1.5 * cells[3]  # lightness spread (contrast)
    assert stain[1] + stain[2] > 1.2 * (cells[1] + cells[2])  # colour (a, b)
    assert stain_sharp > 1.5 * cells_sharp  # focus moves both ways (SoftFocus), and resampling


def test_stain_preset_is_seeded() -> None:
    image = smear(64, 32, 32, 14)
    a = build_transforms(64, train=True, augment="stain", mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)
    b = build_transforms(64, train=True, augment="stain", mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)
    assert all(np.array_equal(a.augment_uint8(image.copy()), b.augment_uint8(image.copy())) for _ in range(5))
    with pytest.raises(Exception, match="augment must be one of"):
        build_transforms(64, train=True, augment="stains", mean=(0.5,) * 3, std=(0.25,) * 3)


def test_soft_focus_gives_sharp_and_soft_cells_the_same_sharpness_range() -> None:
    """A sharp cell is blurred down to the drawn target; a cell already softer is left as it is.

    So over many draws a sharp class and a soft class end up with overlapping sharpness, which a
    blur of random strength does not give (it keeps the sharp class sharper in every draw).
    """
    import cv2

    from leuko.data.transforms import SoftFocus, detail

    sharp = smear(128, 64, 64, 40)
    rng = np.random.default_rng(0)
    sharp = np.clip(sharp.astype(np.int16) + rng.integers(-25, 26, sharp.shape), 0, 255).astype(np.uint8)  # granules
    soft = cv2.GaussianBlur(sharp, (0, 0), 0.8)
    assert detail(sharp) > 2 * detail(soft) and 1.0 < detail(soft) < 4.0
    t = SoftFocus(target=(1.0, 4.0), p=1.0)
    for goal in (1.2, 2.5, 3.5):
        if goal < detail(sharp):
            assert 0.85 * goal <= detail(t.apply(sharp, goal=goal)) <= goal  # 7 bisection steps: at most the goal
    assert np.array_equal(t.apply(soft, goal=detail(soft) + 0.5), soft)
    t.set_random_seed(0)
    a = [detail(t(image=sharp)["image"]) for _ in range(40)]
    b = [detail(t(image=soft)["image"]) for _ in range(40)]
    assert np.mean(np.array(a) <= detail(soft)) > 0.25  # often as soft as the soft cell, or softer
    assert max(b) == pytest.approx(detail(soft)) and min(b) < 0.9 * detail(soft)
    with pytest.raises(Exception, match="SoftFocus target"):
        SoftFocus(target=(3.0, 1.0))


def test_soft_focus_range_follows_the_input_size() -> None:
    """``detail`` is per pixel: the same cell at twice the side reads about half as sharp, so the
    ``stain`` preset's target range halves with it (else a larger input is blurred less, relatively)."""
    import cv2

    from leuko.data.transforms import SoftFocus, augment_transforms, detail, soft_focus_target

    rng = np.random.default_rng(1)
    cell = smear(512, 256, 256, 160)
    cell = cv2.GaussianBlur(np.clip(cell.astype(np.int16) + rng.integers(-30, 31, cell.shape), 0, 255).astype(np.uint8), (0, 0), 2.0)
    small, large = (cv2.resize(cell, (s, s), interpolation=cv2.INTER_AREA) for s in (128, 256))
    assert 0.4 < detail(large) / detail(small) < 0.65
    assert soft_focus_target(128) == (1.2, 5.0) and soft_focus_target(256) == (0.6, 2.5)
    for size in (128, 256):
        (focus,) = [op for op in augment_transforms("stain", size) if isinstance(op, SoftFocus)]
        assert focus.target == soft_focus_target(size)
    assert not any(isinstance(op, SoftFocus) for op in augment_transforms("cells", 256))


def test_soft_focus_sharpens_soft_cells_up_to_the_target_when_asked() -> None:
    """With ``sharpen``, a cell softer than the drawn target is raised to it (capped by the amount), so
    the soft class stops being the only one that is soft in every draw."""
    import cv2

    from leuko.data.transforms import SoftFocus, detail

    rng = np.random.default_rng(2)
    cell = smear(128, 64, 64, 40)
    cell = np.clip(cell.astype(np.int16) + rng.integers(-25, 26, cell.shape), 0, 255).astype(np.uint8)
    soft = cv2.GaussianBlur(cell, (0, 0), 1.2)
    d0 = detail(soft)
    keep = SoftFocus(target=(1.0, 4.0), p=1.0)
    assert np.array_equal(keep.apply(soft, goal=1.5 * d0), soft)  # blur-only: a softer image is left alone
    up = SoftFocus(target=(1.0, 4.0), sharpen=3.0, p=1.0)
    raised = up.apply(soft, goal=1.5 * d0)
    assert 0.9 * 1.5 * d0 <= detail(raised) <= 1.5 * d0  # 7 bisection steps: at most the goal
    capped = up.apply(soft, goal=50.0)  # out of reach: the largest amount, no more
    assert 1.5 * d0 < detail(capped) < 50.0
    assert up.apply(soft, goal=0.5 * d0).shape == soft.shape and detail(up.apply(soft, goal=0.5 * d0)) <= 0.5 * d0
    with pytest.raises(Exception, match="sharpen"):
        SoftFocus(sharpen=-1.0)


def test_every_preset_has_a_version_and_stain_is_at_v4() -> None:
    """Runs record the preset's version (data.json); a preset without one would record None."""
    from leuko.data.transforms import AUGMENT_PRESETS, AUGMENT_VERSIONS

    assert set(AUGMENT_VERSIONS) == set(AUGMENT_PRESETS)
    assert AUGMENT_VERSIONS["stain"] == 4  # raise it with any change to _stain_transforms
