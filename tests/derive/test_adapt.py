"""``leuko adapt`` (AdaBN): BatchNorm statistics move to the new lab's, weights stay, the run stays usable."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cells import make_cell, model_payload
from leuko.errors import LeukoError
from leuko.evaluate.run import evaluate_run
from leuko.infer.backends import ModelInput
from leuko.run.folder import load_model
from leuko.train import train
from leuko.derive.adapt import (
    adapt_batchnorm,
    adapt_run,
    balanced_draw,
    batchnorm_layers,
    pseudo_labels,
    source_class_counts,
    trained_batchnorm,
)
from leuko.run.folder import RunFolder
from cells import call

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]
TINY = [
    "model.name=custom_cnn",
    "model.pretrained=none",
    "data.image_size=32",
    "data.preprocess=[cell-crop]",
    "data.num_workers=0",
    "data.split=holdout-60-20-20",
    "model.freeze=backbone",  # the frozen-feature path: a run folder in seconds, no Lightning
    "train.epochs=5",
    "train.batch_size=8",
    "train.lr=0.01",
    "trainer.progress=false",
]
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on the shared 2-core machines an oversubscribed pool is many times slower
    (see tests/models/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(run, source data, new lab)``: a tiny trained run and a darker, bluer "other lab" of the same classes."""
    base = tmp_path_factory.mktemp("adapt")
    src, new = base / "src", base / "newlab"
    for ci, cls in enumerate(CLASSES):
        for i in range(16):
            make_cell(src / cls / f"{i}.png", size=(40, 40), seed=100 * ci + i, hue=60 * ci)
            p = make_cell(new / cls / f"{i}.png", size=(40, 40), seed=5000 + 100 * ci + i, hue=60 * ci)
            im = np.asarray(Image.open(p)).astype(np.float32) * [0.6, 0.7, 0.9] + [0, 10, 40]
            Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(p)
    mp = pytest.MonkeyPatch()
    mp.setenv("LEUKO_CACHE_DIR", str(base / "cache"))
    train(None, base / "run", overrides=TINY, data_path=src, echo=lambda s: None)
    evaluate_run(base / "run", figures=False, echo=lambda s: None)  # in-lab numbers: RUN/eval/test
    yield base / "run", src, new
    mp.undo()


