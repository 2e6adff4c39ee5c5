"""Grad-CAM: maps on a trained run, a crafted model whose evidence is known, the layer finder, the CLI."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from cells import call, make_cell
from PIL import Image

from leuko.errors import LeukoError
from leuko.explain import GradCAM, explanation_png, find_target_layer, overlay
from leuko.infer import Predictor
from leuko.models import IMAGENET_MEAN, IMAGENET_STD, build_model, registered_names
from leuko.run.card import ModelCard
from leuko.run.folder import save_model

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explain") / "cells"
    for ci, cls in enumerate(CLASSES):
        for i in range(20):
            make_cell(root / cls / f"{i}.png", size=(48, 48), seed=1000 * ci + i, hue=70 * ci)
    return root


@pytest.fixture(scope="module")
def frozen_run(cells: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 (bundled weights), frozen backbone, head trained on features: ~7 s."""
    from leuko.train import train

    out = tmp_path_factory.mktemp("explain-run") / "run"
    over = [
        "model.name=efficientnet_lite0",
        "model.pretrained=bundled",
        "model.freeze=backbone",
        "data.image_size=64",
        "data.num_workers=0",
        "train.epochs=20",
        "train.lr=0.01",
        "trainer.progress=false",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKO_CACHE_DIR", str(out.parent / "cache"))
        train(None, out, overrides=over, data_path=cells, echo=lambda s: None)
    return out


@pytest.fixture(scope="module")
def explainer(frozen_run: Path) -> GradCAM:
    """One explainer for the read-only tests (building a Predictor and finding the layer costs seconds)."""
    return GradCAM(Predictor(frozen_run, device="cpu"))


def crafted_run(tmp_path: Path, *, image_size: int = 64, resize: str = "stretch", preprocess: list[str] | None = None) -> Path:
    """A custom_cnn whose class 0 ("red") logit is the mean red level, carried by channel 0 only.

    Every convolution passes input channel 0 to output channel 0 through its
    centre tap and nothing else; BatchNorm is the identity; the classifier
    reads channel 0 (+1 for "red", -1 for "other"). So the Grad-CAM of "red"
    is the map of red pixels, and where it puts its mass is known.
    """
    model = build_model("custom_cnn", 2, pretrained="none").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.weight[0, 0, 1, 1] = 1.0
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[0, 0] = 1.0
        model.fc.weight[1, 0] = -1.0
    meta = {
        "model": {"name": "custom_cnn", "head": "linear", "dropout": None, "pretrained": "none"},
        "classes": ["red", "other"],
        "input": {"image_size": image_size, "resize": resize, "preprocess": preprocess or [], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "temperature": 1.0,
    }
    run = tmp_path / f"crafted-{resize}-{len(preprocess or [])}"
    run.mkdir()
    save_model(run / "model.pt", model, ModelCard.from_meta(meta))
    return run


def red_image(h: int, w: int, x0: int, x1: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[y0 : (h if y1 is None else y1), x0:x1, 0] = 255
    return img


# --------------------------------------------------------------------------- a trained run


def test_cam_on_trained_run(explainer: GradCAM, cells: Path) -> None:
    cam = explainer
    predictor = cam.predictor
    assert cam.layer == "bn2"
    path = cells / "lymphocyte" / "3.png"
    exp = cam.explain_path(path)
    assert exp.cam.shape == (48, 48) and exp.cam.dtype == np.float32
    assert exp.cam.min() >= 0.0 and exp.cam.max() == pytest.approx(1.0)
    assert exp.cam.std() > 0.01  # not constant
    # exactly the Predictor's preprocessing and temperature: the same probabilities
    ref = predictor.predict_paths([path]).probs[0]
    np.testing.assert_allclose(exp.probs, ref, atol=1e-6)
    assert exp.class_index == int(ref.argmax()) == exp.predicted
    # the map has the size of whatever image it is given
    wide = np.asarray(Image.open(path).convert("RGB").resize((90, 40)))
    assert cam.explain_array(wide).cam.shape == (40, 90)


def test_frozen_weights_model_left_unchanged(frozen_run: Path, cells: Path) -> None:
    predictor = Predictor(frozen_run, device="cpu")
    model = predictor.model
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp = GradCAM(predictor).explain_path(cells / "neutrophil" / "5.png")
    assert exp.cam.std() > 0.01 and exp.cam.max() == pytest.approx(1.0)
    assert not model.training
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_target_class(explainer: GradCAM, cells: Path) -> None:
    cam = explainer
    img = np.asarray(Image.open(cells / "eosinophil" / "1.png").convert("RGB"))
    exp = cam.explain_array(img, "neutrophil")
    assert exp.class_index == 2 and exp.class_name == "neutrophil"
    assert exp.probability == pytest.approx(exp.probs[2])
    assert cam.explain_array(img, 1).class_index == 1
    with pytest.raises(LeukoError, match="unknown class 'platelet'"):
        cam.explain_array(img, "platelet")
    with pytest.raises(LeukoError, match="out of range"):
        cam.explain_array(img, 3)
    with pytest.raises(LeukoError, match="uint8"):
        cam.explain_array(img.astype(np.float32))


# --------------------------------------------------------------------------- known evidence


def _share(cam: np.ndarray, region: tuple[slice, slice]) -> float:
    return float(cam[region].sum() / cam.sum())


def test_evidence_on_one_side(tmp_path: Path) -> None:
    cam = GradCAM(Predictor(crafted_run(tmp_path), device="cpu"))
    assert cam.layer == "stages"
    left = cam.explain_array(red_image(64, 64, 0, 24), "red")
    assert left.predicted_name == "red"
    assert _share(left.cam, (slice(None), slice(0, 32))) > 0.9
    right = cam.explain_array(red_image(64, 64, 40, 64), "red")
    assert _share(right.cam, (slice(None), slice(32, 64))) > 0.9
    # rows are rows: evidence in the top band is found at the top, not transposed
    top = cam.explain_array(red_image(64, 64, 0, 64, 0, 24), "red")
    assert _share(top.cam, (slice(0, 32), slice(None))) > 0.9
    # nothing red: no positive evidence for "red", an all-zero map (not noise scaled up)
    blank = cam.explain_array(np.zeros((64, 64, 3), np.uint8), "red")
    assert blank.cam.max() == 0.0


def test_geometry_pad_and_crop(tmp_path: Path) -> None:
    # pad: a 40 x 80 image is letterboxed into the square; the map comes back at 40 x 80
    pad = GradCAM(Predictor(crafted_run(tmp_path, resize="pad"), device="cpu"))
    exp = pad.explain_array(red_image(40, 80, 0, 24), "red")
    assert exp.cam.shape == (40, 80)
    assert _share(exp.cam, (slice(None), slice(0, 40))) > 0.9
    # crop: the model sees only the central 40 x 40 (x 20..60); outside it the map is 0
    crop = GradCAM(Predictor(crafted_run(tmp_path, resize="crop"), device="cpu"))
    exp = crop.explain_array(red_image(40, 80, 20, 36), "red")
    assert exp.cam.shape == (40, 80)
    assert exp.cam[:, :20].max() == 0.0 and exp.cam[:, 61:].max() == 0.0
    assert _share(exp.cam, (slice(None), slice(20, 40))) > 0.9


def test_geometry_cell_crop(tmp_path: Path) -> None:
    """With a content-dependent crop the map lands on the window around the cell, zero elsewhere."""
    from leuko.data import preprocess as pre_mod

    if "cell-crop" not in getattr(pre_mod, "PREPROCESS_STEPS", {}):
        pytest.skip("this leuko has no cell-crop preprocessing")
    cam = GradCAM(Predictor(crafted_run(tmp_path, preprocess=["cell-crop"]), device="cpu"))
    img = np.empty((120, 160, 3), np.uint8)
    img[...] = (230, 200, 205)  # smear background
    yy, xx = np.mgrid[0:120, 0:160]
    img[(xx - 40) ** 2 + (yy - 40) ** 2 < 14**2] = (120, 40, 170)  # a stained nucleus, top left
    exp = cam.explain_array(img, "red")
    assert exp.cam.shape == (120, 160) and exp.cam.max() == pytest.approx(1.0)
    assert exp.cam[:, 100:].max() == 0.0 and exp.cam[100:, :].max() == 0.0  # outside the cell's window
    ys, xs = np.nonzero(exp.cam)
    assert xs.min() <= 40 <= xs.max() and ys.min() <= 40 <= ys.max()


def test_geometry_rbc_crop(tmp_path: Path) -> None:
    """rbc-crop's window is sized by the red cells: the map covers exactly that window."""
    from leuko.explain.gradcam import input_box

    cam = GradCAM(Predictor(crafted_run(tmp_path, preprocess=["rbc-crop:3"]), device="cpu"))
    img = np.empty((200, 200, 3), np.uint8)
    img[...] = (238, 222, 205)  # smear background
    yy, xx = np.mgrid[0:200, 0:200]
    for cx, cy in ((20, 20), (170, 30), (30, 170), (175, 175), (100, 180), (180, 100), (20, 100)):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < 12**2] = (222, 160, 165)  # red cells, 24 px across
    img[(xx - 90) ** 2 + (yy - 95) ** 2 < 22**2] = (200, 176, 218)  # cytoplasm
    img[(xx - 90) ** 2 + (yy - 95) ** 2 < 12**2] = (88, 46, 152)  # nucleus
    pre = cam.predictor.model_input.preprocess
    done = pre.run(np.asarray(Image.fromarray(img).resize((pre.decode_size,) * 2, Image.BILINEAR)))
    assert done.ruler is not None and done.window is not None
    x0, y0, x1, y1 = input_box(200, 200, pre, window=done.window)
    assert x1 - x0 == pytest.approx(3 * 24, rel=0.2)  # 3 red-cell diameters
    exp = cam.explain_array(img, "red")
    ys, xs = np.nonzero(exp.cam)
    assert xs.min() >= x0 - 2 and xs.max() <= x1 + 2 and ys.min() >= y0 - 2 and ys.max() <= y1 + 2
    assert xs.min() <= 90 <= xs.max() and ys.min() <= 95 <= ys.max()


def test_input_box_follows_the_window_the_preprocessing_cut() -> None:
    """rbc-crop's window depends on the red cells, not only on the cell: the box is the window
    ``Preprocess.run`` reports, mapped back from decoded to source pixels."""
    from leuko.data.preprocess import build_preprocess
    from leuko.explain.gradcam import input_box

    pre = build_preprocess(64, "rbc-crop")  # decoded at 128 x 128
    assert input_box(256, 512, pre, window=(10, 20, 50)) == pytest.approx((40.0, 40.0, 240.0, 140.0))
    assert input_box(256, 512, pre, fell_back=True) == pytest.approx((0.0, 0.0, 512.0, 256.0))


# --------------------------------------------------------------------------- the layer finder

EXPECTED_LAYER = {
    "alexnet": "features",
    "googlenet": "inception5b",
    "resnet50": "layer4",
    "vgg16": "features",
    "mobilenetv2": "bn2",
    "densenet201": "features",
    "inception_resnet_v2": "conv2d_7b",
    "efficientnet_b3": "bn2",
    "efficientnet_lite0": "bn2",
    "efficientnet_lite1": "bn2",
    "efficientnet_lite2": "bn2",
    "custom_cnn": "stages",
}


# Many-module graphs take seconds to build even on the meta device; their families
# (timm EfficientNet/DenseNet/Inception) are covered by the fast ones by default.
SLOW_GRAPHS = {"densenet201", "inception_resnet_v2", "efficientnet_b3", "efficientnet_lite1", "efficientnet_lite2"}
FINDER_CASES = [
    pytest.param(n, "linear", marks=pytest.mark.slow) if n in SLOW_GRAPHS else (n, "linear") for n in registered_names()
] + [(n, "dense128") for n in ("alexnet", "vgg16", "googlenet", "custom_cnn")]  # heads that restructure the model


@pytest.mark.parametrize(("name", "head"), FINDER_CASES)
def test_layer_finder_every_registered_model(name: str, head: str) -> None:
    # built on the meta device: every architecture's real module graph, shapes only, no memory or init time
    with torch.device("meta"):
        model = build_model(name, 3, pretrained="none", head=head)
    layer = find_target_layer(model, 128)
    assert layer == EXPECTED_LAYER[name]
    assert model.training  # build_model returns train mode; the finder restores it
    shapes: list[torch.Size] = []
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 128, 128, device="meta"))
    h.remove()
    assert len(shapes[-1]) == 4 and shapes[-1][-1] * shapes[-1][-2] > 1


