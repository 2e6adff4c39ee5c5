"""Several labs at once (``data.sources``): config, label maps, per-source splits, balancing, leave-one-lab-out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cells import TINY_CLASSES, call, make_cell

from leuko.errors import LeukoError
from leuko.run.config import CLASS_SETS, config_from_dict, load_config
from leuko.run.data import prepare_data, source_weights
from leuko.studies.grid import lab_cells, lab_scores

CLASSES = list(TINY_CLASSES)  # eosinophil, lymphocyte, neutrophil
TINY = [
    "model.name=custom_cnn",
    "model.pretrained=none",
    "model.freeze=backbone",
    "data.image_size=32",
    "data.num_workers=0",
    "train.epochs=3",
    "train.batch_size=16",
    "train.lr=0.01",
    "trainer.progress=false",
]
"""custom_cnn with a frozen backbone: features once, the head in a second (the feature fast path)."""


def _cells(root: Path, label: str, n: int, seed: int, lab_shade: int, names: str = "{i}.png") -> list[Path]:
    hue = {"eosinophil": 0, "lymphocyte": 70, "neutrophil": 140, "ig": 150, "platelet": 200}[label]
    bg = (230 - lab_shade, 200, 205 + lab_shade // 2)
    return [make_cell(root / label / names.format(i=i), size=(40, 40), seed=seed + i, hue=hue, background=bg) for i in range(n)]


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four sources of three labs under one folder.

    alpha: folder layout with two extra labels (ig: merged into neutrophil, platelet: excluded) by a class map;
    beta: a CSV manifest whose cells come in groups of two (smear fields); copies: augmented copies of beta's
    cells (lab beta, train only, as Mooney is for BCCD); gamma: a small folder lab.
    """
    base = tmp_path_factory.mktemp("labs")
    alpha = base / "alpha"
    for ci, c in enumerate(CLASSES):
        _cells(alpha, c, 12, 100 * ci, 0)
    _cells(alpha, "ig", 4, 900, 0)
    _cells(alpha, "platelet", 3, 950, 0)
    (base / "alpha-to-three.yaml").write_text("merge: {ig: neutrophil}\nexclude: [platelet]\n")
    beta = base / "beta"
    lines = ["path,label,group"]
    for ci, c in enumerate(CLASSES):
        for i, p in enumerate(_cells(beta / "imgs", c, 8, 2000 + 100 * ci, 40)):
            lines.append(f"{p.relative_to(beta).as_posix()},{c},field{ci}-{i // 2}")
    (beta / "manifest.csv").write_text("\n".join(lines) + "\n")
    copies = base / "copies"
    for ci, c in enumerate(CLASSES):
        _cells(copies, c, 4, 3000 + 100 * ci, 40, names="_{i}_77.png")
    gamma = base / "gamma"
    for ci, c in enumerate(CLASSES):
        _cells(gamma, c, 6, 4000 + 100 * ci, 80)
    return {"base": base, "alpha": alpha, "beta": beta / "manifest.csv", "copies": copies, "gamma": gamma}


def _data(labs: dict[str, Path], **extra) -> dict:
    return {
        "sources": [
            {"path": str(labs["alpha"]), "layout": "folder", "class_map": str(labs["base"] / "alpha-to-three.yaml")},
            {"path": str(labs["beta"]), "layout": "csv", "name": "beta"},
            {"path": str(labs["copies"]), "layout": "folder", "lab": "beta", "train_only": True},
            {"path": str(labs["gamma"]), "layout": "folder"},
        ],
        "classes": CLASSES,
        **extra,
    }