def first_bn_input_stats(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of what the first BatchNorm layer receives (independent of any BN statistics)."""
    name, bn = batchnorm_layers(model)[0]
    seen: list[torch.Tensor] = []
    h = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    a = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1)
    return a.mean(1), a.var(1)


def test_adapt_moves_batchnorm_statistics_and_keeps_weights(lab: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run, _, new = lab
    out = tmp_path / "adapted"
    # the tiny run froze its backbone (ImageNet-style statistics everywhere): adapt all layers
    res = adapt_run(run, new, out, layout="folder", layers="all", batch_size=12, balance=False, echo=lambda s: None)
    assert res.n_images == 48 and res.n_layers == len(batchnorm_layers(load_model(run)[0])) > 0
    before = model_payload(run / "model.pt")
    after = model_payload(out / "model.pt")
    assert after["adapted"]["method"] == "adabn" and after["adapted"]["n_images"] == 48
    assert after["adapted"]["data"] == str(new.resolve()) and after["adapted"]["date"]
    assert "before adaptation" in after["review"]["chosen_on"]
    assert after["classes"] == before["classes"] and after["input"] == before["input"]
    changed = 0
    for key, w in before["state_dict"].items():
        if key.endswith(BN_STATS):
            changed += int(not torch.equal(w, after["state_dict"][key]))
        else:
            assert torch.equal(w, after["state_dict"][key]), f"{key} changed"
    assert changed >= 2 * res.n_layers  # mean and var of every layer (counters too)
    # the first layer's statistics are now the new lab's (same preprocessing as inference)
    model, meta = load_model(run)
    mi = ModelInput.from_meta(meta.input.model_dump())
    files = sorted(new.rglob("*.png"))
    x = torch.from_numpy(np.stack([mi.from_array(np.asarray(Image.open(p).convert("RGB"))) for p in files]))
    mean_new, var_new = first_bn_input_stats(model, x)
    name = batchnorm_layers(model)[0][0]
    src_mean, src_var = before["state_dict"][f"{name}.running_mean"], before["state_dict"][f"{name}.running_var"]
    ad_mean, ad_var = after["state_dict"][f"{name}.running_mean"], after["state_dict"][f"{name}.running_var"]
    assert torch.allclose(ad_mean, mean_new, atol=1e-4, rtol=1e-3)  # equal batches: the average is the overall mean
    assert (ad_mean - mean_new).abs().sum() < 0.01 * (src_mean - mean_new).abs().sum()
    assert (ad_var - var_new).abs().sum() < 0.5 * (src_var - var_new).abs().sum()
    for name in ("config.yaml", "classes.json", "split.json", "data.json"):
        assert (out / name).read_bytes() == (run / name).read_bytes()
    assert json.loads((out / "adapt.json").read_text())["n_images"] == 48

    # the adapted run evaluates like any run; the side-by-side shows the source's held-out numbers
    inlab = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    m = evaluate_run(out, data=new, layout="folder", figures=False, echo=lambda s: None)
    assert m["n"] == 48 and m["in_lab"] is None  # the adapted run was never evaluated on its own test split
    m_src = evaluate_run(run, data=new, layout="folder", figures=False, echo=lambda s: None)
    assert m_src["in_lab"]["accuracy"] == pytest.approx(inlab["accuracy"]) and m_src["in_lab"]["n"] == inlab["n"]
    crop = m_src["data"]["cell_crop"]  # the run crops around cells: every image is accounted for
    assert crop["found"] + len(crop["fell_back"]) == 48


def test_balanced_draw_gives_each_predicted_class_its_source_share() -> None:
    rng = np.random.default_rng(0)
    pseudo = np.array([2] * 60 + [0] * 30 + [1] * 10)  # a neutrophil-heavy lab
    drawn = pseudo[balanced_draw(pseudo, [1, 1, 2], 40_000, rng)]
    assert np.bincount(drawn, minlength=3) / len(drawn) == pytest.approx([0.25, 0.25, 0.5], abs=0.01)
    # a class the model never predicts in the new lab cannot be represented: the others share its part
    pseudo = np.array([2] * 70 + [0] * 30)
    drawn = pseudo[balanced_draw(pseudo, [1, 1, 2], 30_000, rng)]
    assert np.bincount(drawn, minlength=3) / len(drawn) == pytest.approx([1 / 3, 0, 2 / 3], abs=0.01)
    with pytest.raises(LeukoError, match="non-negative"):
        balanced_draw(pseudo, [0, 0, 0], 10, rng)
    with pytest.raises(LeukoError, match="index the 2 model classes"):
        balanced_draw(pseudo, [1, 1], 10, rng)


def test_balanced_adapt_averages_the_class_balanced_resample(lab: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The default: statistics of the resample :func:`balanced_draw` makes from the unadapted model's predictions."""
    run, _, new = lab
    skewed = tmp_path / "skewed"  # 16 + 16 + 48 cells: one class three times as common as in training
    shutil.copytree(new, skewed)
    for k in (1, 2):
        for p in sorted((new / "neutrophil").glob("*.png")):
            shutil.copy(p, skewed / "neutrophil" / f"copy{k}-{p.name}")
    lines: list[str] = []
    res = adapt_run(run, skewed, tmp_path / "ad", layout="folder", layers="all", batch_size=16, echo=lines.append)
    info = json.loads((tmp_path / "ad" / "adapt.json").read_text())["balance"]
    model, meta = load_model(run)
    assert sum(info["predicted"].values()) == 80 and info["draws"] == res.n_images == 80
    assert info["source_train"] == json.loads((run / "data.json").read_text())["counts"]["train"]
    assert any(line.startswith("new lab's predicted classes") for line in lines)
    # replay the draw: the adapted first layer holds the mean of exactly those images
    from leuko.data import load_dataset

    samples = list(load_dataset(skewed, "folder").samples)
    mi = ModelInput.from_meta(meta.input.model_dump())
    pseudo, readable = pseudo_labels(model, samples, mi, 16, {})
    assert readable == list(range(80))
    chosen = balanced_draw(pseudo, source_class_counts(RunFolder.open(run), meta.classes), 80, np.random.default_rng(0))
    x = torch.from_numpy(np.stack([mi.from_sample(samples[i]) for i in chosen]))
    mean_drawn, _ = first_bn_input_stats(model, x)
    name = batchnorm_layers(model)[0][0]
    adapted = model_payload(tmp_path / "ad" / "model.pt")["state_dict"][f"{name}.running_mean"]
    assert torch.allclose(adapted, mean_drawn, atol=1e-4, rtol=1e-3)


def test_adapt_and_evaluate_cli(lab: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _, new = lab
    out = tmp_path / "ad"
    assert call(["adapt", str(run), "--data", str(new), "--out", str(out), "--batch-size", "12", "--layers", "all"]) == 0
    text = capsys.readouterr().out
    assert "BatchNorm layers re-estimated on 48 images" in text and (out / "model.pt").is_file()
    # a lab with two blank frames among its cells: they are classified from the whole frame and named
    lab2 = tmp_path / "lab2"
    shutil.copytree(new, lab2)
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 228, np.uint8)).save(lab2 / "neutrophil" / f"blank{i}.png")
    assert call(["evaluate", str(run), "--data", str(lab2), "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "in-lab vs new lab" in text and "held-out test" in text
    assert "cell-crop found no cell in" in text and "blank0.png" in text and "blank1.png" in text
    fell = json.loads((tmp_path / "ev" / "metrics.json").read_text())["data"]["cell_crop"]["fell_back"]
    assert {str(lab2 / "neutrophil" / f"blank{i}.png") for i in range(2)} <= set(fell)
    few = tmp_path / "few"
    for i in range(3):
        make_cell(few / f"{i}.png", size=(32, 32), seed=i)
    cases = [
        (["adapt", str(run), "--data", str(new), "--out", str(out)], "already exists"),
        (["adapt", str(run), "--data", str(new), "--out", str(tmp_path / "o0")], "no BatchNorm layer of run was trained"),
        (["adapt", str(run), "--data", str(new), "--out", str(tmp_path / "o5"), "--layers", "some"], "--layers must be"),
        (["adapt", str(run), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")], "no such file or folder"),
        (["adapt", str(tmp_path), "--data", str(new), "--out", str(tmp_path / "o2")], "is not a leuko run folder"),
        (["adapt", str(run), "--data", str(few), "--out", str(tmp_path / "o3"), "--layers", "all"], "needs at least 16 images"),
        (["adapt", str(run), "--data", str(new), "--out", str(tmp_path / "o4"), "--batch-size", "1"], "batch size must be"),
    ]
    for argv, message in cases:
        assert call(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
        assert "Traceback" not in err[0]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_adapting_every_layer_of_a_frozen_statistics_model_warns(lab: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A freeze: bn model learnt everything with ImageNet's statistics: --layers all is allowed but said to be risky."""
    run, _, new = lab
    bn_run = tmp_path / "bn-run"
    shutil.copytree(run, bn_run)
    cfg = bn_run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("freeze: backbone", "freeze: bn"))
    lines: list[str] = []
    adapt_run(bn_run, new, tmp_path / "ad", layers="all", batch_size=12, echo=lines.append)
    assert any(line.startswith("warning:") and "freeze=bn" in line for line in lines), lines
    lines.clear()
    adapt_run(run, new, tmp_path / "ad2", layers="all", batch_size=12, echo=lines.append)
    assert not any(line.startswith("warning:") for line in lines)


def test_only_trained_batchnorm_layers_are_adapted_by_default() -> None:
    from leuko.models import build_model

    model = build_model("custom_cnn", num_classes=3, pretrained="none")
    every = [n for n, _ in batchnorm_layers(model)]
    assert trained_batchnorm(model, "none") == every
    assert trained_batchnorm(model, "backbone") == [] == trained_batchnorm(model, "bn")
    last = trained_batchnorm(model, "last:1")
    assert 0 < len(last) < len(every) and last == every[-len(last) :]  # the output end of the network
    assert all(m.weight.requires_grad for _, m in batchnorm_layers(model))  # freeze hooks removed again
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 32, 32) * 3 + 2
    assert adapt_batchnorm(model, lambda: [x[:4], x[4:]], layers=last) == 8
    after = model.state_dict()
    for name in every:
        moved = not torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"])
        assert moved == (name in last), name
    with pytest.raises(LeukoError, match="no BatchNorm layer named"):
        adapt_batchnorm(model, lambda: [x], layers=["nope"])


def test_adapt_needs_batchnorm() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(LeukoError, match="no BatchNorm layer"):
        adapt_batchnorm(model, lambda: [torch.zeros(2, 3, 8, 8)])


def test_confident_selection_keeps_the_surest_share_of_each_predicted_class() -> None:
    from leuko.derive.adapt import confident_selection

    probs = np.array([
        [0.90, 0.05, 0.05],  # class 0, surest
        [0.60, 0.30, 0.10],  # class 0
        [0.50, 0.40, 0.10],  # class 0, least sure
        [0.10, 0.20, 0.70],  # class 2 ... but class 2 is excluded below: becomes class 1 (0.2 vs 0.1)
        [0.05, 0.15, 0.80],  # likewise: class 1 after excluding 2
        [0.20, 0.70, 0.10],  # class 1, surest of its class
    ])
    idx, labels = confident_selection(probs, 0.5, allowed=[0, 1])
    # class 0: 3 predicted -> round(1.5) = 2 kept (rows 0, 1); class 1: rows 3, 4, 5 -> 2 kept: 5 (0.875) and 4 (0.75)
    assert idx.tolist() == [0, 1, 4, 5] and labels.tolist() == [0, 0, 1, 1]
    idx, labels = confident_selection(probs, 0.01)  # every predicted class keeps at least one
    assert sorted(set(labels.tolist())) == [0, 1, 2] and len(idx) == 3
    with pytest.raises(LeukoError, match="keep"):
        confident_selection(probs, 0.0)


def test_self_training_draws_classes_by_the_square_root_of_their_size() -> None:
    """Two pseudo-labels of a rare class must not be drawn as often as a hundred of the majority."""
    from leuko.derive.adapt import draw_weights

    labels = np.array([0] * 2 + [1] * 18 + [2] * 98)
    w = draw_weights(labels)
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()
    share = np.array([w[labels == c].sum() for c in range(3)])
    assert share == pytest.approx(np.sqrt([2, 18, 98]) / np.sqrt([2, 18, 98]).sum())  # about 0.09, 0.28, 0.63
    assert share[0] < 0.1 < 1 / 3  # equal drawing would give the 2 images a third of all draws
    assert np.allclose([w[labels == c].std() for c in range(3)], 0.0)  # images of a class alike
    assert draw_weights(labels, power=0.0)[labels == 0].sum() == pytest.approx(1 / 3)
    assert draw_weights(labels, power=1.0)[labels == 0].sum() == pytest.approx(2 / 118)


def test_self_train_fine_tunes_what_trained_and_never_an_excluded_class(lab: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run, _, new = lab
    cmap = tmp_path / "no-neutrophil.yaml"
    cmap.write_text("exclude: [neutrophil]\n")
    out = tmp_path / "st"
    lines: list[str] = []
    res = adapt_run(run, new, out, layout="folder", method="self-train", class_map=cmap, epochs=2, keep=0.5, echo=lines.append)
    meta = model_payload(out / "model.pt")
    info = meta["adapted"]
    assert info["method"] == "self-train" and info["excluded_classes"] == ["neutrophil"] and info["n_images"] == 48
    assert set(info["kept"]) <= {"eosinophil", "lymphocyte"} and 20 <= sum(info["kept"].values()) <= 28  # half of 48
    assert info["steps"] == 2 * int(np.ceil(sum(info["kept"].values()) / 8))  # batch = the run's batch size (8)
    assert any(line.startswith("pseudo-labels kept per class:") and "excluded: neutrophil" in line for line in lines)
    before, after = model_payload(run / "model.pt")["state_dict"], meta["state_dict"]
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # the tiny run froze its backbone: only the head trains here too, and it does move
    assert moved and all(k.startswith(("head", "fc", "classifier")) for k in moved), sorted(moved)[:5]
    assert json.loads((out / "adapt.json").read_text())["method"] == "self-train"
    metrics = evaluate_run(out, data=new, layout="folder", figures=False, echo=lambda s: None)
    assert metrics["n"] == 48
    with pytest.raises(LeukoError, match="options of --method self-train"):
        adapt_run(run, new, tmp_path / "x", layout="folder", keep=0.5, echo=lambda s: None)
    with pytest.raises(LeukoError, match="--keep must be"):
        adapt_run(run, new, tmp_path / "y", layout="folder", method="self-train", keep=1.5, echo=lambda s: None)
    with pytest.raises(LeukoError, match="--device must be cpu or cuda"):
        adapt_run(run, new, tmp_path / "d", layout="folder", method="self-train", device="tpu", echo=lambda s: None)
    if not torch.cuda.is_available():
        with pytest.raises(LeukoError, match="no CUDA GPU"):
            adapt_run(run, new, tmp_path / "d", layout="folder", method="self-train", device="cuda", echo=lambda s: None)
    assert not (tmp_path / "d").exists()  # nothing written for a refused device
    with pytest.raises(LeukoError, match="does not have"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("exclude: [platelet]\n")
        adapt_run(run, new, tmp_path / "z", layout="folder", method="self-train", class_map=bad, echo=lambda s: None)
