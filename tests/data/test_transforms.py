"""Transforms: shapes, normalisation values, presets, deterministic steps, errors."""

from __future__ import annotations

import pickle

import albumentations as A
import numpy as np
import pytest
import torch

from leuko.data.transforms import (
    AUGMENT_PRESETS,
    PREPROCESS_STEPS,
    Preprocess,
    StainJitter,
    augment_transforms,
    build_preprocess,
    build_transforms,
    clahe,
    parse_preprocess,
)
from leuko.errors import LeukoError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _cell_image(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """A non-symmetric, textured picture, so flips and shifts are visible."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (230, 200, 210), np.uint8)
    img[h // 4 : h // 2, w // 5 : w // 2] = (120, 40, 160)  # an off-centre "nucleus"
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    return img


@pytest.mark.parametrize("augment", list(AUGMENT_PRESETS))
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_dtype(augment: str, train: bool) -> None:
    t = build_transforms(32, train=train, augment=augment, mean=MEAN, std=STD, seed=0)
    x = t(_cell_image(48, 40))  # non-square input of another size
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (3, 32, 32)
    assert torch.isfinite(x).all()


def test_constant_image_normalises_to_expected_value() -> None:
    mean, std = (0.2, 0.5, 0.8), (0.1, 0.25, 0.5)
    t = build_transforms(16, train=False, mean=mean, std=std)
    x = t(np.full((20, 20, 3), (51, 102, 255), np.uint8))
    expected = [(51 / 255 - 0.2) / 0.1, (102 / 255 - 0.5) / 0.25, (255 / 255 - 0.8) / 0.5]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((16, 16), expected[c]), atol=1e-5)


def test_eval_transform_is_deterministic_and_ignores_augment() -> None:
    img = _cell_image()
    a = build_transforms(32, train=False, augment="cells", mean=MEAN, std=STD)
    b = build_transforms(32, train=False, augment="none", mean=MEAN, std=STD)
    assert torch.equal(a(img), a(img))
    assert torch.equal(a(img), b(img))


@pytest.mark.parametrize("augment", ["study", "cells"])
def test_presets_change_images_but_keep_shape(augment: str) -> None:
    img = _cell_image(32, 32)
    plain = build_transforms(32, train=False, mean=MEAN, std=STD)(img)
    t = build_transforms(32, train=True, augment=augment, mean=MEAN, std=STD, seed=1)
    outs = [t(img) for _ in range(8)]
    assert all(o.shape == plain.shape for o in outs)
    assert sum(not torch.equal(o, plain) for o in outs) >= 6
    assert len({o.numpy().tobytes() for o in outs}) >= 6  # varies from draw to draw


def test_none_preset_is_identity() -> None:
    img = _cell_image(32, 32)
    plain = build_transforms(32, train=False, mean=MEAN, std=STD)(img)
    t = build_transforms(32, train=True, augment="none", mean=MEAN, std=STD)
    assert torch.equal(t(img), plain)


def test_study_preset_is_flip_and_translation_only() -> None:
    ops = augment_transforms("study")
    assert [type(o) for o in ops] == [A.HorizontalFlip, A.Affine]
    affine = ops[1]
    # no scale, rotation or shear: only translation
    assert all(tuple(v) == (1.0, 1.0) for v in affine.scale.values())
    assert tuple(affine.rotate) == (0.0, 0.0)
    assert all(tuple(v) == (0.0, 0.0) for v in affine.shear.values())
    assert any(tuple(v) != (0.0, 0.0) for v in affine.translate_percent.values())
    # behaviour: no colour change, so a uniform image stays exactly the same
    flat = np.full((32, 32, 3), (200, 120, 170), np.uint8)
    t = build_transforms(32, train=True, augment="study", mean=MEAN, std=STD, seed=0)
    ref = build_transforms(32, train=False, mean=MEAN, std=STD)(flat)
    assert all(torch.equal(t(flat), ref) for _ in range(10))


def test_cells_preset_changes_colour() -> None:
    flat = np.full((32, 32, 3), (200, 120, 170), np.uint8)
    t = build_transforms(32, train=True, augment="cells", mean=MEAN, std=STD, seed=0)
    ref = build_transforms(32, train=False, mean=MEAN, std=STD)(flat)
    assert any(not torch.allclose(t(flat), ref) for _ in range(10))


def test_seed_reproducible_and_reseed_changes_stream() -> None:
    img = _cell_image(32, 32)
    a = build_transforms(32, train=True, augment="cells", mean=MEAN, std=STD, seed=5)
    b = build_transforms(32, train=True, augment="cells", mean=MEAN, std=STD, seed=5)
    seq_a = [a(img) for _ in range(4)]
    seq_b = [b(img) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    b.reseed(6)
    assert not all(torch.equal(x, b(img)) for x in seq_a[:1] * 4)


def test_ops_share_one_random_stream() -> None:
    """Two identical p=0.5 ops must not always fire together (albumentations' Compose(seed) pitfall)."""
    t = build_transforms(16, train=True, augment="study", mean=MEAN, std=STD, seed=0)
    ops = t._ops.transforms  # type: ignore[union-attr]
    assert ops[0].random_generator is ops[1].random_generator


def test_clahe_increases_contrast() -> None:
    rng = np.random.default_rng(0)  # a dull, low-contrast grey texture
    img = (rng.normal(0, 1, (64, 64, 1)).repeat(3, axis=2) * 3 + 125).astype(np.uint8)
    out = clahe(img, 2.0)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.ptp(out) > 2 * np.ptp(img)
    assert out.std() > 2 * img.std()
    pre = build_preprocess(64, ["clahe"])
    assert np.array_equal(pre(img), out)


def test_center_crop_decodes_larger_and_keeps_the_centre() -> None:
    img = np.zeros((100, 100, 3), np.uint8)
    img[:] = (255, 0, 0)  # a red frame...
    img[8:92, 8:92] = (0, 255, 0)  # ...around a green centre
    pre = build_preprocess(32, "center-crop:0.75")
    assert pre.decode_size == 43
    out = pre(img)
    assert out.shape == (32, 32, 3)
    assert out[..., 0].max() < 20 and out[..., 1].min() > 235  # frame gone
    assert build_preprocess(32).decode_size == 32


def test_pad_resize_keeps_aspect() -> None:
    img = np.full((20, 40, 3), 255, np.uint8)
    pre = build_preprocess(40, resize="pad")
    out = pre(img)
    assert out.shape == (40, 40, 3)
    assert out[0].max() == 0 and out[20].min() == 255  # letterbox bars top/bottom


def test_parse_preprocess_canonical() -> None:
    assert parse_preprocess("clahe, Centre_Crop:0.80") == ("center-crop:0.8", "clahe:2")
    assert parse_preprocess(["clahe:3"]) == ("clahe:3",)
    assert parse_preprocess(None) == ()
    assert build_preprocess(64, ["clahe"]).fingerprint == build_preprocess(64, ["clahe:2.0"]).fingerprint
    assert build_preprocess(64, ["clahe"]).fingerprint != build_preprocess(64).fingerprint
    assert Preprocess(64).fingerprint != Preprocess(64, resize="pad").fingerprint


def test_unknown_preset_lists_allowed() -> None:
    with pytest.raises(LeukoError) as err:
        build_transforms(32, train=True, augment="strong", mean=MEAN, std=STD)
    for name in AUGMENT_PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "steps", [["sharpen"], ["center-crop"], ["center-crop:1.5"], ["clahe:abc"], ["center-crop:0.8", "center-crop:0.9"]]
)
def test_bad_preprocess_steps(steps: list[str]) -> None:
    with pytest.raises(LeukoError):
        parse_preprocess(steps)


def test_unknown_step_lists_allowed() -> None:
    with pytest.raises(LeukoError) as err:
        build_transforms(32, train=False, preprocess=["sharpen"], mean=MEAN, std=STD)
    for name in PREPROCESS_STEPS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mean": (0.5, 0.5), "std": STD},
        {"mean": (124.0, 116.0, 104.0), "std": STD},  # 0-255 scale by mistake
        {"mean": MEAN, "std": (0.2, 0.0, 0.2)},
        {"mean": MEAN, "std": STD, "resize": "squash"},
    ],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(LeukoError):
        build_transforms(32, train=False, **kwargs)