def _prepare(labs: dict[str, Path], **extra):
    cfg = config_from_dict({"data": _data(labs, **extra)})
    return prepare_data(cfg.data, seed=0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "data, message",
    [
        ({"sources": [{"path": "a", "lyout": "folder"}], "classes": "five"}, "unknown key 'data.sources.0.lyout'"),
        ({"sources": [{"layout": "folder"}], "classes": "five"}, "data.sources.0.path: Field required"),
        ({"sources": [{"path": "a"}]}, "data.sources needs data.classes"),
        ({"sources": [{"path": "a"}], "classes": "six"}, "data.classes: must be a list of class names or one of five, pbc8"),
        ({"sources": [{"path": "a"}], "classes": "five", "path": "b"}, "data.path cannot be combined with data.sources"),
        ({"sources": [{"path": "a"}], "classes": "five", "dataset": "bccd"}, "data.dataset cannot be combined with data.sources"),
        ({"sources": [{"path": "a"}], "classes": "five", "layout_options": {"margin": 0.2}}, "data.layout_options cannot be combined"),
        ({"sources": [{"path": "x/a"}, {"path": "y/a"}], "classes": "five"}, "two sources are named 'a'"),
        ({"sources": [{"path": "a", "lab": "b c"}], "classes": "five"}, "data.sources.0.lab: must be letters"),
        ({"sources": [{"path": "a"}, {"path": "b"}], "classes": "five", "leave_out": "c"}, "data.leave_out: no lab named 'c'; labs: a, b"),
        ({"sources": [{"path": "a"}, {"path": "b", "train_only": True}], "classes": "five", "leave_out": "b"}, "has only train_only sources"),
        ({"sources": [{"path": "a"}, {"path": "b"}], "classes": "five", "leave_out": "a", "split": "kfold-3"}, "cannot be combined with a K-fold"),
        ({"leave_out": "a"}, "data.leave_out needs data.sources"),
        ({"sources": []}, "data.sources must list at least one dataset"),
    ],
)
def test_bad_source_configs(data: dict, message: str) -> None:
    with pytest.raises(LeukoError) as exc:
        config_from_dict({"data": data})
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_config_names_class_sets_labs_and_sampler() -> None:
    cfg = config_from_dict({"data": {"sources": [{"path": "d/pbc"}, {"path": "d/mooney", "lab": "bccd"}, {"path": "d/bccd"}],
                                     "classes": "five"}, "train": {"sampler": "sources"}})
    assert cfg.data.classes == CLASS_SETS["five"] == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert cfg.data.labs() == ["pbc", "bccd"]
    assert [s.source_name for s in cfg.data.sources] == ["pbc", "mooney", "bccd"]
    assert config_from_dict({"data": {"classes": "pbc8"}}).data.classes == CLASS_SETS["pbc8"]
    with pytest.raises(LeukoError, match="train.sampler: sources needs data.sources"):
        config_from_dict({"train": {"sampler": "sources"}})
    with pytest.raises(LeukoError, match="train.source_balance"):
        config_from_dict({"data": cfg.data.model_dump(), "train": {"source_balance": 2}})


def test_the_multi_lab_recipe_validates() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "multi-lab.yaml")
    assert cfg.data.labs() == ["pbc", "bccd", "lisc"]
    assert cfg.data.classes == CLASS_SETS["five"]
    assert [s.train_only for s in cfg.data.sources] == [False, False, True, False]
    assert cfg.train.sampler == "sources" and cfg.model.freeze == "bn"
    assert cfg.data.sources[0].class_map == "pbc-to-five-mature"  # PBC's immature granulocytes are not neutrophils


# --------------------------------------------------------------------------- loading and splitting


def test_labels_mapped_per_source_and_exclusions_counted(labs: dict[str, Path]) -> None:
    data = _prepare(labs, split="holdout-60-20-20")
    assert data.index.layout == "sources" and data.classes == CLASSES
    assert data.index.root == labs["base"].resolve()
    every = data.train + data.val + data.test
    assert Counter(s.source for s in every) == {"alpha": 36 + 4, "beta": 24 + 12, "gamma": 18}
    alpha = [s for s in every if s.source == "alpha"]
    assert sum(s.label == "neutrophil" for s in alpha) == 12 + 4  # ig merged into neutrophil
    assert {s.label for s in every} == set(CLASSES)  # platelet excluded
    summary = data.summary()
    by_name = {s["name"]: s for s in summary["sources"]}
    assert by_name["alpha"]["dropped"] == {"platelet": 3} and by_name["alpha"]["images"] == 40
    assert by_name["copies"]["lab"] == "beta" and by_name["copies"]["roles"] == {"train": 12, "val": 0, "test": 0}
    assert any("alpha: class map excludes platelet (3)" in n for n in data.index.notes)


def test_unmapped_labels_are_an_error_naming_the_source(labs: dict[str, Path]) -> None:
    raw = _data(labs)
    raw["sources"][0].pop("class_map")
    with pytest.raises(LeukoError, match=r"source 'alpha' has label\(s\) \['ig', 'platelet'\] outside the classes"):
        prepare_data(config_from_dict({"data": raw}).data, seed=0)
    raw["sources"][0]["class_map"] = "pbc-to-five"
    with pytest.raises(LeukoError, match="class map for source 'alpha' names \\['erythroblast'\\]"):
        prepare_data(config_from_dict({"data": raw}).data, seed=0)
    with pytest.raises(LeukoError, match="--data cannot be used with data.sources"):
        prepare_data(config_from_dict({"data": _data(labs)}).data, seed=0, data_path=labs["alpha"])


