"""find_cells on generated fields: every white cell, touching cells apart, edge flags, any scale or stain."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from fieldgen import make_field

from leuko.errors import LeukoError
from leuko.fields.evaluate import iou
from leuko.fields.find import FoundCell, field_ruler, find_cells


def _best(found: list[FoundCell], truth) -> list[float]:
    return [max((iou(c.box, t) for c in found), default=0.0) for t in truth]


def test_one_cell_is_found_with_a_tight_box() -> None:
    f = make_field(wbcs=[(160, 120, 34)], seed=1)
    cells = find_cells(f.image)
    assert len(cells) == 1
    c = cells[0]
    assert iou(c.box, f.boxes[0]) > 0.75
    assert c.score > 0.9 and not c.edge
    nx0, ny0, nx1, ny1 = c.nucleus
    assert c.box[0] <= nx0 < nx1 <= c.box[2] and c.box[1] <= ny0 < ny1 <= c.box[3]
    assert c.cell_box().cell == c.box  # the cell-crop record of the same cell


def test_touching_cells_are_parted_and_lobes_kept_together() -> None:
    f = make_field(wbcs=[(120, 120, 32), (184, 124, 32)], lobes=3, seed=1)  # cytoplasms touch
    cells = find_cells(f.image)
    assert len(cells) == 2
    assert min(_best(cells, f.boxes)) > 0.7


def test_edge_cut_cell_is_flagged() -> None:
    f = make_field(wbcs=[(10, 120, 34), (200, 110, 30)], seed=1)
    cells = sorted(find_cells(f.image, min_score=0.0), key=lambda c: c.box[0])
    assert len(cells) == 2
    assert cells[0].edge and not cells[1].edge
    assert min(_best(cells, f.boxes)) > 0.5


def test_field_without_white_cell_gives_nothing() -> None:
    platelets = make_field(wbcs=[], seed=2, n_platelets=12).image
    assert find_cells(platelets) == []
    assert all(c.score < 0.5 for c in find_cells(platelets, min_score=0.0))  # a platelet pair scores low
    blank = np.full((240, 320, 3), 225, np.uint8)
    assert find_cells(blank, min_score=0.0) == []


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_any_magnification(scale: float) -> None:
    f = make_field(wbcs=[(110, 120, 34), (230, 100, 30)], seed=4)
    img = cv2.resize(f.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    ruler = field_ruler(img)
    assert ruler is not None and abs(ruler / (40.0 * scale) - 1) < 0.25
    cells = find_cells(img)
    assert len(cells) == 2
    assert min(_best(cells, [tuple(v * scale for v in b) for b in f.boxes])) > 0.6


def test_another_stain_and_white_balance() -> None:
    f = make_field(wbcs=[(160, 120, 34)], seed=5)
    hsv = cv2.cvtColor(f.image, cv2.COLOR_RGB2HSV_FULL).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + 10) % 256
    shifted = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)
    warm = np.clip(shifted * np.array([1.08, 1.0, 0.9]), 0, 255).astype(np.uint8)
    cells = find_cells(warm)
    assert len(cells) == 1 and iou(cells[0].box, f.boxes[0]) > 0.7


def test_bad_arrays_are_user_errors() -> None:
    with pytest.raises(LeukoError, match="uint8"):
        find_cells(np.zeros((100, 100, 3), np.float32))
    with pytest.raises(LeukoError, match="at least 16"):
        find_cells(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(LeukoError, match="RGB"):
        find_cells(np.zeros((50, 50, 5), np.uint8))
