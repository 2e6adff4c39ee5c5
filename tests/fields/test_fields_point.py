"""A reviewer's click: the cell at a point (cell_at), the edge flag of any box, and the helpers the lab service shares."""

from __future__ import annotations

import pytest
from fieldgen import cut, make_field

from leuko.errors import LeukoError
from leuko.fields.count import REVIEW_DETECTION_SCORE, detection_reasons
from leuko.fields.dedupe import cell_patch, find_repeats
from leuko.fields.find import DEFAULT_MIN_SCORE, cell_at, find_cells, is_edge


def test_cell_at_grows_the_box_of_a_cell_the_finder_missed() -> None:
    f = make_field((320, 240), wbcs=[(90, 120, 32), (230, 110, 18)], seed=4)
    found = find_cells(f.image)
    assert len(found) == 1 and found[0].box[2] < 200  # the small cell scores below the operating point
    hit = cell_at(f.image, (230, 110))
    assert hit is not None and hit.score < DEFAULT_MIN_SCORE and not hit.edge
    x0, y0, x1, y1 = hit.box
    assert x0 <= 230 <= x1 and y0 <= 110 <= y1
    assert (x0, y0, x1, y1) == pytest.approx((230 - 18, 110 - 18, 230 + 18, 110 + 18), abs=8)
    again = cell_at(f.image, (95, 125))  # a found cell: its own box
    assert again is not None and again.box == pytest.approx(found[0].box)
    assert cell_at(f.image, (300, 20)) is None  # background (or a red cell): no nucleus
    with pytest.raises(LeukoError, match=r"the point \(320, 5\) is outside the 320 x 240 field"):
        cell_at(f.image, (320, 5))


def test_cell_at_flags_a_cell_cut_by_the_frame() -> None:
    f = make_field((320, 240), wbcs=[(160, 120, 32), (8, 60, 20)], seed=9)
    hit = cell_at(f.image, (6, 60))
    assert hit is not None and hit.edge and hit.box[0] == 0.0


def test_is_edge() -> None:
    assert is_edge((0, 50, 40, 90), 320, 240, 40.0)
    assert is_edge((100, 50, 319, 90), 320, 240, 40.0)
    assert not is_edge((10, 10, 50, 50), 320, 240, 40.0)  # 10 px from the frame > 0.05 x 40


def test_detection_reasons() -> None:
    assert detection_reasons(None) == [] and detection_reasons(REVIEW_DETECTION_SCORE) == []
    assert detection_reasons(0.5) == ["unsure it is a white cell (detection score 0.50)"]


def test_find_repeats_pairs_with_checks_only_pairs_of_the_new_cells(smear) -> None:
    d = 40.0
    patches, names = [], []
    for name, left in (("a", 0), ("b", 160), ("c", 320)):
        f = cut(smear, left, 30, (320, 240))
        for c in find_cells(f.image, rbc_diameter=d):
            patches.append(cell_patch(f.image, c.box, d, c.edge))
            names.append(name)
    every = find_repeats(patches, names)
    new = [i for i, n in enumerate(names) if n == "c"]
    some = find_repeats(patches, names, pairs_with=new)
    assert some == [r for r in every if r.a in new or r.b in new] and some
    assert find_repeats(patches, names, pairs_with=[]) == []