def test_splits_are_made_within_each_source_and_keep_groups(labs: dict[str, Path], tmp_path: Path) -> None:
    data = _prepare(labs, split="holdout-60-20-20")
    roles = {"train": data.train, "val": data.val, "test": data.test}
    for lab, n in (("alpha", 40), ("beta", 24), ("gamma", 18)):
        for role, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            got = [s for s in roles[role] if s.source == lab and "copies" not in str(s.path)]
            assert abs(len(got) - frac * n) <= 3, (lab, role, len(got))
            assert {s.label for s in got} == set(CLASSES), (lab, role)  # every class of every source in every role
    where: dict[str, set[str]] = {}
    for role, items in roles.items():
        for s in items:
            if s.group is not None:
                where.setdefault(s.group, set()).add(role)
    assert where and all(len(r) == 1 for r in where.values())  # no smear field straddles roles
    copies = [s for s in data.index.samples if "copies" in str(s.path)]
    assert len(copies) == 12 and all(s in data.train for s in copies) and {s.source for s in copies} == {"beta"}
    assert any("copies: train_only" in n and "judge beta by leaving it out" in n for n in data.split.notes)
    # saved and applied again: the same roles, keys relative to the folder the sources share
    path = data.split.save(tmp_path / "split.json")
    assert all(k.split("/")[0] in ("alpha", "beta", "copies", "gamma") for k in data.split.assignments)
    again = prepare_data(config_from_dict({"data": _data(labs)}).data, seed=5, split_file=path)
    assert [s.key for s in again.test] == [s.key for s in data.test] and [s.key for s in again.train] == [s.key for s in data.train]
    assert [s.key for s in _prepare(labs, split="holdout-60-20-20").test] == [s.key for s in data.test]  # seeded


def test_kfold_per_source(labs: dict[str, Path]) -> None:
    tests = [{s.key for s in _prepare(labs, split="kfold-3", fold=k).test} for k in range(3)]
    assert sum(map(len, tests)) == 40 + 24 + 18 and len(set().union(*tests)) == 40 + 24 + 18
    data = _prepare(labs, split="kfold-3", fold=1)
    assert {s.source for s in data.test} == {"alpha", "beta", "gamma"} and data.split.preset == "kfold-3[fold 1]"
    with pytest.raises(LeukoError, match="set data.fold"):
        _prepare(labs, split="kfold-3")


def test_leave_one_lab_out_tests_on_all_of_the_lab(labs: dict[str, Path]) -> None:
    data = _prepare(labs, leave_out="beta", val_fraction=0.25)
    assert {s.source for s in data.test} == {"beta"} and len(data.test) == 24  # the manifest's cells, not the copies
    assert not any("copies" in str(s.path) for s in data.train + data.val + data.test)
    assert {s.source for s in data.train} == {s.source for s in data.val} == {"alpha", "gamma"}
    assert abs(len(data.val) - 0.25 * (40 + 18)) <= 3
    assert data.split.preset == "leave-out-beta"
    alpha_out = _prepare(labs, leave_out="alpha")
    assert {s.source for s in alpha_out.test} == {"alpha"} and len(alpha_out.test) == 40
    assert sum("copies" in str(s.path) for s in alpha_out.train) == 12  # another lab's copies still train


def test_forgetting_is_measured_on_the_source_labs_not_the_left_out_one(labs: dict[str, Path]) -> None:
    """Fine-tuning a leave-one-lab-out run on the lab it left out must not score 'forgetting' on that very lab."""
    from leuko.derive.finetune import source_heldout

    cfg = config_from_dict({"data": _data(labs, leave_out="beta", val_fraction=0.25)})
    held = source_heldout(cfg, prepare_data(cfg.data, seed=0))
    assert held and {s.source for s in held} == {"alpha", "gamma"}
    plain = config_from_dict({"data": _data(labs)})
    data = prepare_data(plain.data, seed=0)
    assert source_heldout(plain, data) == list(data.test)


