"""Samples over HTTP (in-process client, a real SQLite file): the workflow, every refusal, auth, the OpenAPI description."""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from serving import one_line

from leuko.errors import LeukoError
from leuko.serve import UploadLimits, create_app
from leuko.serve.auth import TokenAuth, add_token, token_hash


@pytest.fixture(scope="module")
def lab(serve_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("lab") / "lab.db"
    limits = UploadLimits(max_files=20, max_file_bytes=200_000, max_request_bytes=1_000_000, max_pixels=1_000_000)
    with TestClient(create_app(serve_run, store=db, limits=limits)) as c:
        yield c


def files_of(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def new_sample(c: TestClient, who: str = "ann", **headers: str) -> dict[str, Any]:
    r = c.post("/samples", json={"accession": f"S-{uuid.uuid4().hex[:8]}", "reviewer": who}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def test_openapi_describes_samples(lab: TestClient) -> None:
    spec = lab.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [("/samples", "post"), ("/samples", "get"), ("/samples/{sample_id}", "get"),
                         ("/samples/{sample_id}/cells", "post"), ("/cells/{cell_id}/review", "post"),
                         ("/cells/{cell_id}/history", "get"), ("/cells/{cell_id}/image", "get"),
                         ("/samples/{sample_id}/sign-off", "post"), ("/samples/{sample_id}/reopen", "post"),
                         ("/samples/{sample_id}/export", "get"), ("/export", "get"), ("/whoami", "get"),
                         ("/predict", "post"), ("/count", "post"), ("/count/labels", "post")]:
        assert method in paths[path], (path, method)
    review = paths["/cells/{cell_id}/review"]["post"]
    assert review["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReviewRequest")
    assert {"404", "409", "422"} <= set(review["responses"])
    assert "multipart/form-data" in paths["/samples/{sample_id}/cells"]["post"]["requestBody"]["content"]
    for name in ("SampleDetail", "CellView", "ReviewEventView", "CountView", "SampleList"):
        assert name in spec["components"]["schemas"]


def test_sample_workflow(lab: TestClient, cell_images: list[Path], serve_run: Path) -> None:
    who = lab.get("/whoami").json()
    assert who["store"] is True and who["auth"] is False and who["model"]["name"] == serve_run.name
    s = new_sample(lab)
    assert s["status"] == "open" and s["n_cells"] == 0 and s["model_name"] == serve_run.name
    r = lab.post(f"/samples/{s['id']}/cells", params={"reviewer": "ann"}, files=files_of(cell_images))
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["n_cells"] == len(cell_images) and not added["duplicates"]
    cells = added["added"]
    assert [c["name"] for c in cells] == [p.name for p in cell_images]
    # the predictions are the stateless /predict's, made by the loaded model at once
    ref = lab.post("/predict", files=files_of(cell_images), params={"top_k": 1}).json()["results"]
    assert [c["prediction"]["label"] for c in cells] == [x["label"] for x in ref]
    assert all(abs(c["prediction"]["confidence"] - x["confidence"]) < 1e-5 for c, x in zip(cells, ref))
    # the same images again: skipped
    again = lab.post(f"/samples/{s['id']}/cells", params={"reviewer": "ann"}, files=files_of(cell_images[:2])).json()
    assert again["added"] == [] and again["duplicates"] == [p.name for p in cell_images[:2]]
    # the stored image is the uploaded file
    img = lab.get(f"/cells/{cells[0]['id']}/image")
    assert img.status_code == 200 and img.content == cell_images[0].read_bytes() and img.headers["content-type"] == "image/jpeg"

    classes = lab.get("/model").json()["classes"]
    first = cells[0]
    target = next(c for c in classes if c != first["label"])
    r = lab.post(f"/cells/{first['id']}/review", json={"action": "relabel", "label": target, "reviewer": "bob"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cell"]["label"] == target and body["cell"]["corrected"] and body["event"]["reviewer"] == "bob"
    assert body["event"]["label_before"] == first["label"] and body["count"]["n_cells"] == len(cell_images)
    r = lab.post(f"/cells/{cells[1]['id']}/review", json={"action": "accept", "reviewer": "bob"})
    assert r.status_code == 200 and r.json()["event"]["action"] == "accept"

    hist = lab.get(f"/cells/{first['id']}/history").json()
    assert [(e["action"], e["label_after"], e["reviewer"]) for e in hist["events"]] == [("relabel", target, "bob")]
    detail = lab.get(f"/samples/{s['id']}").json()
    assert detail["n_reviewed"] == 2 and detail["n_corrected"] == 1
    assert {row["label"]: row["count"] for row in detail["count"]["counts"]} == {
        c: sum((x["label"] if x["id"] != first["id"] else target) == c for x in cells) for c in classes}

    listed = lab.get("/samples").json()
    assert listed["samples"][0]["id"] == s["id"]  # newest first
    assert lab.get("/samples", params={"accession": s["accession"]}).json()["samples"][0]["n_reviewed"] == 2
    assert lab.get("/samples", params={"accession": "nope"}).json() == {"samples": [], "total": 0}

    signed = lab.post(f"/samples/{s['id']}/sign-off", json={"reviewer": "bob"}).json()
    assert signed["status"] == "signed-off" and signed["signed_off_by"] == "bob"
    assert s["id"] not in [x["id"] for x in lab.get("/samples", params={"status": "open"}).json()["samples"]]
    one_line(lab.post(f"/cells/{cells[2]['id']}/review", json={"action": "accept", "reviewer": "bob"}), 409, "is signed off")
    one_line(lab.post(f"/samples/{s['id']}/cells", params={"reviewer": "ann"}, files=files_of(cell_images[:1])), 409, "is signed off")
    assert lab.get(f"/samples/{s['id']}").json()["count"] == signed["count"]  # frozen
    one_line(lab.post(f"/samples/{s['id']}/reopen", json={"reason": "", "reviewer": "bob"}), 422, "say why")
    reopened = lab.post(f"/samples/{s['id']}/reopen", json={"reason": "recount", "reviewer": "cy"}).json()
    assert reopened["status"] == "open" and [e["action"] for e in reopened["events"]] == ["create", "sign-off", "reopen"]

    # exports: one sample, and the whole store
    r = lab.get(f"/samples/{s['id']}/export", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert f'filename="leuko-{s["accession"]}.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == len(cell_images) and rows[0]["label"] == target and rows[0]["reviewed"] == "true"
    ev = list(csv.DictReader(io.StringIO(lab.get(f"/samples/{s['id']}/export", params={"what": "events"}).text)))
    assert [e["action"] for e in ev] == ["relabel", "accept"]
    doc = json.loads(lab.get(f"/samples/{s['id']}/export", params={"format": "json"}).content)
    assert doc["samples"][0]["accession"] == s["accession"] and len(doc["samples"][0]["review_events"]) == 2
    whole = lab.get("/export", params={"format": "csv"})
    assert whole.status_code == 200 and s["accession"] in whole.text
    assert s["accession"] in [x["accession"] for x in json.loads(lab.get("/export", params={"format": "json"}).content)["samples"]]


def test_bad_input_is_one_line_and_changes_nothing(lab: TestClient, cell_images: list[Path], tmp_path: Path) -> None:
    s = new_sample(lab)
    cid = lab.post(f"/samples/{s['id']}/cells", params={"reviewer": "ann"}, files=files_of(cell_images[:2])).json()["added"][0]["id"]
    before = lab.get(f"/samples/{s['id']}/export", params={"format": "json"}).json()["samples"]

    one_line(lab.post("/samples", json={"accession": s["accession"], "reviewer": "ann"}), 409, "exists already")
    one_line(lab.post("/samples", json={"accession": "a b/c", "reviewer": "ann"}), 422, "accession id must be")
    one_line(lab.post("/samples", json={"reviewer": "ann"}), 422, "accession: Field required")
    one_line(lab.get("/samples/424242"), 404, "no sample with id 424242")
    one_line(lab.get("/samples/abc"), 422, "sample_id: Input should be a valid integer")
    one_line(lab.post("/cells/424242/review", json={"action": "accept", "reviewer": "ann"}), 404, "no cell with id 424242")
    one_line(lab.get("/cells/424242/history"), 404, "no cell with id 424242")
    one_line(lab.get("/cells/424242/image"), 404, "no cell with id 424242")
    one_line(lab.post(f"/cells/{cid}/review", json={"action": "relabel", "label": "platelet", "reviewer": "ann"}), 422,
             "unknown label 'platelet'; the model's classes are")
    one_line(lab.post(f"/cells/{cid}/review", json={"action": "smash", "reviewer": "ann"}), 422, "action: Input should be")
    one_line(lab.post(f"/cells/{cid}/review", json={"action": "accept"}), 422, "say who you are")
    one_line(lab.post(f"/samples/{s['id']}/sign-off", json={}), 422, "say who you are")
    one_line(lab.post(f"/samples/{s['id']}/reopen", json={"reason": "x", "reviewer": "ann"}), 409, "is open")
    one_line(lab.post("/samples/424242/cells", params={"reviewer": "ann"}, files=files_of(cell_images[:1])), 404, "no sample")
    # oversized, not an image, one bad file among good ones: refused whole
    huge = ("files", ("huge.jpg", b"\xff\xd8" + b"0" * 300_000, "image/jpeg"))
    one_line(lab.post(f"/samples/{s['id']}/cells", params={"reviewer": "ann"}, files=[huge]), 413, "huge.jpg: file larger than")
    one_line(lab.post(f"/samples/{s['id']}/cells", params={"reviewer": "ann"},
                      files=files_of(cell_images[2:4]) + [("files", ("notes.jpg", b"hello", "image/jpeg"))]), 415, "notes.jpg: not an image")
    one_line(lab.post(f"/samples/{s['id']}/cells", params={"reviewer": "ann"}, files=files_of(cell_images * 2)), 413, "too many files")
    one_line(lab.post(f"/samples/{s['id']}/cells", files=files_of(cell_images[2:3])), 422, "say who you are")
    one_line(lab.get("/export", params={"format": "xml"}), 422, "format: Input should be 'csv' or 'json'")
    after = lab.get(f"/samples/{s['id']}/export", params={"format": "json"}).json()["samples"]
    assert after == before


def test_stateless_service_has_no_samples(serve_run: Path) -> None:
    with TestClient(create_app(serve_run)) as c:
        assert c.get("/whoami").json() == {"store": False, "auth": False, "reviewer": None, "model": None}
        assert c.get("/samples").status_code == 404
        assert not any(path.startswith(("/samples", "/cells", "/export")) for path in c.get("/openapi.json").json()["paths"])


# --------------------------------------------------------------------------- auth
@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("auth") / "tokens.txt"
    return path, {name: add_token(path, name) for name in ("Ann Smith", "Bob")}


@pytest.fixture(scope="module")
def secured(serve_run: Path, tokens: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("lab-auth") / "lab.db"
    with TestClient(create_app(serve_run, store=db, auth=tokens[0])) as c:
        yield c


def test_tokens_are_stored_hashed(tokens: tuple[Path, dict[str, str]]) -> None:
    path, issued = tokens
    text = path.read_text()
    for name, tok in issued.items():
        assert tok not in text and f"sha256:{token_hash(tok)} {name}" in text
    auth = TokenAuth.load(path)
    assert auth.reviewer(issued["Bob"]) == "Bob" and auth.reviewer("guess") is None


@pytest.mark.parametrize("content, match", [
    ("Bob s3cret-token\n", "line 1: expected 'sha256:<64 hex digits> NAME' .tokens are stored hashed"),
    ("# only a comment\n", "no tokens in the file"),
    (f"sha256:{'a' * 64} Ann\nsha256:{'a' * 64} Bob\n", "line 2: the same token is listed twice"),
])
def test_bad_tokens_file_one_line(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "t").write_text(content)
    with pytest.raises(LeukoError, match=match):
        TokenAuth.load(tmp_path / "t")
    with pytest.raises(LeukoError, match="no tokens file"):
        TokenAuth.load(tmp_path / "missing")


def test_every_call_needs_a_token_and_the_token_names_the_reviewer(secured: TestClient, tokens: tuple[Path, dict[str, str]],
                                                                  cell_images: list[Path]) -> None:
    issued = tokens[1]
    ann = {"Authorization": f"Bearer {issued['Ann Smith']}"}
    bob = {"Authorization": f"Bearer {issued['Bob']}"}
    for method, path in [("get", "/samples"), ("get", "/model"), ("get", "/health"), ("post", "/predict"), ("get", "/export"),
                         ("get", "/openapi.json"), ("get", "/whoami")]:
        one_line(getattr(secured, method)(path), 401, "needs a reviewer's token")
    one_line(secured.get("/samples", headers={"Authorization": "Bearer nobody-has-this"}), 401, "unknown token")
    one_line(secured.get("/samples", headers={"Authorization": "Basic YWxhZGRpbjpvcGVu"}), 401, "must be 'Bearer TOKEN'")
    assert secured.get("/").status_code == 200 and secured.get("/static/app.js").status_code == 200  # the page loads, then logs in

    assert secured.get("/whoami", headers=ann).json()["reviewer"] == "Ann Smith"
    r = secured.post("/samples", json={"accession": "AUTH-1"}, headers=ann)
    assert r.status_code == 201 and r.json()["created_by"] == "Ann Smith"
    sid = r.json()["id"]
    one_line(secured.post("/samples", json={"accession": "AUTH-2", "reviewer": "Bob"}, headers=ann), 403,
             "this token is Ann Smith's; a request cannot act as 'Bob'")
    cells = secured.post(f"/samples/{sid}/cells", files=files_of(cell_images[:2]), headers=bob).json()["added"]
    assert cells[0]["added_by"] == "Bob"
    one_line(secured.post(f"/cells/{cells[0]['id']}/review", json={"action": "accept", "reviewer": "Ann Smith"}, headers=bob), 403,
             "cannot act as 'Ann Smith'")
    ev = secured.post(f"/cells/{cells[0]['id']}/review", json={"action": "accept", "reviewer": "Bob"}, headers=bob).json()["event"]
    assert ev["reviewer"] == "Bob"
    assert secured.post(f"/samples/{sid}/sign-off", headers=ann).json()["signed_off_by"] == "Ann Smith"
    assert [e["reviewer"] for e in secured.get(f"/cells/{cells[0]['id']}/history", headers=ann).json()["events"]] == ["Bob"]
    spec = secured.get("/openapi.json", headers=ann).json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer" and spec["security"] == [{"bearer": []}]


def test_listening_beyond_loopback_needs_auth(serve_run: Path) -> None:
    from leuko.serve import serve

    with pytest.raises(LeukoError, match=r"^refusing to listen on 0\.0\.0\.0 without --auth: .*--insecure"):
        serve(serve_run, host="0.0.0.0", port=8000)
    with pytest.raises(LeukoError, match="model not found"):  # --insecure passes that check (and then the model is missing)
        serve("/definitely/not/here", host="0.0.0.0", port=0, insecure=True, db=None)
