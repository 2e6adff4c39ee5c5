"""The field verbs: evaluate-fields, count, predict --fields; one line and a non-zero exit for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from cells import call
from fieldgen import make_field


def test_evaluate_fields_cli(voc_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert call(["evaluate-fields", str(voc_dir), "--out", str(tmp_path / "rep"), "--pictures", "1"]) == 0
    out = capsys.readouterr().out
    assert "precision 1.0000, recall 1.0000" in out and "AP 1.0000" in out
    assert (tmp_path / "rep" / "report.json").is_file() and len(list((tmp_path / "rep" / "pictures").iterdir())) == 1
    assert call(["evaluate-fields", str(voc_dir), "--split", "test"]) == 0
    assert "2 fields" in capsys.readouterr().out


def test_count_cli(field_run: Path, sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "count.json"
    assert call(["count", str(field_run), str(sample_dir), "--sample", "P-17", "--edge", "drop", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "differential: P-17" in text and "repeat(s) in overlapping fields merged" in text
    payload = json.loads(out.read_text())
    assert payload["sample"] == "P-17" and payload["edge"] == "drop" and payload["n_cells"] == 4


def test_predict_fields_cli(field_run: Path, sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cells.csv"
    assert call(["predict", str(field_run), str(sample_dir), "--fields", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "white cell(s) found in 4 field(s)" in text and "hold no white cell" in text
    frame = pd.read_csv(out)
    assert len(frame) >= 7 and {"field", "x0", "pred", "review"} <= set(frame.columns)


def test_field_with_no_white_cell_is_a_note(field_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_field(wbcs=[], seed=9).save(tmp_path / "f" / "blank.png")
    assert call(["predict", str(field_run), str(tmp_path / "f"), "--fields", "--out", str(tmp_path / "rows.csv")]) == 0
    assert "0 white cell(s) found" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "rows.csv")) == 0


@pytest.mark.parametrize("case", ["text", "truncated", "huge", "empty_dir", "bad_edge"])
def test_bad_input_is_one_line_and_a_non_zero_exit(case: str, field_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "fields"
    good = make_field(wbcs=[(160, 120, 34)], seed=1).save(folder / "good.jpg")
    argv = ["count", str(field_run), str(folder), "--out", str(tmp_path / "count.json")]
    if case == "text":
        (folder / "notes.jpg").write_text("hello")
    elif case == "truncated":
        data = good.read_bytes()
        (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
    elif case == "huge":
        from PIL import Image

        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    elif case == "empty_dir":
        argv[2] = str(tmp_path / "nothing")
        (tmp_path / "nothing").mkdir()
    elif case == "bad_edge":
        argv += ["--edge", "half"]
    code = call(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "count.json").exists()  # nothing written
    if case != "bad_edge":  # the same file through predict --fields
        code = call(["predict", str(field_run), argv[2], "--fields"])
        assert code != 0 and len(capsys.readouterr().err.strip().splitlines()) == 1