def test_source_weights_balance_classes_then_labs() -> None:
    from leuko.data.samples import Sample

    spec = {("a", "pbc"): 60, ("a", "lisc"): 5, ("b", "pbc"): 30, ("b", "lisc"): 10, ("b", "bccd"): 20}
    samples = [Sample(Path(f"{c}{lab}{i}.png"), c, source=lab) for (c, lab), n in spec.items() for i in range(n)]
    w = source_weights(samples)
    assert w.mean() == pytest.approx(1.0)
    mass: Counter = Counter()
    for s, wi in zip(samples, w):
        mass[(s.label, s.source)] += wi
    assert mass[("a", "pbc")] == pytest.approx(mass[("a", "lisc")])  # labs equal within a class
    assert mass[("b", "pbc")] == pytest.approx(mass[("b", "bccd")]) == pytest.approx(mass[("b", "lisc")])
    assert mass[("a", "pbc")] + mass[("a", "lisc")] == pytest.approx(sum(v for k, v in mass.items() if k[0] == "b"))
    flat = source_weights(samples, power=0.0)  # labs in proportion to their cells: plain class balance
    assert flat[0] == pytest.approx(flat[64]) and flat[0] == pytest.approx(len(samples) / (2 * 65))
    half = source_weights(samples, power=0.5)
    m_pbc = 60 * half[0]
    m_lisc = 5 * half[60]
    assert m_pbc / m_lisc == pytest.approx(np.sqrt(60 / 5))
    plain = source_weights(samples, power=0.0, class_power=0.0)  # neither balanced: every image alike
    assert plain == pytest.approx(np.ones(len(samples)))
    root = source_weights(samples, power=1.0, class_power=0.5)  # classes by the square root of their cells
    mass_a = sum(wi for s, wi in zip(samples, root) if s.label == "a")
    mass_b = sum(wi for s, wi in zip(samples, root) if s.label == "b")
    assert mass_a / mass_b == pytest.approx(np.sqrt(65 / 60))
    assert root.mean() == pytest.approx(1.0)
    assert 60 * root[0] == pytest.approx(5 * root[60])  # labs still equal within the class


# --------------------------------------------------------------------------- leave-one-lab-out


def test_sampler_weights_are_one_home_for_both_training_paths(labs: dict[str, Path]) -> None:
    """The DataLoader path and the cached-features path draw by the same weights: balanced is sklearn's
    n / (C * count_c) (exactly what seeded runs drew before), sources is source_weights, shuffle is None."""
    from leuko.run.config import TrainConfig
    from leuko.run.data import sampler_weights
    from leuko.train.lightning_fit import class_weights_for

    data = _prepare(labs)
    c2i = {c: i for i, c in enumerate(data.classes)}
    y = [c2i[s.label] for s in data.train]
    balanced = sampler_weights(TrainConfig(sampler="balanced"), data.train, y, len(data.classes))
    old = class_weights_for(y, len(data.classes))[np.asarray(y)].double().numpy()
    assert np.array_equal(balanced, old)
    per_class = Counter()
    for s, w in zip(data.train, balanced):
        per_class[s.label] += w
    assert np.allclose(list(per_class.values()), len(y) / len(per_class))  # every class the same share
    tc = TrainConfig(sampler="sources", source_balance=0.5, class_balance=0.5)
    assert np.array_equal(sampler_weights(tc, data.train, y, len(data.classes)), source_weights(data.train, 0.5, 0.5))
    assert sampler_weights(TrainConfig(), data.train, y, len(data.classes)) is None


def test_lab_cells_are_planned_one_per_testable_lab(labs: dict[str, Path]) -> None:
    cfg = config_from_dict({"data": _data(labs)}, TINY)
    cells = lab_cells(cfg)
    assert [c.name for c in cells] == ["without-alpha", "without-beta", "without-gamma"]
    assert [c.config.data.leave_out for c in cells] == ["alpha", "beta", "gamma"]
    assert all(c.config.model.name == "custom_cnn" for c in cells)
    with pytest.raises(LeukoError, match="needs a config with data.sources"):
        lab_cells(config_from_dict({}))
    with pytest.raises(LeukoError, match="already leaves out lab 'beta'"):
        lab_cells(config_from_dict({"data": _data(labs, leave_out="beta")}))
    one = {"data": {"sources": [{"path": str(labs["alpha"])}], "classes": CLASSES}}
    with pytest.raises(LeukoError, match="at least two labs"):
        lab_cells(config_from_dict(one))


