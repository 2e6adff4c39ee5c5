"""``leuko evaluate`` on a trained run: files agree with each other, class maps, another lab's data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cells import make_cell
from leuko.errors import LeukoError
from leuko.data.classmap import ClassMap
from leuko.evaluate.run import evaluate_run
from leuko.train import train
from cells import call

CLASSES = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
TINY = [
    "model.name=custom_cnn",
    "model.pretrained=none",
    "data.image_size=32",
    "data.num_workers=0",
    "data.split=holdout-60-20-20",
    "train.epochs=3",
    "train.batch_size=8",
    "train.lr=0.01",
    "trainer.progress=false",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("evalrun")
    root = base / "cells"
    for ci, cls in enumerate(CLASSES):
        for i in range(20):
            make_cell(root / cls / f"{i}.png", size=(48, 48), seed=1000 * ci + i, hue=60 * ci)
    mp = pytest.MonkeyPatch()
    mp.setenv("LEUKO_CACHE_DIR", str(base / "cache"))
    train(None, base / "run", overrides=TINY, data_path=root, echo=lambda s: None)
    yield base / "run"
    mp.undo()


def test_evaluate_files_agree(tiny_run: Path, tmp_path: Path) -> None:
    m = evaluate_run(tiny_run, out=tmp_path / "ev", echo=lambda s: None)
    out = tmp_path / "ev"
    saved = json.loads((out / "metrics.json").read_text())
    frame = pd.read_csv(out / "predictions.csv")
    n = len(frame)
    assert n == saved["n"] == m["data"]["n_images"] == 16  # the 20% test part of 80 images
    # accuracy recomputed from predictions.csv equals metrics.json
    assert (frame["true"] == frame["pred"]).mean() == pytest.approx(saved["accuracy"], abs=1e-12)
    probs = frame[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.abs(probs.sum(axis=1) - 1).max() < 1e-5
    assert (np.array(CLASSES)[probs.argmax(1)] == frame["pred"]).all()
    cm = np.array(saved["confusion_matrix"])
    assert cm.sum() == n and cm.trace() == (frame["true"] == frame["pred"]).sum()
    assert [cm[i].sum() for i in range(4)] == [int((frame["true"] == c).sum()) for c in CLASSES]  # rows = true class
    for key in ("balanced_accuracy", "macro_f1", "weighted_f1", "ece", "roc_auc_ovr", "ci95", "per_class"):
        assert key in saved, key
    lo, hi = saved["ci95"]["accuracy"]
    assert lo <= saved["accuracy"] <= hi
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "training_curves.png", "reliability.png"):
        assert (out / name).stat().st_size > 500, name
    epochs = pd.read_csv(out / "epochs.csv")
    assert list(epochs["epoch"]) == [1, 2, 3] and {"train_acc", "val_acc", "train_loss", "val_loss"} <= set(epochs.columns)
    assert "| epoch |" in (out / "epochs.md").read_text()
    report = (out / "report.txt").read_text()
    assert "macro avg" in report and "weighted avg" in report and all(c in report for c in CLASSES)
    # the review policy's view of these images: the flagged share is the share below the threshold
    # (energy aside), and the accepted accuracy is recomputed from predictions.csv
    rv = saved["review"]
    from leuko.infer.load import load_predictor
    from leuko.infer.review import ReviewPolicy

    policy = load_predictor(tiny_run).review_policy
    assert rv["policy"] == policy.describe()
    low = frame["confidence"] < policy.threshold
    assert rv["low_confidence"] == pytest.approx(low.mean(), abs=1e-9)
    assert max(rv["low_confidence"], rv["unlike_training"]) <= rv["flagged"] <= rv["low_confidence"] + rv["unlike_training"] + 1e-9
    if rv["unlike_training"] == 0.0 and (~low).any():  # then accepted = confident, checkable from the CSV
        correct = frame["true"] == frame["pred"]
        assert rv["flagged"] == pytest.approx(low.mean()) and rv["accepted_accuracy"] == pytest.approx(correct[~low].mean())


def test_tta_evaluation_has_its_own_folder_and_in_lab_numbers(tiny_run: Path, tmp_path: Path) -> None:
    """``--tta`` writes ``RUN/eval/test-tta``: the plain evaluation's numbers stay, and another lab's
    side-by-side takes the in-lab numbers made the same way (falling back to the other kind)."""
    import shutil

    plain = evaluate_run(tiny_run, figures=False, echo=lambda s: None)
    before = (tiny_run / "eval" / "test" / "metrics.json").read_bytes()
    tta = evaluate_run(tiny_run, tta=True, figures=False, echo=lambda s: None)
    assert Path(plain["out_dir"]) == tiny_run / "eval" / "test" and Path(tta["out_dir"]) == tiny_run / "eval" / "test-tta"
    assert (tiny_run / "eval" / "test" / "metrics.json").read_bytes() == before
    saved = json.loads((tiny_run / "eval" / "test-tta" / "metrics.json").read_text())
    assert saved["tta"] is True and saved["n"] == plain["n"] == 16
    lab = tmp_path / "lab"  # the same cells in another folder: "another lab" to evaluate_run
    shutil.copytree(tiny_run.parent / "cells", lab)
    for with_tta, ref in ((True, saved), (False, plain)):
        m = evaluate_run(tiny_run, data=lab, tta=with_tta, figures=False, echo=lambda s: None)
        assert Path(m["out_dir"]).name == ("lab-test-tta" if with_tta else "lab-test")
        assert m["in_lab"]["tta"] is with_tta and m["in_lab"]["accuracy"] == pytest.approx(ref["accuracy"])
    shutil.rmtree(tiny_run / "eval" / "test-tta")  # only the plain one left: it is the fallback
    m = evaluate_run(tiny_run, data=lab, tta=True, out=tmp_path / "ev", figures=False, echo=lambda s: None)
    assert m["in_lab"]["tta"] is False and m["in_lab"]["accuracy"] == pytest.approx(plain["accuracy"])


def test_class_map_merges_and_excludes_on_another_label_set(tiny_run: Path, tmp_path: Path) -> None:
    # Another "lab": only granulocytes vs lymphocytes, with a model trained on 4 classes.
    lab = tmp_path / "lab"
    for cls, hue, n in (("granulocyte", 180, 6), ("lymphocyte", 60, 5)):
        for i in range(n):
            make_cell(lab / cls / f"{i}.png", size=(48, 48), seed=77 + i + hue, hue=hue)
    cmap = tmp_path / "map.yaml"
    cmap.write_text("merge: {neutrophil: granulocyte, eosinophil: granulocyte}\nexclude: [monocyte]\n")
    m = evaluate_run(tiny_run, data=lab, out=tmp_path / "ev", class_map=cmap, figures=False, echo=lambda s: None)
    assert m["classes"] == ["granulocyte", "lymphocyte"] and m["n"] == 11
    assert np.array(m["confusion_matrix"]).sum() == 11
    notes = " ".join(m["class_map"]["notes"])
    assert "'neutrophil' merged into 'granulocyte'" in notes and "'monocyte' excluded" in notes
    frame = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert list(frame.columns[-2:]) == ["p_granulocyte", "p_lymphocyte"]
    assert np.allclose(frame[["p_granulocyte", "p_lymphocyte"]].sum(axis=1), 1.0, atol=1e-6)
    # Target classes the model lacks are an error, through the CLI too.
    with pytest.raises(LeukoError, match="classes the model cannot predict"):
        evaluate_run(tiny_run, data=lab, out=tmp_path / "ev2", figures=False, echo=lambda s: None)
    assert call(["evaluate", str(tiny_run), "--data", str(lab), "--out", str(tmp_path / "ev3")]) == 2


def test_label_map_reads_the_data_labels_as_the_run_classes(tiny_run: Path, tmp_path: Path) -> None:
    # A lab with finer labels than the run (an eight-class lab scored by a five-type model): "band" cells are
    # neutrophils, "ig" and "platelet" have no class in the run and are dropped, counted in metrics.json.
    lab = tmp_path / "lab"
    counts = {"eosinophil": 3, "lymphocyte": 3, "monocyte": 2, "neutrophil": 2, "band": 2, "ig": 4, "platelet": 1}
    for ci, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            make_cell(lab / cls / f"{i}.png", size=(48, 48), seed=500 + 10 * ci + i, hue=40 * ci)
    lmap = tmp_path / "labels.yaml"
    lmap.write_text("merge: {band: neutrophil}\nexclude: [ig, platelet]\n")
    m = evaluate_run(tiny_run, data=lab, out=tmp_path / "ev", label_map=lmap, figures=False, echo=lambda s: None)
    assert m["classes"] == CLASSES and m["n"] == 3 + 3 + 2 + 2 + 2
    assert m["label_map"]["dropped"] == {"ig": 4, "platelet": 1}
    frame = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert (frame["true"] == "neutrophil").sum() == 4 and not frame["path"].str.contains("/ig/").any()
    # Bad maps and misuse: one-line errors, exit 2.
    half = tmp_path / "half.yaml"
    half.write_text("merge: {band: neutrophil}\nexclude: [platelet]\n")
    with pytest.raises(LeukoError, match=r"label\(s\) \['ig'\] outside the classes"):
        evaluate_run(tiny_run, data=lab, out=tmp_path / "ev2", label_map=half, figures=False, echo=lambda s: None)
    with pytest.raises(LeukoError, match="--label-map is for another dataset"):
        evaluate_run(tiny_run, out=tmp_path / "ev3", label_map=lmap, figures=False, echo=lambda s: None)
    assert call(["evaluate", str(tiny_run), "--data", str(lab), "--label-map", "no-such-map", "--out", str(tmp_path / "ev4")]) == 2
    assert call(["evaluate", str(tiny_run), "--data", str(lab), "--label-map", str(lmap), "--out", str(tmp_path / "ev5")]) == 0
    assert json.loads((tmp_path / "ev5" / "metrics.json").read_text())["n"] == 12


def test_shipped_class_map_by_name_and_by_its_older_name() -> None:
    for name in ("pbc-to-five", "pbc-to-bccd"):
        cm = ClassMap.load(name)
        assert cm.merge == {"ig": "neutrophil"} and sorted(cm.exclude) == ["erythroblast", "platelet"]
    # Training or testing on PBC's own cells beside five-type labs: immature granulocytes are dropped, not renamed.
    mature = ClassMap.load("pbc-to-five-mature")
    pbc8 = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    five = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    labels = mature.label_map(pbc8, five, where="pbc")
    assert labels["ig"] is None and labels["erythroblast"] is None and labels["platelet"] is None
    assert {k: v for k, v in labels.items() if v is not None} == {c: c for c in five}
    assert ClassMap.load("pbc-to-five").label_map(pbc8, five)["ig"] == "neutrophil"
    with pytest.raises(LeukoError, match="shipped maps: pbc-to-bccd, pbc-to-five, pbc-to-five-mature"):
        ClassMap.load("no-such-map")


@pytest.mark.shared
def test_pbc_model_on_bccd_crops_reports_five_classes(shared_datasets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PBC-trained run evaluates on another lab's BCCD crops through the shipped class map."""
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "pbc"
    train(None, run, overrides=[
        "model.name=efficientnet_lite0", "model.freeze=backbone", "data.per_class=40", "data.image_size=128",
        "data.preprocess=[center-crop:0.6]", "train.epochs=30", "train.lr=0.003", "train.batch_size=64",
        "trainer.progress=false",
    ], data_path=shared_datasets / "pbc", echo=lambda s: None)
    m = evaluate_run(run, data=shared_datasets / "bccd", layout="bccd", class_map="pbc-to-bccd", out=tmp_path / "bccd", echo=lambda s: None)
    assert m["classes"] == sorted(["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"])
    assert m["n"] == 356 and np.array(m["confusion_matrix"]).sum() == 356
    assert set(m["per_class"]) == set(m["classes"])
    assert any("'ig' merged into 'neutrophil'" in n for n in m["class_map"]["notes"])
    frame = pd.read_csv(tmp_path / "bccd" / "predictions.csv")
    assert len(frame) == 356 and (frame["true"] == frame["pred"]).mean() == pytest.approx(m["accuracy"])
    # No accuracy bar here: a plain PBC model is near chance on BCCD (domain shift); pbc-robust is scored in benchmarks.
