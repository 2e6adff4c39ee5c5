"""Splits: proportions, determinism, groups never straddling, saving and reloading."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from leuko.data import load_dataset
from leuko.data.samples import DatasetIndex, Sample
from leuko.data.splits import Split, make_split
from leuko.errors import LeukoError


def synthetic_index(n_per_class: dict[str, int], group_size: int = 1, root: Path = Path("/data")) -> DatasetIndex:
    samples = []
    for label, n in n_per_class.items():
        for i in range(n):
            group = f"{label}-g{i // group_size}" if group_size > 1 else None
            samples.append(Sample(path=root / label / f"{i}.png", label=label, group=group))
    return DatasetIndex(root, "folder", samples, sorted(n_per_class))


def test_holdout_proportions_exact_and_stratified() -> None:
    index = synthetic_index({"a": 100, "b": 50, "c": 30})
    split = make_split(index, "holdout-70-30", seed=1)
    counts = split.counts(index)
    assert counts["train"] == {"a": 70, "b": 35, "c": 21}
    assert counts["test"] == {"a": 30, "b": 15, "c": 9}
    assert "val" not in counts
    three = make_split(index, "holdout-80-10-10", seed=1).counts(index)
    assert three["train"] == {"a": 80, "b": 40, "c": 24}
    assert three["val"] == {"a": 10, "b": 5, "c": 3}
    assert three["test"] == {"a": 10, "b": 5, "c": 3}


def test_val_fraction_carved_from_train() -> None:
    index = synthetic_index({"a": 100, "b": 100})
    counts = make_split(index, "holdout-80-20", seed=0, val_fraction=0.25).counts(index)
    assert counts["test"] == {"a": 20, "b": 20}
    assert counts["val"] == {"a": 20, "b": 20}
    assert counts["train"] == {"a": 60, "b": 60}


def test_deterministic_for_seed_and_different_across_seeds() -> None:
    index = synthetic_index({"a": 60, "b": 60})
    a = make_split(index, "holdout-80-20", seed=7).assignments
    b = make_split(index, "holdout-80-20", seed=7).assignments
    c = make_split(index, "holdout-80-20", seed=8).assignments
    assert a == b
    assert a != c


def test_groups_never_straddle() -> None:
    index = synthetic_index({"a": 90, "b": 60}, group_size=3)
    split = make_split(index, "holdout-80-10-10", seed=3)
    assert split.grouped
    assert split.check_groups(index) == []
    counts = split.counts(index)
    total = {r: sum(c.values()) for r, c in counts.items()}
    assert total["train"] == pytest.approx(120, abs=6)
    assert total["test"] == pytest.approx(15, abs=6)
    folds = make_split(index, "group-kfold-5", seed=0)
    for k in range(5):
        assert folds.fold(k, index, val_fraction=0.1).check_groups(index) == []


def test_kfold_covers_every_sample_once() -> None:
    index = synthetic_index({"a": 50, "b": 25})
    split = make_split(index, "kfold-5", seed=0)
    assert split.n_folds == 5
    assert Counter(split.folds.values()) == Counter({k: 15 for k in range(5)})
    tests = set()
    for k in range(5):
        f = split.fold(k, index)
        test_keys = {s.key for s in f.samples(index, "test")}
        assert not test_keys & tests
        tests |= test_keys
        assert len(f.samples(index, "train")) == 60
    assert len(tests) == 75
    with pytest.raises(LeukoError, match="fold must be in 0..4"):
        split.fold(5, index)
    with pytest.raises(LeukoError, match="choose a fold"):
        split.samples(index, "train")


def test_bad_presets() -> None:
    index = synthetic_index({"a": 10, "b": 10})
    with pytest.raises(LeukoError, match="unknown split preset 'holdout-fifty'"):
        make_split(index, "holdout-fifty")
    with pytest.raises(LeukoError, match="sum to 100"):
        make_split(index, "holdout-50-40")
    assert make_split(index, "holdout-50-50").counts(index)["test"] == {"a": 5, "b": 5}
    with pytest.raises(LeukoError, match="needs groups"):
        make_split(index, "group-kfold-3")
    with pytest.raises(LeukoError, match="fewer than the 20 folds"):
        make_split(index, "kfold-20")
    with pytest.raises(LeukoError, match="needs the dataset's own split"):
        make_split(index, "source")


def test_source_split_mooney(mooney_tree: Path) -> None:
    index = load_dataset(mooney_tree)
    split = make_split(index, "source", val_fraction=0.25)
    counts = split.counts(index)
    assert sum(counts["test"].values()) == 8  # TEST only
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 16
    assert sum(counts["val"].values()) == 4
    assert any("TEST_SIMPLE" in n for n in split.notes)
    assert all(s.source_split == "TEST" for s in split.samples(index, "test"))


def test_source_split_cnmc_is_grouped(cnmc_tree: Path) -> None:
    index = load_dataset(cnmc_tree)
    split = make_split(index, "source", val_fraction=0.2)
    assert {s.source_split for s in split.samples(index, "test")} == {"validation"}
    assert split.check_groups(index) == []


def test_save_load_roundtrip_relative_keys(tmp_path: Path, folder_tree: Path) -> None:
    index = load_dataset(folder_tree)
    split = make_split(index, "holdout-80-20", seed=0)
    path = split.save(tmp_path / "split.json")
    raw = json.loads(path.read_text())
    assert all(not k.startswith("/") for k in raw["assignments"])  # portable keys
    again = Split.load(path)
    assert again.assignments == split.assignments
    # still applies after the dataset moves
    moved = tmp_path / "moved"
    folder_tree.rename(moved)
    index2 = load_dataset(moved)
    assert [s.path.name for s in again.samples(index2, "test")] == [s.path.name for s in split.samples(index, "test")]


def test_split_file_for_other_data(tmp_path: Path, folder_tree: Path, pbc_tree: Path) -> None:
    split = make_split(load_dataset(folder_tree), "holdout-80-20")
    with pytest.raises(LeukoError, match="made for other data"):
        split.samples(load_dataset(pbc_tree), "train")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LeukoError, match="not valid JSON"):
        Split.load(tmp_path / "bad.json")
    with pytest.raises(LeukoError, match="not found"):
        Split.load(tmp_path / "missing.json")