def test_lab_scores_match_the_metrics(tmp_path: Path) -> None:
    from leuko.evaluate.metrics import compute_metrics

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(30, int), np.full(4, 2)]
    pred = np.where(rng.random(y.size) < 0.8, y, rng.integers(0, 3, y.size))
    names = np.array(CLASSES)
    pd.DataFrame({"path": range(y.size), "true": names[y], "pred": names[pred]}).to_csv(tmp_path / "p.csv", index=False)
    s = lab_scores(tmp_path / "p.csv", CLASSES, n_bootstrap=200)
    probs = np.eye(3)[pred] * 0.9 + 0.05
    m = compute_metrics(y, probs / probs.sum(1, keepdims=True), CLASSES, n_bootstrap=0)
    assert s["accuracy"] == pytest.approx(m["accuracy"]) and s["balanced_accuracy"] == pytest.approx(m["balanced_accuracy"])
    assert s["macro_f1_common"] == pytest.approx(m["small_classes"]["macro_f1_common"])
    assert s["common_classes"] == "eosinophil, lymphocyte" and s["n_test"] == 74
    for k in ("accuracy", "macro_f1_common", "balanced_accuracy"):
        assert s[f"{k}_lo"] <= s[k] <= s[f"{k}_hi"]


@pytest.fixture(scope="module")
def lolo_run(labs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("lolo")
    cfg = {"name": "tiny-multi", "data": _data(labs), "train": {"sampler": "sources"}}
    (base / "multi.yaml").write_text(yaml.safe_dump(cfg))
    out = base / "out"
    argv = ["cv", str(base / "multi.yaml"), "--leave-one-lab-out", "--out", str(out), *[x for s in TINY for x in ("--set", s)]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKO_CACHE_DIR", str(base / "cache"))
        mp.setattr("leuko.evaluate.run._figures", lambda *a, **k: None)  # PNGs are most of an evaluation's seconds
        code = call(argv)
        again = call(argv)  # resumes: every cell done earlier
    return {"out": out, "code": code, "again": again, "argv": argv, "base": base}


def test_leave_one_lab_out_end_to_end(lolo_run: dict) -> None:
    out = lolo_run["out"]
    assert lolo_run["code"] == 0 and lolo_run["again"] == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kind"] == "lolo" and sorted(plan["cells"]) == ["without-alpha", "without-beta", "without-gamma"]
    table = pd.read_csv(out / "lolo.csv")
    assert list(table["lab"]) == ["alpha", "beta", "gamma", "mean", "worst"]
    assert list(table["n_test"][:3]) == [40, 24, 18]
    for col in ("accuracy", "accuracy_lo", "accuracy_hi", "macro_f1_common", "balanced_accuracy_hi"):
        assert table[col][:3].notna().all(), col
    assert table[["accuracy", "macro_f1_common", "balanced_accuracy"]].notna().all().all()
    assert table["accuracy"][3] == pytest.approx(table["accuracy"][:3].mean())
    assert table["accuracy"][4] == pytest.approx(table["accuracy"][:3].min())
    md = (out / "lolo.md").read_text()
    assert "Lab left out" in md and "Macro-F1, classes >= 10 cells (95% CI)" in md and "| worst |" in md
    assert (out / "lolo.png").is_file() and json.loads((out / "lolo.json").read_text())["summary"]["mean"]
    preds = pd.read_csv(out / "without-beta" / "eval" / "test" / "predictions.csv")
    assert set(preds["source"]) == {"beta"} and len(preds) == 24
    split = json.loads((out / "without-beta" / "split.json").read_text())
    assert {k.split("/")[0] for k, r in split["assignments"].items() if r == "test"} == {"beta"}
    assert not any(k.startswith("copies/") for k in split["assignments"])
    cfg = yaml.safe_load((out / "without-beta" / "config.yaml").read_text())
    assert all(Path(s["path"]).is_absolute() for s in cfg["data"]["sources"])  # evaluates from any folder
    data = json.loads((out / "without-gamma" / "data.json").read_text())
    assert {s["name"]: s["roles"]["test"] for s in data["sources"]} == {"alpha": 0, "beta": 0, "copies": 0, "gamma": 18}


def test_evaluate_breaks_metrics_down_by_source(lolo_run: dict, labs: dict[str, Path]) -> None:
    from leuko.evaluate.run import evaluate_run
    from leuko.train import train

    run = lolo_run["base"] / "all-labs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKO_CACHE_DIR", str(lolo_run["base"] / "cache"))
        cfg = config_from_dict({"data": _data(labs, split="holdout-50-20-30")}, TINY)
        train(cfg, run, echo=lambda s: None)
        lines: list[str] = []
        m = evaluate_run(run, figures=False, echo=lines.append)
    assert sorted(m["by_source"]) == ["alpha", "beta", "gamma"]
    preds = pd.read_csv(Path(m["out_dir"]) / "predictions.csv")
    assert list(preds.columns[:3]) == ["path", "source", "true"]
    for lab, row in m["by_source"].items():
        part = preds[preds["source"] == lab]
        assert row["n"] == len(part) and row["accuracy"] == pytest.approx(float((part["true"] == part["pred"]).mean()))
        assert set(row) >= {"balanced_accuracy", "macro_f1", "macro_f1_common", "ci95", "per_class_recall"}
    assert sum(r["n"] for r in m["by_source"].values()) == m["n"]
    assert any(line.strip().startswith("beta:") for line in lines)


def test_a_comparison_grid_ranks_recipes_lab_by_lab(labs: dict[str, Path], lolo_run: dict) -> None:
    from leuko.studies.grid import compare

    base = lolo_run["base"]
    grid = base / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "tiny-lolo", "base": {"data": _data(labs)}, "set": TINY,
                                    "cells": {"plain": {"train.sampler": "none"}, "short": {"train.sampler": "none", "train.epochs": 1}},
                                    "leave_one_lab_out": True}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKO_CACHE_DIR", str(base / "cache"))
        mp.setattr("leuko.evaluate.run._figures", lambda *a, **k: None)
        res = compare(grid, base / "grid-out", echo=lambda s: None)
    row, short = res["rows"]
    assert row["cell"] == "plain" and row["n_test"] == 40 + 24 + 18 and "d_accuracy" not in row
    # the second cell against the first, paired on the same cells: the mean of the labs' differences
    assert short["d_accuracy"] == pytest.approx(short["accuracy"] - row["accuracy"])
    assert short["d_accuracy_lo"] <= short["d_accuracy"] <= short["d_accuracy_hi"]
    assert row["worst_accuracy"] == pytest.approx(min(row[f"accuracy_{lab}"] for lab in ("alpha", "beta", "gamma")))
    assert row["accuracy"] == pytest.approx(np.mean([row[f"accuracy_{lab}"] for lab in ("alpha", "beta", "gamma")]))
    assert json.loads((base / "grid-out" / "plan.json").read_text())["kind"] == "compare-lolo"
    assert (base / "grid-out" / "plain" / "without-gamma" / "eval" / "test" / "predictions.csv").is_file()