def test_needs_a_pytorch_predictor() -> None:
    class OnnxLike:
        backend = "onnx"
        classes = CLASSES

    with pytest.raises(LeukoError, match="needs the PyTorch model"):
        GradCAM(OnnxLike())  # type: ignore[arg-type]


def test_layer_finder_rejects_models_without_maps() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    with pytest.raises(LeukoError, match="4-D"):
        find_target_layer(model, 16)


def _saved(tmp_path: Path, name: str, size: int) -> Path:
    model = build_model(name, 3, pretrained="none").eval()
    meta = {
        "model": {"name": name, "head": "linear", "dropout": None, "pretrained": "none"},
        "classes": CLASSES,
        "input": {"image_size": size, "resize": "stretch", "preprocess": [], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "temperature": 1.0,
    }
    run = tmp_path / name
    run.mkdir()
    save_model(run / "model.pt", model, ModelCard.from_meta(meta))
    return run


@pytest.mark.parametrize(
    "name", [n if n == "custom_cnn" else pytest.param(n, marks=pytest.mark.slow) for n in registered_names()]
)
def test_real_gradcam_every_registered_model(tmp_path: Path, name: str) -> None:
    """A real backward pass through each architecture (untrained weights) gives a map of the image's size.

    Building real weights takes seconds per model, so only custom_cnn runs by
    default (the trained-run tests cover EfficientNet-Lite0); ``-m slow`` runs all.
    """
    cam = GradCAM(Predictor(_saved(tmp_path, name, 128), device="cpu"))
    assert cam.layer == EXPECTED_LAYER[name]
    rng = np.random.default_rng(0)
    exp = cam.explain_array(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    assert exp.cam.shape == (70, 90)
    assert 0.0 <= exp.cam.min() and exp.cam.max() <= 1.0
    assert np.isfinite(exp.cam).all()


# --------------------------------------------------------------------------- pictures


def test_overlay_and_png(tmp_path: Path) -> None:
    img = np.full((20, 30, 3), 100, np.uint8)
    cam = np.zeros((20, 30), np.float32)
    cam[:, 15:] = 1.0
    np.testing.assert_array_equal(overlay(img, cam, alpha=0.0), img)
    full = overlay(img, cam, alpha=1.0)
    assert full.dtype == np.uint8 and full.shape == img.shape
    assert full[0, 0].tolist() == [0, 0, 128]  # jet(0): dark blue
    assert full[0, 29].tolist() == [128, 0, 0]  # jet(1): dark red
    with pytest.raises(LeukoError, match="shape"):
        overlay(img, cam[:, :10])

    run = crafted_run(tmp_path)
    exp = GradCAM(Predictor(run, device="cpu")).explain_array(red_image(64, 64, 0, 24))
    data = explanation_png(exp, out=tmp_path / "x.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "x.png").read_bytes() == data
    with Image.open(io.BytesIO(data)) as im:
        assert im.width > 200 and im.height > 100
    assert "predicted red (p = " in exp.title()


# --------------------------------------------------------------------------- the CLI


def test_cli_explain_writes_pngs_and_names_corrupt_file(
    frozen_run: Path, cells: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import leuko.cli

    monkeypatch.setattr(leuko.cli.console, "width", 400)  # whole paths on one line
    src = tmp_path / "imgs"
    for k, p in enumerate(sorted((cells / "lymphocyte").glob("*.png"))[:2]):
        (src / ("sub" if k else "")).mkdir(parents=True, exist_ok=True)
        (src / ("sub" if k else "") / "cell.png").write_bytes(p.read_bytes())  # two files, same name
    (src / "broken.png").write_bytes((cells / "lymphocyte" / "5.png").read_bytes()[:100])
    out = tmp_path / "cams"
    code = call(["explain", str(frozen_run), str(src), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["cell_gradcam-2.png", "cell_gradcam.png"]
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            im.load()
    assert "broken.png" in captured.err and "truncated" in captured.err
    assert str(out / "cell_gradcam.png") in captured.out and "lymphocyte (" in captured.out

    code = call(["explain", str(frozen_run), str(src), "--out", str(out), "--class", "neutrophil"])
    captured = capsys.readouterr()
    assert code == 0 and (out / "cell_gradcam_neutrophil.png").is_file()
    assert "p(neutrophil)" in captured.out

    code = call(["explain", str(frozen_run), str(src), "--out", str(out), "--class", "platelet"])
    captured = capsys.readouterr()
    assert code == 2 and "unknown class 'platelet'" in captured.err and "Traceback" not in captured.err


def test_gradcam_grid_figure(tmp_path: Path) -> None:
    from leuko.evaluate.figures import plot_gradcam_grid

    rng = np.random.default_rng(1)
    tall = rng.integers(0, 256, (90, 30, 3), dtype=np.uint8)
    items = [[tall, tall, tall] for _ in range(5)]
    one = plot_gradcam_grid(items[:1], ["a → b"], tmp_path / "one.png", panel_titles=["image", "p", "t"])
    two_cols = plot_gradcam_grid(items, [f"item {k}\nfile.png" for k in range(5)], tmp_path / "five.png", ncols=2)
    with Image.open(one) as a, Image.open(two_cols) as b:
        assert b.width > 1.8 * a.width  # two items per row
        assert b.height > 2.5 * a.height  # three rows
    buf = io.BytesIO()
    assert plot_gradcam_grid([], [], buf) is buf and buf.getvalue()[:4] == b"\x89PNG"
    with pytest.raises(LeukoError, match="titles"):
        plot_gradcam_grid(items, ["only one"], tmp_path / "x.png")
