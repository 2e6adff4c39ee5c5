"""The same cell once: repeats across overlapping fields found and grouped, distinct cells left apart."""

from __future__ import annotations

import numpy as np
from fieldgen import cut, make_field

from leuko.fields.dedupe import cell_patch, find_repeats, repeat_groups, repeat_score
from leuko.fields.find import find_cells


def _patches(fields, d=40.0):
    out, names, boxes = [], [], []
    for name, f in fields:
        for c in find_cells(f.image, rbc_diameter=d):
            out.append(cell_patch(f.image, c.box, d, c.edge))
            names.append(name)
            boxes.append(c.box)
    return out, names, boxes


def test_a_cell_in_two_overlapping_fields_is_one_repeat(smear) -> None:
    a, b = cut(smear, 0, 30, (320, 240)), cut(smear, 160, 30, (320, 240))
    patches, names, _ = _patches([("a", a), ("b", b)])
    reps = find_repeats(patches, names)
    # cells at x=300 (whole in b, cut by a's right edge) and x=330 (cut in a, whole in b)
    assert len(reps) >= 1
    assert all(names[r.a] != names[r.b] and r.correlation >= 0.9 for r in reps)
    groups = repeat_groups(len(patches), reps)
    assert sum(len(g) for g in groups) == len(patches)


def test_distinct_cells_are_not_repeats() -> None:
    # same kind of cell, same drawing style, different places and neighbours
    f1 = make_field(wbcs=[(160, 120, 34)], seed=11)
    f2 = make_field(wbcs=[(160, 120, 34)], seed=12)
    patches, names, _ = _patches([("f1", f1), ("f2", f2)])
    assert len(patches) == 2
    assert repeat_score(patches[0], patches[1]) < 0.9
    assert find_repeats(patches, names) == []


def test_cells_of_one_field_are_never_paired(smear) -> None:
    f = cut(smear, 0, 30, (640, 240))
    patches, names, _ = _patches([("one", f)])
    assert len(patches) >= 4
    assert find_repeats(patches, names) == []


def test_neighbours_in_overlapping_fields_are_not_taken_for_each_other(smear) -> None:
    # two different cells 40 px apart show in both fields; only the true copies pair up
    a, b = cut(smear, 160, 30, (320, 240)), cut(smear, 200, 20, (320, 240))
    patches, names, boxes = _patches([("a", a), ("b", b)])
    for r in find_repeats(patches, names):
        ba, bb = boxes[r.a], boxes[r.b]
        if names[r.a] == "b":
            ba, bb = bb, ba
        # b's window is a's moved by (40, -10): a true repeat lies 40 px left, 10 px down in b
        assert abs((ba[0] + ba[2]) / 2 - 40 - (bb[0] + bb[2]) / 2) < 20
        assert abs((ba[1] + ba[3]) / 2 + 10 - (bb[1] + bb[3]) / 2) < 20


def test_repeat_groups_are_connected_components() -> None:
    from leuko.fields.dedupe import Repeat

    groups = repeat_groups(5, [Repeat(0, 2, 0.95), Repeat(2, 4, 0.97)])
    assert groups == [[0, 2, 4], [1], [3]]
    assert repeat_groups(0, []) == []
    assert np.all(np.diff([g[0] for g in groups]) > 0)