def _preds(path: Path, y: np.ndarray, pred: np.ndarray, order: np.ndarray | None = None) -> Path:
    names = np.array(CLASSES)
    frame = pd.DataFrame({"path": [f"c{i}.png" for i in range(y.size)], "true": names[y], "pred": names[pred]})
    (frame if order is None else frame.iloc[order]).to_csv(path, index=False)
    return path


def test_paired_lab_scores_are_the_difference_on_the_same_cells(tmp_path: Path) -> None:
    from leuko.studies.labscores import mean_difference, paired_lab_scores

    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(120, int), np.ones(60, int), np.full(20, 2)]
    base = np.where(rng.random(y.size) < 0.7, y, (y + 1) % 3)
    better = base.copy()
    wrong = np.flatnonzero(base != y)
    better[wrong[:10]] = y[wrong[:10]]  # 10 more cells right (+5 points), none lost
    a = _preds(tmp_path / "a.csv", y, better)
    b = _preds(tmp_path / "b.csv", y, base, order=rng.permutation(y.size))  # another order: matched by path
    row, draws = paired_lab_scores(a, b, CLASSES, n_bootstrap=300)
    assert row["n_test"] == 200 and row["only_this_right"] == 10 and row["only_baseline_right"] == 0
    assert row["d_accuracy"] == pytest.approx(10 / 200)
    sa, sb = lab_scores(a, CLASSES, n_bootstrap=0), lab_scores(b, CLASSES, n_bootstrap=0)
    for m in ("accuracy", "macro_f1_common", "balanced_accuracy"):
        assert row[f"d_{m}"] == pytest.approx(sa[m] - sb[m])
        assert row[f"d_{m}_lo"] <= row[f"d_{m}"] <= row[f"d_{m}_hi"]
    # paired: every resample has the better model ahead, although the two separate intervals overlap
    assert row["d_accuracy_lo"] > 0 and draws.shape == (300, 3)
    sa, sb = lab_scores(a, CLASSES, n_bootstrap=300), lab_scores(b, CLASSES, n_bootstrap=300)
    assert sa["accuracy_lo"] < sb["accuracy_hi"]
    same, _ = paired_lab_scores(b, b, CLASSES, n_bootstrap=50)
    assert same["d_accuracy"] == same["d_accuracy_lo"] == same["d_accuracy_hi"] == 0
    mean = mean_difference([row, same], [draws, np.zeros((50, 3))])
    assert mean["d_accuracy"] == pytest.approx(10 / 400) and mean["only_this_right"] == 10
    assert 0 < mean["d_accuracy_lo"] <= mean["d_accuracy"] <= mean["d_accuracy_hi"]


