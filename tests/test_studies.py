"""``leuko cv`` and ``leuko compare``: fold tables, mean ± std, grids, resuming without re-training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cells import make_cell
from leuko.errors import LeukoError
from leuko.studies.grid import compare, cross_validate, load_grid
from leuko.train import load_config
from cells import call

TINY = {
    "model": {"name": "custom_cnn", "pretrained": "none"},
    "data": {"image_size": 32, "num_workers": 0},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.01},
    "trainer": {"progress": False},
}
CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]


@pytest.fixture(scope="module")
def cells_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grid") / "cells"
    for ci, cls in enumerate(CLASSES):
        for i in range(15):
            make_cell(root / cls / f"{i}.png", size=(40, 40), seed=1000 * ci + i, hue=70 * ci)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def cv_result(cells_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = load_config(None, [f"{s}.{k}={v}" for s, d in TINY.items() for k, v in d.items() if not isinstance(v, dict)])
    out = tmp_path_factory.mktemp("cv") / "cv"
    lines: list[str] = []
    res = cross_validate(cfg, out, 5, data_path=cells_root, echo=lines.append)
    res["cfg"] = cfg
    return res


def test_cv_folds_partition_the_data_and_summary_is_mean_std(cv_result: dict, cells_root: Path) -> None:
    out = Path(cv_result["out"])
    tests: list[set[str]] = []
    accs = []
    for k in range(5):
        split = json.loads((out / f"fold-{k}" / "split.json").read_text())
        tests.append({key for key, role in split["assignments"].items() if role == "test"})
        accs.append(json.loads((out / f"fold-{k}" / "eval" / "test" / "metrics.json").read_text())["accuracy"])
    assert sum(len(t) for t in tests) == 45 and len(set().union(*tests)) == 45  # every image tested exactly once
    table = pd.read_csv(out / "cv.csv")
    assert list(table["cell"]) == [f"fold-{k}" for k in range(5)] + ["mean", "std"]
    assert table["accuracy"].iloc[:5].tolist() == pytest.approx(accs)
    assert table.loc[5, "accuracy"] == pytest.approx(np.mean(accs))
    assert table.loc[6, "accuracy"] == pytest.approx(np.std(accs, ddof=1))
    md = (out / "cv.md").read_text()
    assert "| fold-0 |" in md and "F-measure" in md and "±" in md
    assert (out / "cv.png").stat().st_size > 5000
    summary = json.loads((out / "cv.json").read_text())["summary"]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accs))


def test_cv_rerun_skips_finished_folds(cv_result: dict, cells_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import leuko.train

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(leuko.train, "train", no_training)
    lines: list[str] = []
    res = cross_validate(cv_result["cfg"], cv_result["out"], 5, data_path=cells_root, echo=lines.append)
    assert sum("skipped" in line for line in lines) == 5
    assert res["summary"]["accuracy"]["mean"] == pytest.approx(cv_result["summary"]["accuracy"]["mean"])


def test_cv_refuses_a_different_plan_in_the_same_folder(cv_result: dict, cells_root: Path) -> None:
    other = cv_result["cfg"].model_copy(deep=True)
    other.train.lr = 0.5
    with pytest.raises(LeukoError, match=r"fold-0 was run with a different config \(train.lr"):
        cross_validate(other, cv_result["out"], 5, data_path=cells_root, echo=lambda s: None)


def test_a_folder_planned_before_a_setting_existed_still_resumes(cv_result: dict, cells_root: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import leuko.train

    out = Path(cv_result["out"]).parent / "older-leuko"
    shutil.copytree(cv_result["out"], out)
    plan = json.loads((out / "plan.json").read_text())
    for entry in plan["cells"].values():
        del entry["train"]["mixstyle"]  # as an earlier leuko wrote it, before train.mixstyle existed
        entry["description"] = "an older description of the recipe"  # words, not settings
    (out / "plan.json").write_text(json.dumps(plan))
    monkeypatch.setattr(leuko.train, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    lines: list[str] = []
    cross_validate(cv_result["cfg"], out, 5, data_path=cells_root, echo=lines.append)
    assert sum("skipped" in line for line in lines) == 5
    other = cv_result["cfg"].model_copy(deep=True)
    other.train.mixstyle = 0.5  # a setting the old runs did not have on: a different config
    with pytest.raises(LeukoError, match=r"different config \(train.mixstyle: 0.0 then, 0.5 now"):
        cross_validate(other, out, 5, data_path=cells_root, echo=lambda s: None)


def _grid_file(tmp_path: Path, lrs: list[float] = [0.01, 0.02]) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(TINY))
    g = tmp_path / "grid.yaml"
    g.write_text(yaml.safe_dump({
        "name": "tiny-grid",
        "config": "base.yaml",
        "set": ["data.split=holdout-70-30"],
        "grid": {"train.lr": lrs, "train.batch_size": [8, 16]},
    }, sort_keys=False))
    return g


def test_compare_2x2_writes_table_and_resumes(cells_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _grid_file(tmp_path)
    out = tmp_path / "cmp"
    res = compare(g, out, data_path=cells_root, echo=lambda s: None)
    table = pd.read_csv(out / "compare.csv")
    assert len(table) == 4 and set(table["cell"]) == {f"lr-{a}_batch_size-{b}" for a in (0.01, 0.02) for b in (8, 16)}
    for _, row in table.iterrows():
        m = json.loads((out / row["cell"] / "eval" / "test" / "metrics.json").read_text())
        assert row["accuracy"] == pytest.approx(m["accuracy"]) and row["f1"] == pytest.approx(m["macro_f1"])
        wall_s = json.loads((out / row["cell"] / "summary.json").read_text())["wall_time_s"]
        assert wall_s > 0 and row["train_time_min"] == pytest.approx(round(wall_s / 60, 2)) and row["n_test"] == m["n"]
        assert load_config(out / row["cell"] / "config.yaml").train.lr == row["train.lr"]
    assert "| Accuracy | Precision | Recall | F-measure |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 5000

    # Resume: one cell interrupted (checkpoint, no model), one trained but not evaluated, two finished.
    cell_a, cell_b = res["rows"][0]["cell"], res["rows"][1]["cell"]
    (out / cell_a / "model.pt").unlink()
    (out / cell_a / "eval" / "test" / "metrics.json").unlink()
    (out / cell_b / "eval" / "test" / "metrics.json").unlink()
    import leuko.train

    calls: list[tuple] = []
    real_train = leuko.train.train

    def spy(config, out_dir, **kw):  # type: ignore[no-untyped-def]
        calls.append((Path(out_dir).name, kw.get("resume", False)))
        return real_train(config, out_dir, **kw)

    monkeypatch.setattr(leuko.train, "train", spy)
    lines: list[str] = []
    compare(g, out, data_path=cells_root, echo=lines.append)
    assert calls == [(cell_a, True)]
    assert any(f"cell {cell_b}: trained earlier: evaluating" in line for line in lines)
    assert sum("skipped" in line for line in lines) == 2
    assert (out / cell_a / "model.pt").is_file() and (out / cell_b / "eval" / "test" / "metrics.json").is_file()

    # The same folder with a different grid is refused, naming the cell and the key.
    g2 = _grid_file(tmp_path, lrs=[0.01])
    yaml_text = g2.read_text().replace("holdout-70-30", "holdout-80-20")
    g2.write_text(yaml_text)
    with pytest.raises(LeukoError, match="different config"):
        compare(g2, out, data_path=cells_root, echo=lambda s: None)


def test_named_cells_cross_the_grid(tmp_path: Path) -> None:
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump({"base": TINY, "cells": {"a": {"train.lr": 0.1}, "b": {"model.head": "dense128"}},
                                 "scenarios": {"s1": {"train.batch_size": 4}, "s2": {"train.batch_size": 6, "train.lr": 0.5}},
                                 "grid": {"train.epochs": [1, 2]}}, sort_keys=False))
    spec, cells = load_grid(g)
    assert [c.name for c in cells] == [f"{a}_{s}_epochs-{e}" for a in "ab" for s in ("s1", "s2") for e in (1, 2)]
    first, last = cells[0].config, cells[-1].config
    assert (first.train.lr, first.train.batch_size, first.train.epochs) == (0.1, 4, 1)  # the cell's lr beats the scenario's
    assert (last.model.head, last.train.lr, last.train.batch_size, last.train.epochs) == ("dense128", 0.5, 6, 2)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"model": {"name": "custom_cnn"}}, "it looks like a run config"),
        ({"grid": {"train.lr": [0.1]}, "colour": 1}, "unknown key 'colour'"),
        ({"grid": {"train.lrr": [0.1]}}, "unknown key 'train.lrr'"),
        ({"grid": {}}, "must not be empty"),
        ({"config": "missing.yaml", "grid": {"train.lr": [0.1]}}, "not found"),
    ],
)
def test_bad_grids_are_one_line_errors(tmp_path: Path, content: dict, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump(content))
    with pytest.raises(LeukoError, match=message):
        load_grid(g)
    assert call(["compare", str(g), "--out", str(tmp_path / "o")]) == 2
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert "Traceback" not in text and message.split("'")[0].strip() in text


def test_cv_cli_rejects_one_fold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert call(["cv", str(cfg), "--folds", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