def test_bad_input_image() -> None:
    t = build_transforms(16, train=False, mean=MEAN, std=STD)
    with pytest.raises(LeukoError):
        t(np.zeros((16, 16, 3), np.float32))
    assert t(np.zeros((20, 20), np.uint8)).shape == (3, 16, 16)  # grey is fine


def test_stain_jitter() -> None:
    img = _cell_image(32, 32)
    op = StainJitter(alpha=0.1, beta=0.1, p=1.0)
    out = A.Compose([op], seed=0)(image=img)["image"]
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 40  # a nudge, not a repaint
    # density: one optical-density factor for all channels; half the stain = a paler image, same hue order
    pale = A.Compose([StainJitter(alpha=0.0, beta=0.0, density=(0.5, 0.5), p=1.0)], seed=0)(image=img)["image"]
    od = lambda x: -np.log((x.astype(float) + 1) / 256)  # noqa: E731
    dark = od(img) > 0.3
    assert np.allclose(od(pale)[dark], 0.5 * od(img)[dark], atol=0.02)
    with pytest.raises(LeukoError, match="density"):
        StainJitter(density=(1.2, 0.8))


def test_transform_pickles() -> None:
    """DataLoader workers started by spawn/forkserver receive the transform by pickle."""
    t = build_transforms(16, train=True, augment="cells", preprocess=["clahe"], mean=MEAN, std=STD, seed=0)
    t2 = pickle.loads(pickle.dumps(t))
    img = _cell_image(16, 16)
    assert t2(img).shape == (3, 16, 16)
    assert "cells" in repr(t2)