def test_a_paired_comparison_refuses_different_cells(tmp_path: Path) -> None:
    from leuko.studies.labscores import paired_lab_scores

    y = np.r_[np.zeros(12, int), np.ones(12, int)]
    a = _preds(tmp_path / "a.csv", y, y)
    fewer = _preds(tmp_path / "fewer.csv", y[:20], y[:20])
    relabelled = _preds(tmp_path / "relabelled.csv", 1 - y, y)
    with pytest.raises(LeukoError, match="not tested on the same cells .24 and 20, 20 in common"):
        paired_lab_scores(a, fewer, CLASSES)
    with pytest.raises(LeukoError, match="different true labels"):
        paired_lab_scores(a, relabelled, CLASSES)
    with pytest.raises(LeukoError, match="no predictions at"):
        paired_lab_scores(a, tmp_path / "absent.csv", CLASSES)


def test_cv_against_another_lolo_folder_writes_the_paired_table(lolo_run: dict, tmp_path: Path) -> None:
    import shutil

    out = lolo_run["out"]
    other = tmp_path / "other-recipe"
    shutil.copytree(out, other)
    preds_path = other / "without-beta" / "eval" / "test" / "predictions.csv"
    preds = pd.read_csv(preds_path)
    right = np.flatnonzero(preds["true"] == preds["pred"])[:3]
    preds.loc[right, "pred"] = [next(c for c in CLASSES if c != t) for t in preds.loc[right, "true"]]
    preds.to_csv(preds_path, index=False)  # the "baseline" gets 3 of beta's cells wrong that ours gets right
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKO_CACHE_DIR", str(lolo_run["base"] / "cache"))
        assert call([*lolo_run["argv"], "--against", str(other)]) == 0  # every cell done: only the comparison
    table = pd.read_csv(out / "vs-other-recipe.csv").set_index("lab")
    assert list(table.index) == ["alpha", "beta", "gamma", "mean"]
    assert table.loc["beta", "d_accuracy"] == pytest.approx(3 / 24) and table.loc["beta", "only_this_right"] == 3
    assert table.loc["alpha", "d_accuracy"] == 0 and table.loc["gamma", "only_baseline_right"] == 0
    assert table.loc["mean", "d_accuracy"] == pytest.approx(3 / 24 / 3)
    assert "Δ accuracy (paired 95% CI)" in (out / "vs-other-recipe.md").read_text()
    assert call([*lolo_run["argv"], "--against", str(tmp_path / "nowhere")]) == 2
    assert call(["cv", lolo_run["argv"][1], "--against", str(other)]) == 2


@contextlib.contextmanager
def _in_lolo_cache(lolo_run: dict) -> Iterator[None]:
    """The lolo fixture's decoded-image cache, and no PNGs (most of an evaluation's seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKO_CACHE_DIR", str(lolo_run["base"] / "cache"))
        mp.setattr("leuko.evaluate.run._figures", lambda *a, **k: None)
        yield


def _lolo_argv(lolo_run: dict, out: Path) -> list[str]:
    """The lolo fixture's command (config and tiny --set overrides) into another --out."""
    return ["cv", lolo_run["argv"][1], "--leave-one-lab-out", "--out", str(out), *lolo_run["argv"][5:]]


