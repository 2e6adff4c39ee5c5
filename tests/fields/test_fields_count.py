"""predict_fields and count_fields with a real predictor: rows, the differential, repeats, edges, bad fields."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fieldgen import make_field

from leuko.errors import LeukoError
from leuko.fields.count import classifier_crop, count_fields, predict_fields
from leuko.fields.differential import class_counts, wilson_interval


def test_predict_fields_rows(predictor, sample_dir: Path, tmp_path: Path) -> None:
    result = predict_fields(predictor, sample_dir)
    assert len(result.fields) == 4 and result.empty_fields == [str(sample_dir / "field_3_empty.jpg")]
    assert "hold no white cell" in result.notes[0]
    assert len(result.rows) >= 7
    for r in result.rows:
        assert r.label in predictor.classes
        assert sum(r.probs.values()) == pytest.approx(1.0)
        assert r.box[2] > r.box[0] and r.box[3] > r.box[1]
        assert r.review == bool(r.review_reasons)
    frame = pd.read_csv(result.write(tmp_path / "cells.csv"))
    assert {"field", "x0", "y0", "x1", "y1", "pred", "p_lymphocyte", "review", "edge"} <= set(frame.columns)
    assert len(frame) == len(result.rows)
    payload = json.loads(result.write(tmp_path / "cells.json").read_text())
    assert payload["classes"] == predictor.classes and len(payload["cells"]) == len(result.rows)


def test_field_without_white_cell_gives_an_empty_row_set(predictor, tmp_path: Path) -> None:
    path = make_field(wbcs=[], seed=5).save(tmp_path / "empty" / "f.png")
    result = predict_fields(predictor, path.parent)
    assert result.rows == [] and result.empty_fields == [str(path)] and result.notes
    frame = pd.read_csv(result.write(tmp_path / "none.csv"))
    assert len(frame) == 0 and "pred" in frame.columns
    count = count_fields(predictor, path.parent)
    assert count.n_cells == 0 and all(c.count == 0 for c in count.counts)
    assert any("no white cell found" in n for n in count.notes)


def test_count_merges_repeats_and_honours_the_edge_policy(predictor, sample_dir: Path, tmp_path: Path) -> None:
    counted = count_fields(predictor, sample_dir, edge="count")
    assert counted.sample == "S-001"
    assert counted.merged >= 2  # cells at x=300 and x=330 show in two or three fields
    assert counted.n_cells == 5  # five white cells drawn, each counted once
    assert sum(c.count for c in counted.counts) == 5
    assert sum(c.percent for c in counted.counts) == pytest.approx(100.0)
    for c in counted.counts:
        lo, hi = wilson_interval(c.count, 5)
        assert (c.ci95_low, c.ci95_high) == pytest.approx((100 * lo, 100 * hi))
    kept = {r.key for r in counted.rows if r.counted}
    assert all(r.repeat_of in kept for r in counted.rows if r.repeat_of)
    dropped = count_fields(predictor, sample_dir, edge="drop")
    assert dropped.edge_dropped == 1 and dropped.n_cells == 4  # the cell at the top is cut in every field
    assert dropped.n_edge == 0
    payload = json.loads(counted.write(tmp_path / "count.json").read_text())
    assert payload["repeats_merged"] == counted.merged and payload["n_cells"] == 5
    assert len(payload["cells"]) == len(counted.rows)
    table = pd.read_csv(counted.write(tmp_path / "count.csv"))
    assert list(table["label"]) == predictor.classes
    no_dedupe = count_fields(predictor, sample_dir, dedupe=False)
    assert no_dedupe.merged == 0 and no_dedupe.n_cells == counted.n_cells + counted.merged


def test_a_bad_field_stops_the_count_with_one_line(predictor, sample_dir: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(sample_dir, root)
    (root / "zz.jpg").write_text("not a picture")
    with pytest.raises(LeukoError) as info:
        count_fields(predictor, root)
    assert "zz.jpg" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(LeukoError, match="edge must be"):
        count_fields(predictor, sample_dir, edge="half")  # type: ignore[arg-type]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(LeukoError, match="no field images"):
        predict_fields(predictor, tmp_path / "nothing")


def test_classifier_crop_is_a_box_sample_with_context() -> None:
    import numpy as np

    field = np.zeros((240, 320, 3), np.uint8)
    plain = classifier_crop(field, (100, 80, 160, 140), cell_centred=False, size=None)
    assert plain.shape[:2] == (78, 78)  # the 60 px box with 0.15 of margin each side, square
    grown = classifier_crop(field, (100, 80, 160, 140), cell_centred=True, size=64)
    assert grown.shape == (64, 64, 3)


def test_class_counts() -> None:
    counts = class_counts(["a", "b", "a"], ["a", "b", "c"])
    assert [(c.label, c.count) for c in counts] == [("a", 2), ("b", 1), ("c", 0)]
    assert counts[2].ci95_low == 0.0 and counts[2].ci95_high > 0
    with pytest.raises(ValueError):
        class_counts(["z"], ["a"])


def test_serve_uses_the_one_wilson_interval() -> None:
    import leuko.fields.differential as shared
    import leuko.serve.count as serve

    assert serve.wilson_interval is shared.wilson_interval
    assert serve.MIN_CELLS == shared.MIN_CELLS
