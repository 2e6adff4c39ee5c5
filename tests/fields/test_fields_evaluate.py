"""Detection evaluation (VOC matching, AP, reports, pictures) and reading fields with one-line reasons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fieldgen import make_field
from PIL import Image

from leuko.errors import LeukoError
from leuko.fields.evaluate import average_precision, evaluate_fields, iou, match
from leuko.fields.read import list_fields, read_field, voc_fields


def test_iou_and_voc_matching() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    # two detections of one cell: the better-scored one matches, the other is a false positive
    matched, best = match([(0, 0, 10, 10), (1, 0, 11, 10)], [0.5, 0.9], [(0, 0, 10, 10)])
    assert matched == [-1, 0] and best[0] > 0.5


def test_average_precision() -> None:
    assert average_precision([0.9, 0.8], [True, True], 2) == pytest.approx(1.0)
    assert average_precision([0.9, 0.8], [True, True], 4) == pytest.approx(0.5)  # half the cells never found
    # a false positive ranked first: precision 1/2 at recall 0.5, 2/3 at recall 1; made monotone,
    # the precision at recall 0.5 is the best at any higher recall, 2/3
    assert average_precision([0.9, 0.8, 0.7], [False, True, True], 2) == pytest.approx(2 / 3)
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision([], [], 3) == 0.0
    assert np.isnan(average_precision([0.5], [False], 0))


def test_evaluate_generated_voc_fields(voc_dir: Path, tmp_path: Path) -> None:
    report = evaluate_fields(voc_fields(voc_dir))
    s = report.summary()
    assert s["fields"] == 4 and s["true_cells"] == 5
    assert s["recall"] == 1.0 and s["precision"] == 1.0 and s["ap"] == pytest.approx(1.0)
    assert report.error_lines() == []
    only_test = voc_fields(voc_dir, split="test")
    assert [p.stem for p, _ in only_test] == ["F_1", "F_3"] and only_test[1][1] == []
    out = report.write(tmp_path / "rep", pictures=2)
    payload = json.loads((out / "report.json").read_text())
    assert payload["summary"]["tp"] == 5 and len(payload["fields"]) == 4
    pics = sorted((out / "pictures").glob("*.jpg"))
    assert len(pics) == 2
    w, h = Image.open(pics[0]).size
    assert w > 2 * 320 and h > 240  # truth and found side by side under a title


def test_errors_are_listed_per_field(voc_dir: Path) -> None:
    fields = voc_fields(voc_dir)
    fields[3] = (fields[3][0], [(10.0, 10.0, 60.0, 60.0)])  # a true box where nothing is
    fields[0] = (fields[0][0], [])  # the found cell becomes a false positive
    report = evaluate_fields(fields)
    assert report.fn == 1 and report.fp == 1
    lines = report.error_lines()
    assert any("F_0" in line and "false cell" in line for line in lines)
    assert any("F_3" in line and "missed cell at (10, 10, 60, 60)" in line for line in lines)


def test_best_threshold_is_the_middle_of_the_best_interval() -> None:
    from leuko.fields.evaluate import DetectionReport, FieldResult

    # scores 0.9 (right), 0.4 (false), 0.2 (right): keeping >= 0.9 or >= 0.2 ... best F1 keeps all but 0.4
    f = FieldResult("a", "a.jpg", [(0, 0, 10, 10), (20, 0, 30, 10)], [(0, 0, 10, 10), (40, 40, 50, 50), (20, 0, 30, 10)],
                    [0.9, 0.4, 0.2], [False] * 3, [0, -1, 1], [1.0, 0.0, 1.0])
    report = DetectionReport([f])
    assert report.best_threshold() == pytest.approx(0.1)  # keeps all three: F1 0.8 beats 0.667
    assert report.at_score(0.5).fp == 0 and report.at_score(0.5).fn == 1


def test_read_field_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = make_field(wbcs=[(160, 120, 34)]).save(tmp_path / "good.jpg")
    assert read_field(good).shape == (240, 320, 3)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(LeukoError, match="notes.jpg: not an image"):
        read_field(tmp_path / "notes.jpg")
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(LeukoError, match="cut.jpg: truncated"):
        read_field(tmp_path / "cut.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 320x240 field is "huge" now
    with pytest.raises(LeukoError, match="too large"):
        read_field(good)


def test_list_fields_and_voc_errors(tmp_path: Path, voc_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeukoError, match="no field images"):
        list_fields(tmp_path / "empty")
    with pytest.raises(LeukoError, match="no such field folder"):
        list_fields(tmp_path / "missing")
    with pytest.raises(LeukoError, match="expected JPEGImages"):
        voc_fields(tmp_path / "empty")
    with pytest.raises(LeukoError, match="no split 'val'.*have: test"):
        voc_fields(voc_dir, split="val")
