"""Every study config in configs/ runs end to end (shrunk) on a generated tree of its dataset's layout.

The configs keep the studies' values; here they are shrunk with ``--set`` (no ImageNet weights offline, 64 px,
one epoch) so the protocol — layout, classes, split, head, optimiser, grid, tables — is exercised in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cells import make_cell
from leuko.errors import LeukoError
from leuko.studies.grid import compare, cross_validate, load_grid
from leuko.train import load_config, train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHRINK = ["model.pretrained=none", "data.image_size=64", "train.epochs=1", "data.num_workers=0", "trainer.progress=false"]
MOONEY = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("studies")
    mooney = base / "mooney" / "dataset2-master" / "images"
    for si, (split, n) in enumerate([("TRAIN", 10), ("TEST", 5), ("TEST_SIMPLE", 1)]):
        for ci, cls in enumerate(MOONEY):
            for i in range(n):
                make_cell(mooney / split / cls / f"_{i}_{1000 + i}.jpeg", size=(80, 60), seed=si * 100 + ci * 10 + i, hue=40 * ci, fmt="JPEG")
    pbc = base / "pbc" / "PBC_dataset_normal_DIB"
    for ci, cls in enumerate(["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "platelet"]):
        for i in range(10):
            make_cell(pbc / cls / f"X_{ci}{i}.jpg", size=(72, 72), seed=ci * 50 + i, hue=45 * ci)
    cnmc = base / "cnmc" / "C-NMC_Leukemia" / "training_data"
    k = 0
    for fold in range(2):
        for cls, subjects in (("all", [f"{fold * 3 + s}" for s in (1, 2, 3)]), ("hem", [f"H{fold * 3 + s}" for s in (1, 2, 3)])):
            for subj in subjects:
                for img in range(3):
                    k += 1
                    make_cell(cnmc / f"fold_{fold}" / cls / f"UID_{subj}_{img}_1_{cls}.bmp", size=(64, 64), seed=k, hue=0 if cls == "all" else 90, fmt="BMP")
    return {"mooney": base / "mooney", "pbc": base / "pbc", "cnmc": base / "cnmc"}


@pytest.mark.parametrize(
    "config, dataset, only, n_classes",
    [
        ("study-transfer4", "mooney", ["alexnet"], 4),
        ("study-densenet-irv2-custom", "mooney", ["custom_cnn_s1_split-holdout-80-10-10", "custom_cnn_s1_split-source"], 4),
        ("study-efficientnet-b3-all", "cnmc", ["epochs-10_batch_size-16"], 2),
    ],
)
def test_study_grids_run_and_write_their_tables(trees: dict[str, Path], tmp_path: Path, config: str, dataset: str, only: list[str], n_classes: int) -> None:
    spec, cells = load_grid(CONFIGS / f"{config}.yaml")
    assert {c.name for c in cells} >= set(only)
    res = compare(CONFIGS / f"{config}.yaml", tmp_path / "out", overrides=SHRINK, data_path=trees[dataset], only=only, echo=lambda s: None)
    table = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert list(table["cell"]) == only
    assert {"accuracy", "precision", "recall", "f1", "train_time_min"} <= set(table.columns)
    assert (tmp_path / "out" / "compare.md").is_file() and (tmp_path / "out" / "compare.png").is_file()
    for name in only:
        m = json.loads((tmp_path / "out" / name / "eval" / "test" / "metrics.json").read_text())
        assert len(m["classes"]) == n_classes
        cfg = load_config(tmp_path / "out" / name / "config.yaml")
        study = next(c for c in cells if c.name == name).config
        # The study's protocol survives the shrink: optimiser, lr, batch, head and split are the config's.
        assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size, cfg.model.head, cfg.data.split) == (
            study.train.optimizer, study.train.lr, study.train.batch_size, study.model.head, study.data.split)
    if config == "study-densenet-irv2-custom":
        counts = {r["cell"]: r["n_test"] for _, r in table.iterrows()}
        assert counts["custom_cnn_s1_split-source"] == 20  # train on TRAIN, test on all of TEST
    if config == "study-efficientnet-b3-all":
        split = json.loads((tmp_path / "out" / only[0] / "split.json").read_text())
        roles: dict[str, set[str]] = {}
        for key, role in split["assignments"].items():
            roles.setdefault(key.split("UID_")[1].split("_")[0], set()).add(role)
        assert all(len(r) == 1 for r in roles.values()), "a subject straddles the split"


def test_study_mobilenetv2_and_kfold_configs_run(trees: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "study-mobilenetv2.yaml", SHRINK)
    assert cfg.model.head == "dense128" and cfg.train.optimizer == "adam" and cfg.train.epochs == 1
    res = train(cfg, tmp_path / "mnv2", data_path=trees["pbc"], echo=lambda s: None)
    classes = json.loads((tmp_path / "mnv2" / "classes.json").read_text())
    assert classes == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]  # platelet left out
    assert res.path == "features"  # frozen base, no augmentation: the fast path
    kfold = load_config(CONFIGS / "study-custom-cnn-kfold.yaml", [*SHRINK, "data.image_size=32"])
    out = cross_validate(kfold, tmp_path / "cv", 3, data_path=trees["mooney"], echo=lambda s: None)
    assert len(out["folds"]) == 3 and sum(r["n_test"] for r in out["folds"]) == 60  # every TRAIN+TEST image once


def test_studies_need_imagenet_weights_offline(trees: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LeukoError, match="pretrained='imagenet'.*offline choices"):
        compare(CONFIGS / "study-transfer4.yaml", tmp_path / "out", overrides=["trainer.progress=false"],
                data_path=trees["mooney"], only=["resnet50"], echo=lambda s: None)
    assert not (tmp_path / "out" / "resnet50").exists()


def test_a_grid_given_to_train_names_the_verb_that_reads_it(tmp_path: Path) -> None:
    """`leuko train configs/study-transfer4.yaml` is what a user types first: one line pointing to `leuko compare`."""
    from cells import call

    grid = CONFIGS / "study-transfer4.yaml"
    with pytest.raises(LeukoError, match="comparison grid .* run it with 'leuko compare"):
        load_config(grid)
    assert call(["train", str(grid), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    assert load_config(CONFIGS / "study-mobilenetv2.yaml").model.name == "mobilenetv2"  # a run config still loads
