"""The bundled ImageNet weights give useful features on real blood-cell images.

A linear probe on frozen EfficientNet-Lite0 features of a fixed sample of the
shared PBC images (30 per class, 8 classes) must be far better than the same
probe on a randomly initialised Lite0. A wrong key mapping, a wrong
normalisation or silently random weights all land near the random baseline.

Protocol and why: the model's own eval transform (shorter side to
size/crop_pct, bicubic, centre crop) at 288 px - EfficientNets accept any
size, and at the default 224 px a cell is only ~70 px wide, which costs the
ImageNet features more than the random ones. Logistic regression, 5-fold
stratified CV. Measured while writing this test over 10 random 30-per-class
samples: bundled 0.74-0.82, random weights 0.35-0.44, gap >= 0.34; the
thresholds below leave margin under those ranges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leuko.models import ModelInfo, build_model, model_info

PER_CLASS = 30
SIZE = 288
MIN_BUNDLED_ACC = 0.72
MIN_GAP = 0.25


def _sample(pbc: Path) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(0)
    files: list[Path] = []
    labels: list[int] = []
    classes = sorted(p for p in pbc.iterdir() if p.is_dir())
    assert len(classes) == 8
    for idx, cls in enumerate(classes):
        # skips neutrophil/.DS_169665.jpg, a macOS metadata file with a .jpg name
        candidates = sorted(f for f in cls.glob("*.jpg") if not f.name.startswith("."))
        picked = rng.choice(len(candidates), PER_CLASS, replace=False)
        files += [candidates[i] for i in sorted(picked)]
        labels += [idx] * PER_CLASS
    return files, np.array(labels)


def _batch(files: list[Path], info: ModelInfo) -> torch.Tensor:
    """The model's eval transform with PIL only (leuko.models must not need leuko.data)."""
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[info.interpolation]
    scaled = int(round(SIZE / info.crop_pct))
    arrays = []
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            im = im.resize((scaled, round(h * scaled / w)) if w <= h else (round(w * scaled / h), scaled), resample)
            left, top = (im.width - SIZE) // 2, (im.height - SIZE) // 2
            arrays.append(np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32) / 255)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _features(pretrained: str, x: torch.Tensor) -> np.ndarray:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 0, pretrained=pretrained).eval()
    # channels_last: oneDNN's depthwise convolutions run ~2x faster on CPU in NHWC
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return torch.cat([model(chunk) for chunk in x.split(40)]).numpy()


def _probe_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from threadpoolctl import threadpool_limits

    # one BLAS/OpenMP thread: on a shared 2-core machine more threads make lbfgs ~25x slower
    with threadpool_limits(1):
        scores = cross_val_score(
            LogisticRegression(max_iter=3000), features, labels, cv=StratifiedKFold(5, shuffle=True, random_state=0)
        )
    return float(scores.mean())


@pytest.mark.shared
def test_bundled_lite0_features_separate_pbc_classes_far_better_than_random(shared_datasets: Path) -> None:
    pbc = shared_datasets / "pbc"
    if not pbc.is_dir():
        pytest.skip(f"needs {pbc}")
    files, labels = _sample(pbc)
    x = _batch(files, model_info("efficientnet_lite0"))
    bundled = _probe_accuracy(_features("bundled", x), labels)
    random_init = _probe_accuracy(_features("none", x), labels)
    print(f"\nPBC linear probe, {PER_CLASS}/class, {SIZE}px: bundled {bundled:.3f}, random weights {random_init:.3f}")
    assert bundled >= MIN_BUNDLED_ACC, f"bundled {bundled:.3f} (random weights {random_init:.3f})"
    assert bundled - random_init >= MIN_GAP, f"bundled {bundled:.3f} vs random weights {random_init:.3f}"
