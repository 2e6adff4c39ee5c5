"""Figures: each function writes a sensible PNG and leaks no figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leuko.errors import LeukoError
from leuko.evaluate import compute_metrics, softmax
from leuko.evaluate import figures as F

CLASSES = [
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature granulocyte (MY, MMY, PMY)",
    "lymphocyte",
    "monocyte",
    "neutrophil (segmented and band)",
    "platelet",
]


@pytest.fixture(autouse=True)
def low_dpi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render at half resolution to keep the suite fast; test_full_resolution_size checks the real DPI."""
    monkeypatch.setattr(F, "DPI", 60)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(CLASSES), 300)
    logits = rng.normal(size=(300, len(CLASSES)))
    logits[np.arange(300), y] += 2.5
    return y, softmax(logits * 2)


def check_png(path: Path, min_side: int = 200, max_side: int = 5000) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert min_side <= w <= max_side and min_side <= h <= max_side
    return w, h


def test_full_resolution_size(tmp_path: Path, data: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "DPI", 120)
    y, p = data
    cm = compute_metrics(y, p, CLASSES, n_bootstrap=0)["confusion_matrix"]
    w, h = check_png(F.plot_confusion_matrix(cm, CLASSES, tmp_path / "cm.png"), min_side=800, max_side=2000)
    assert 0.7 < w / h < 1.5


def test_confusion_matrix_counts_and_normalised(tmp_path: Path, data: tuple) -> None:
    y, p = data
    cm = compute_metrics(y, p, CLASSES, n_bootstrap=0)["confusion_matrix"]
    out = F.plot_confusion_matrix(cm, CLASSES, tmp_path / "deep" / "dir" / "cm.png")
    check_png(out)
    cm_zero_row = np.array(cm)
    cm_zero_row[0] = 0  # a class without images must not break normalisation
    check_png(F.plot_confusion_matrix(cm_zero_row, CLASSES, tmp_path / "cm_norm.png", normalize=True, title="T"))
    with pytest.raises(LeukoError, match="square"):
        F.plot_confusion_matrix([[1, 2, 3]], ["a"], tmp_path / "bad.png")


def test_training_curves_from_lightning_csv_and_frame(tmp_path: Path) -> None:
    rows = []
    for e in range(5):  # Lightning CSVLogger: train and val rows separate, other columns empty
        rows.append({"epoch": e, "step": 10 * e + 9, "train_loss": 1 / (e + 1), "train_acc": 0.5 + e / 10})
        rows.append({"epoch": e, "step": 10 * e + 9, "val_loss": 1.2 / (e + 1), "val_acc": 0.45 + e / 10})
    csv = tmp_path / "run" / "metrics.csv"
    csv.parent.mkdir()
    pd.DataFrame(rows).to_csv(csv, index=False)
    check_png(F.plot_training_curves(csv, tmp_path / "curves.png"))
    train_only = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.0, 0.7, 0.5], "train_acc": [0.5, 0.6, 0.7]})
    check_png(F.plot_training_curves(train_only, tmp_path / "curves_train_only.png"))
    nan_val = train_only.assign(val_loss=np.nan, val_acc=np.nan)
    check_png(F.plot_training_curves(nan_val, tmp_path / "curves_nan_val.png"))
    with pytest.raises(LeukoError, match="epoch"):
        F.plot_training_curves(pd.DataFrame({"loss": [1.0]}), tmp_path / "x.png")
    with pytest.raises(LeukoError, match="does not exist"):
        F.plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")


def test_per_class_bars(tmp_path: Path, data: tuple) -> None:
    y, p = data
    m = compute_metrics(y, p, CLASSES, n_bootstrap=0)
    check_png(F.plot_per_class_bars(m, tmp_path / "bars.png"))
    with pytest.raises(LeukoError, match="per_class"):
        F.plot_per_class_bars({}, tmp_path / "x.png")


def test_roc_curves(tmp_path: Path, data: tuple) -> None:
    y, p = data
    y_missing = np.where(y == 7, 0, y)  # platelet absent: listed in the legend, no curve
    check_png(F.plot_roc_curves(y_missing, p, CLASSES, tmp_path / "roc.png"))


def test_reliability(tmp_path: Path, data: tuple) -> None:
    y, p = data
    w1, _ = check_png(F.plot_reliability(p, y, tmp_path / "rel.png", "Test set"))
    after = softmax(np.log(p), temperature=1.7)
    w2, _ = check_png(F.plot_reliability(p, y, tmp_path / "rel2.png", probs_after=after, temperature=1.7))
    assert w2 > w1  # two panels


def test_misclassified_gallery(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    images.append(rng.random((40, 50)))  # grey float image
    titles = [f"true: {CLASSES[i % 8]}\npred: {CLASSES[(i + 3) % 8]} 0.{90 + i}" for i in range(9)]
    check_png(F.plot_misclassified_gallery(images, titles, tmp_path / "gallery.png", ncols=4))
    check_png(F.plot_misclassified_gallery([], [], tmp_path / "empty.png"), min_side=50)
    with pytest.raises(LeukoError, match="titles"):
        F.plot_misclassified_gallery(images, titles[:2], tmp_path / "x.png")


def test_compare_bars(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "model": ["mobilenetv2", "efficientnet_b0", "resnet50"],
            "accuracy": [0.951, 0.962, 0.948],
            "accuracy_std": [0.01, 0.008, 0.012],
            "macro_f1": [0.94, 0.955, 0.939],
            "macro_f1_std": [0.011, 0.009, 0.01],
        }
    )
    check_png(F.plot_compare_bars(table, ["accuracy", "macro_f1"], tmp_path / "compare.png"))
    check_png(F.plot_compare_bars(table.set_index("model"), ["accuracy"], tmp_path / "compare_idx"))
    assert (tmp_path / "compare_idx.png").is_file()  # suffix added when missing
    with pytest.raises(LeukoError, match="no column"):
        F.plot_compare_bars(table, ["auc"], tmp_path / "x.png")


def test_no_pyplot_figures_leak(tmp_path: Path, data: tuple) -> None:
    from matplotlib._pylab_helpers import Gcf  # pyplot's registry of open figures

    y, p = data
    before = Gcf.get_num_fig_managers()
    m = compute_metrics(y, p, CLASSES, n_bootstrap=0)
    F.plot_per_class_bars(m, tmp_path / "b.png")
    assert Gcf.get_num_fig_managers() == before