def test_cv_only_leaves_out_the_labs_named(lolo_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "seed1"
    argv = _lolo_argv(lolo_run, out)
    with _in_lolo_cache(lolo_run):
        assert call([*argv, "--only", "delta"]) == 2  # not a lab of the config: refused before training
        assert not out.exists()
        assert call([*argv, "--only", "gamma"]) == 0
        assert call([*argv, "--only", "beta", "--against", str(out)]) == 2  # the baseline has no beta row: before training
        assert not (out / "without-beta").exists()
        assert call([*argv, "--only", "gamma", "--against", str(lolo_run["out"])]) == 0  # resumes, then compares
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["without-gamma"]  # nothing else trained
    table = pd.read_csv(out / "lolo.csv")
    assert list(table["lab"]) == ["gamma", "mean", "worst"] and table["n_test"][0] == 18
    assert "only gamma of the config's labs (alpha, beta, gamma)" in (out / "lolo.md").read_text()
    assert json.loads((out / "lolo.json").read_text())["all_labs"] == ["alpha", "beta", "gamma"]
    vs = pd.read_csv(out / "vs-out.csv").set_index("lab")  # compared on the one lab both left out
    assert list(vs.index) == ["gamma", "mean"] and vs.loc["gamma", "n_test"] == 18
    assert call(["cv", lolo_run["argv"][1], "--only", "gamma"]) == 2  # --only without --leave-one-lab-out


def test_seeds_of_a_recipe_are_averaged_and_widen_its_interval(tmp_path: Path) -> None:
    from leuko.studies.labscores import paired_lab_scores

    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(150, int), np.ones(100, int), np.full(50, 2)]
    base = np.where(rng.random(y.size) < 0.7, y, (y + 1) % 3)
    wrong = np.flatnonzero(base != y)
    lucky, unlucky = base.copy(), base.copy()
    lucky[wrong[:30]] = y[wrong[:30]]  # seed 1: 30 cells more right than the baseline
    right = np.flatnonzero(base == y)
    unlucky[right[:30]] = (y[right[:30]] + 1) % 3  # seed 2: 30 fewer: the seeds disagree by 20 points
    a1, a2 = _preds(tmp_path / "a1.csv", y, lucky), _preds(tmp_path / "a2.csv", y, unlucky)
    b = _preds(tmp_path / "b.csv", y, base)
    one, _ = paired_lab_scores(a1, b, CLASSES, n_bootstrap=300)
    assert one["d_accuracy_lo"] > 0 and "n_seeds" not in one  # one seed alone: "ahead", with the cells carrying it
    two, draws = paired_lab_scores([a1, a2], b, CLASSES, n_bootstrap=300)
    assert two["d_accuracy"] == pytest.approx(0.0, abs=1e-12) and two["n_seeds"] == 2 and two["n_seeds_baseline"] == 1
    assert two["d_accuracy_lo"] < 0 < two["d_accuracy_hi"]  # with both seeds: no difference, and the seeds widen it
    assert two["d_accuracy_hi"] - two["d_accuracy_lo"] > 2 * (one["d_accuracy_hi"] - one["d_accuracy_lo"])
    s = lab_scores([a1, a2], CLASSES, n_bootstrap=300)
    acc1, acc2 = (lucky == y).mean(), (unlucky == y).mean()
    assert s["accuracy"] == pytest.approx((acc1 + acc2) / 2) and s["n_seeds"] == 2
    assert s["accuracy_seed_sd"] == pytest.approx(np.std([acc1, acc2], ddof=1))
    alone = lab_scores(a1, CLASSES, n_bootstrap=300)
    assert s["accuracy_hi"] - s["accuracy_lo"] > 1.5 * (alone["accuracy_hi"] - alone["accuracy_lo"])  # seeds resampled too
    with pytest.raises(LeukoError, match="not tested on the same cells"):
        lab_scores([a1, _preds(tmp_path / "short.csv", y[:50], base[:50])], CLASSES)


def test_cv_seeds_trains_each_lab_again_with_the_next_seeds(lolo_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    argv = _lolo_argv(lolo_run, out)
    with _in_lolo_cache(lolo_run):
        assert call([*argv, "--only", "gamma", "--seeds", "0"]) == 2
        assert call([*argv, "--only", "gamma", "--seeds", "2", "--against", str(lolo_run["out"])]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["without-gamma", "without-gamma-seed1"]
    assert yaml.safe_load((out / "without-gamma-seed1" / "config.yaml").read_text())["train"]["seed"] == 1
    row = json.loads((out / "lolo.json").read_text())["labs"][0]
    assert row["cells"] == ["without-gamma", "without-gamma-seed1"] and row["n_seeds"] == 2
    accs = [pd.read_csv(out / c / "eval" / "test" / "predictions.csv").eval("true == pred").mean() for c in row["cells"]]
    assert row["accuracy"] == pytest.approx(np.mean(accs))
    md = (out / "lolo.md").read_text()
    assert "seed sd" in md.lower() and "the mean of 2 runs (train.seed 0 to 1)" in md
    vs = pd.read_csv(out / "vs-out.csv").set_index("lab")
    assert vs.loc["gamma", "n_seeds"] == 2 and vs.loc["gamma", "n_seeds_baseline"] == 1
    assert "with several seeds (gamma: 2 vs 1)" in (out / "vs-out.md").read_text()
    assert call(["cv", lolo_run["argv"][1], "--seeds", "2"]) == 2  # --seeds without --leave-one-lab-out
