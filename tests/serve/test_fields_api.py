"""Smear fields in the sample workflow over HTTP (in-process client, a real SQLite file, generated fields).

What ``leuko count`` does to a folder of fields, the service does to the same fields uploaded to a sample:
the same boxes, the same probabilities, the same count with the same repeats merged. Then every reviewer
action (relabel, delete, restore, add by point or box) and every refusal, which changes nothing.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from serving import one_line

from leuko.serve import UploadLimits, create_app


@pytest.fixture(scope="module")
def lab(serve_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("fields-lab") / "lab.db"
    limits = UploadLimits(max_files=20, max_file_bytes=400_000, max_request_bytes=2_000_000, max_pixels=1_000_000)
    with TestClient(create_app(serve_run, store=db, limits=limits)) as c:
        yield c


def sample(c: TestClient, edge: str = "count") -> dict[str, Any]:
    r = c.post("/samples", json={"accession": f"F-{uuid.uuid4().hex[:8]}", "reviewer": "ann", "edge": edge})
    assert r.status_code == 201, r.text
    return r.json()


def upload(c: TestClient, sid: int, paths: list[Path], status: int = 201, who: str = "ann") -> dict[str, Any]:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = c.post(f"/samples/{sid}/fields", params={"reviewer": who}, files=files)
    assert r.status_code == status, r.text
    return r.json()


def overlap(field_files: dict[str, Path]) -> list[Path]:
    return [field_files[k] for k in ("overlap_0", "overlap_1", "overlap_2", "empty")]


def counts(view: dict[str, Any]) -> dict[str, int]:
    return {row["label"]: row["count"] for row in view["counts"]}


def review(c: TestClient, cell: int, action: str, label: str | None = None, **extra: Any) -> Any:
    return c.post(f"/cells/{cell}/review", json={"action": action, "label": label, "reviewer": "bob", **extra})


def snapshot(c: TestClient, sid: int) -> Any:
    doc = c.get(f"/samples/{sid}/export", params={"format": "json"}).json()["samples"][0]
    return doc


def test_fields_are_found_classified_and_counted_as_leuko_count_does(lab: TestClient, serve_run: Path,
                                                                      field_files: dict[str, Path]) -> None:
    from leuko.fields import count_fields, predict_fields
    from leuko.infer import load_predictor

    s = sample(lab)
    res = upload(lab, s["id"], overlap(field_files))
    assert [f["name"] for f in res["added"]] == [p.name for p in overlap(field_files)] and res["n_fields"] == 4
    assert res["notes"] == ["field_3_empty.jpg holds no white cell"] and res["added"][3]["cells"] == []

    predictor = load_predictor(serve_run, num_workers=0)
    ref = predict_fields(predictor, overlap(field_files))
    got = [c for f in res["added"] for c in f["cells"]]
    assert len(got) == len(ref.rows) >= 7
    for c, r in zip(got, ref.rows):
        assert c["box"] == pytest.approx(list(r.box)) and c["score"] == pytest.approx(r.score) and c["edge"] == r.edge
        assert c["prediction"]["label"] == r.label and c["origin"] == "found" and c["field_id"] is not None
        assert c["prediction"]["probs"] == pytest.approx(r.probs, abs=1e-5)
        assert c["prediction"]["review_reasons"] == list(r.review_reasons)
    assert all(f["rbc_diameter"] == pytest.approx(ref.rbc_diameter) for f in res["added"])

    # the count: repeats merged once, the cut cell counted once, exactly as `leuko count`
    want = count_fields(predictor, overlap(field_files), edge="count")
    count = res["count"]
    assert count["n_cells"] == want.n_cells == 5 and count["repeats_merged"] == want.merged >= 2
    assert counts(count) == {c.label: c.count for c in want.counts}
    assert count["edge"] == "count" and count["edge_cells_counted"] == want.n_edge
    detail = lab.get(f"/samples/{s['id']}").json()
    assert detail["count"] == count and detail["n_fields"] == 4 and detail["n_cells"] == len(got)
    merged = [c for c in detail["cells"] if c["repeat_of"] is not None]
    assert len(merged) == want.merged and not any(c["counted"] for c in merged)
    assert sum(c["counted"] for c in detail["cells"]) == 5

    # a field: its boxes with their labels; its image as uploaded; each cell's crop as classified
    f0 = res["added"][0]
    field = lab.get(f"/fields/{f0['id']}").json()
    assert field["cells"] == f0["cells"] and (field["width"], field["height"]) == (320, 240) and field["accession"] == s["accession"]
    img = lab.get(f"/fields/{f0['id']}/image")
    assert img.status_code == 200 and img.content == field_files["overlap_0"].read_bytes() and img.headers["content-type"] == "image/jpeg"
    crop = lab.get(f"/cells/{f0['cells'][0]['id']}/image")
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/png"

    # the same field again: skipped; the export carries the boxes
    again = upload(lab, s["id"], [field_files["overlap_0"]])
    assert again["added"] == [] and again["duplicates"] == ["field_0.jpg"] and again["count"] == count
    import csv

    rows = list(csv.DictReader(io.StringIO(lab.get(f"/samples/{s['id']}/export").text)))
    assert rows[0]["field"] == "field_0.jpg" and rows[0]["origin"] == "found" and float(rows[0]["x1"]) > float(rows[0]["x0"])
    assert sum(r["counted"] == "true" for r in rows) == 5


def test_edge_policy_drop_leaves_out_cells_cut_by_the_edge(lab: TestClient, serve_run: Path, field_files: dict[str, Path]) -> None:
    from leuko.fields import count_fields
    from leuko.infer import load_predictor

    want = count_fields(load_predictor(serve_run, num_workers=0), overlap(field_files), edge="drop")
    s = sample(lab, edge="drop")
    count = upload(lab, s["id"], overlap(field_files))["count"]
    assert count["edge"] == "drop" and count["n_cells"] == want.n_cells == 4
    assert count["edge_cells_dropped"] == want.edge_dropped == 1 and counts(count) == {c.label: c.count for c in want.counts}
    one_line(lab.post("/samples", json={"accession": "F-edge", "reviewer": "ann", "edge": "half"}), 422, "edge: Input should be")


def test_reviewer_actions_on_field_cells(lab: TestClient, field_files: dict[str, Path], missed_at: tuple[int, int]) -> None:
    MISSED_AT = missed_at
    classes = lab.get("/model").json()["classes"]
    s = sample(lab)
    res = upload(lab, s["id"], [field_files["overlap_0"], field_files["overlap_1"], field_files["missed"]])
    missed = res["added"][2]
    assert len(missed["cells"]) == 1, "the generated field should hold one cell the finder finds"
    n0 = res["count"]["n_cells"]

    # re-label a box: the cell review endpoint, as for any cell
    first = res["added"][0]["cells"][0]
    target = next(c for c in classes if c != first["label"])
    r = review(lab, first["id"], "relabel", target)
    assert r.status_code == 200 and r.json()["cell"]["label"] == target and r.json()["cell"]["box"] == first["box"]

    # delete a false detection: it leaves the count; again is refused; its label is frozen; restore undoes it
    victim = missed["cells"][0]
    r = review(lab, victim["id"], "delete")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["event"]["action"] == "deleted" and body["cell"]["deleted"] and not body["cell"]["counted"]
    assert body["count"]["n_cells"] == n0 - 1 and body["count"]["deleted"] == 1
    one_line(review(lab, victim["id"], "delete"), 409, "is deleted already")
    one_line(review(lab, victim["id"], "relabel", target), 409, "restore it to change its label")
    one_line(review(lab, first["id"], "restore"), 409, "is not deleted")
    r = review(lab, victim["id"], "restore")
    assert r.status_code == 200 and r.json()["event"]["action"] == "restored" and r.json()["count"]["n_cells"] == n0
    review(lab, victim["id"], "delete")
    assert lab.get(f"/samples/{s['id']}").json()["n_deleted"] == 1

    # a repeat's copy relabelled: the one cell it is counts with that label
    detail = lab.get(f"/samples/{s['id']}").json()
    copy = next(c for c in detail["cells"] if c["repeat_of"] is not None)
    kept = next(c for c in detail["cells"] if c["id"] == copy["repeat_of"])
    other = next(c for c in classes if c != kept["label"])
    before = counts(detail["count"])
    after = counts(review(lab, copy["id"], "relabel", other).json()["count"])
    assert after[other] == before[other] + 1 and after[kept["label"]] == before[kept["label"]] - 1

    # add a missed cell by a click on it: the box grows from its nucleus
    fid = missed["id"]
    r = lab.post(f"/fields/{fid}/cells", json={"point": list(MISSED_AT), "reviewer": "bob", "request_id": "add-1"})
    assert r.status_code == 201, r.text
    added = r.json()
    cell = added["cell"]
    x0, y0, x1, y1 = cell["box"]
    assert added["box_from"] == "nucleus" and x0 <= MISSED_AT[0] <= x1 and y0 <= MISSED_AT[1] <= y1 and x1 - x0 < 60
    assert cell["origin"] == "added" and cell["counted"] and cell["field_id"] == fid and not cell["reviewed"]
    assert [e["action"] for e in added["events"]] == ["added"] and added["events"][0]["reviewer"] == "bob"
    assert added["count"]["n_cells"] == n0  # one deleted, one added
    retry = lab.post(f"/fields/{fid}/cells", json={"point": list(MISSED_AT), "reviewer": "bob", "request_id": "add-1"})
    assert retry.status_code == 201 and retry.json()["cell"]["id"] == cell["id"]  # a retry is answered, not stored twice
    one_line(lab.post(f"/fields/{fid}/cells", json={"point": [MISSED_AT[0] + 2, MISSED_AT[1]], "reviewer": "bob"}), 409,
             f"cell {cell['id']} ")  # the same cell twice
    # ... by a click on empty background: the field's typical cell size around the point
    r = lab.post(f"/fields/{fid}/cells", json={"point": [312, 228], "reviewer": "bob", "label": target})
    assert r.status_code == 201, r.text
    bg = r.json()
    assert bg["box_from"] == "default" and bg["cell"]["label"] == target and bg["cell"]["reviewed"]
    assert [e["action"] for e in bg["events"]][0] == "added" and bg["cell"]["box"][2:] == [320, 240]  # clipped to the frame
    # ... by a box
    r = lab.post(f"/fields/{fid}/cells", json={"box": [10, 10, 50, 50], "reviewer": "bob"})
    assert r.status_code == 201 and r.json()["box_from"] == "box" and r.json()["cell"]["box"] == [10, 10, 50, 50]
    assert r.json()["cell"]["edge"] is False and r.json()["cell"]["score"] is None
    hist = lab.get(f"/cells/{cell['id']}/history").json()
    assert [e["action"] for e in hist["events"]] == ["added"] and hist["cell"]["origin"] == "added"

    field = lab.get(f"/fields/{fid}").json()
    assert field["n_found"] == 1 and field["n_cells"] == 3 and len(field["cells"]) == 4
    listed = next(x for x in lab.get("/samples").json()["samples"] if x["id"] == s["id"])
    detail = lab.get(f"/samples/{s['id']}").json()
    for key in ("n_cells", "n_reviewed", "n_corrected", "n_needs_review", "n_fields", "n_deleted"):
        assert listed[key] == detail[key], key

    # signed off: fields are frozen too
    signed = lab.post(f"/samples/{s['id']}/sign-off", json={"reviewer": "bob"}).json()
    frozen = signed["count"]
    assert frozen["n_cells"] == detail["count"]["n_cells"] and frozen["deleted"] == 1
    one_line(lab.post(f"/fields/{fid}/cells", json={"point": [40, 200], "reviewer": "bob"}), 409, "is signed off")
    one_line(review(lab, victim["id"], "restore"), 409, "is signed off")
    one_line(review(lab, first["id"], "relabel", next(c for c in classes if c != target)), 409, "is signed off")
    files = [("files", ("x.jpg", field_files["empty"].read_bytes(), "image/jpeg"))]
    one_line(lab.post(f"/samples/{s['id']}/fields", params={"reviewer": "bob"}, files=files), 409, "is signed off")
    assert lab.get(f"/samples/{s['id']}").json()["count"] == frozen and lab.get(f"/fields/{fid}").json() == {**field, "status": "signed-off"}


def test_bad_fields_and_bad_boxes_are_one_line_and_change_nothing(lab: TestClient, field_files: dict[str, Path]) -> None:
    from PIL import Image

    s = sample(lab)
    fid = upload(lab, s["id"], [field_files["missed"]])["added"][0]["id"]
    store_root = lab.app.state.store.images.root
    before, n_files = snapshot(lab, s["id"]), sum(1 for p in store_root.rglob("*") if p.is_file())

    good = field_files["overlap_0"].read_bytes()
    cut = good[: len(good) // 2]
    buf = io.BytesIO()
    Image.new("RGB", (1500, 1000), (220, 220, 226)).save(buf, format="PNG")  # 1.5 Mpx > the 1 Mpx limit
    huge = buf.getvalue()
    tiny = io.BytesIO()
    Image.new("RGB", (12, 12)).save(tiny, format="PNG")

    def post(*parts: tuple[str, bytes]) -> Any:
        return lab.post(f"/samples/{s['id']}/fields", params={"reviewer": "ann"},
                        files=[("files", (n, b, "application/octet-stream")) for n, b in parts])

    one_line(post(("notes.txt", b"not a picture at all")), 415, "notes.txt: not an image")
    one_line(post(("cut.jpg", cut)), 422, "cut.jpg")
    one_line(post(("huge.png", huge)), 413, "huge.png: 1500 x 1000 = 1,500,000 pixels; the limit is 1,000,000")
    one_line(post(("tiny.png", tiny.getvalue())), 422, "too small for a field")
    one_line(post(("good.jpg", good), ("cut.jpg", cut)), 422, "cut.jpg")  # one bad field refuses them all
    one_line(lab.post(f"/samples/{s['id']}/fields", params={"reviewer": "ann"}, content=b"x",
                      headers={"content-type": "text/plain"}), 415, "multipart")
    one_line(lab.post("/samples/424242/fields", params={"reviewer": "ann"}, files=[("files", ("a.jpg", good, "image/jpeg"))]),
             404, "no sample with id 424242")
    one_line(lab.post(f"/samples/{s['id']}/fields", files=[("files", ("a.jpg", good, "image/jpeg"))]), 422, "say who you are")

    add = lambda body: lab.post(f"/fields/{fid}/cells", json={"reviewer": "bob", **body})  # noqa: E731
    one_line(add({"box": [300, 200, 340, 250]}), 422, "is not inside the 320 x 240 field")
    one_line(add({"box": [-5, 10, 30, 40]}), 422, "is not inside")
    one_line(add({"box": [50, 50, 40, 60]}), 422, "is not inside")
    one_line(add({"box": [50, 50, 52, 52]}), 422, "smaller than 4 pixels")
    one_line(add({"box": [1, 2, 3]}), 422, "box: List should have at least 4 items")
    one_line(add({"point": [320, 10]}), 422, "point (320, 10) is not inside the 320 x 240 field")
    one_line(add({}), 422, "give the new cell's box")
    one_line(add({"box": [10, 10, 50, 50], "point": [20, 20]}), 422, "not both")
    one_line(add({"box": [10, 10, 50, 50], "label": "platelet"}), 422, "unknown label 'platelet'")
    one_line(add({"box": [60, 90, 120, 150]}), 409, "boxes this cell already")  # the found cell at (90, 120)
    one_line(lab.post(f"/fields/{fid}/cells", json={"box": [10, 10, 50, 50]}), 422, "say who you are")
    one_line(lab.post("/fields/424242/cells", json={"box": [10, 10, 50, 50], "reviewer": "bob"}), 404, "no field with id 424242")
    one_line(lab.get("/fields/424242"), 404, "no field with id 424242")
    one_line(lab.get("/fields/424242/image"), 404, "no field with id 424242")
    one_line(review(lab, 424242, "delete"), 404, "no cell with id 424242")

    assert snapshot(lab, s["id"]) == before
    assert sum(1 for p in store_root.rglob("*") if p.is_file()) == n_files  # no image was stored either


def test_openapi_describes_fields(lab: TestClient) -> None:
    spec = lab.get("/openapi.json").json()
    paths = spec["paths"]
    assert "multipart/form-data" in paths["/samples/{sample_id}/fields"]["post"]["requestBody"]["content"]
    for path, method in [("/fields/{field_id}", "get"), ("/fields/{field_id}/image", "get"), ("/fields/{field_id}/cells", "post")]:
        assert method in paths[path]
    review_schema = spec["components"]["schemas"]["ReviewRequest"]["properties"]["action"]
    assert set(review_schema["enum"]) == {"accept", "relabel", "delete", "restore"}
    assert {"FieldDetail", "AddedFields", "AddedFieldCell", "AddCellRequest"} <= set(spec["components"]["schemas"])
    assert json.dumps(spec)  # serialisable
