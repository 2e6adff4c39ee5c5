"""The HTTP API through an in-process client: every endpoint, every refusal, the OpenAPI description."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from leuko.infer import load_predictor
from leuko.serve import UploadLimits, create_app
from leuko.serve.count import wilson_interval


@pytest.fixture(scope="module")
def client(serve_run: Path) -> Iterator[TestClient]:
    limits = UploadLimits(max_files=20, max_file_bytes=200_000, max_request_bytes=1_000_000, max_pixels=1_000_000)
    with TestClient(create_app(serve_run, limits=limits)) as c:
        yield c


def files_of(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 100, 150)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- endpoints
def test_health(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["backend"] == "pytorch"


def test_model_describes_run(client: TestClient, serve_run: Path) -> None:
    r = client.get("/model")
    assert r.status_code == 200
    m = r.json()
    meta = load_predictor(serve_run).meta
    assert m["classes"] == json.loads((serve_run / "classes.json").read_text()) == meta["classes"]
    assert m["input"]["image_size"] == 32 and m["input"]["mean"] == meta["input"]["mean"]
    assert m["temperature"] == pytest.approx(meta["temperature"])
    assert m["architecture"]["name"] == "custom_cnn"
    # the review policy was chosen on the run's validation split, and /model says so
    assert m["review"]["policy"]["threshold"] == pytest.approx(meta["review"]["threshold"])
    assert "validation split" in m["review"]["description"] and "chosen on" in m["review"]["description"]
    data = json.loads((serve_run / "data.json").read_text())
    assert m["training_data"]["counts"] == data["counts"]
    evaluated = json.loads((serve_run / "eval" / "test" / "metrics.json").read_text())
    assert m["held_out"]["test"]["accuracy"] == pytest.approx(evaluated["accuracy"])
    assert m["held_out"]["test"]["n"] == evaluated["n"] > 0
    assert m["explain"] is True
    assert m["limits"]["max_files"] == 20


def test_predict_matches_predictor(client: TestClient, serve_run: Path, cell_images: list[Path]) -> None:
    r = client.post("/predict", files=files_of(cell_images), params={"top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [x["name"] for x in results] == [p.name for p in cell_images]
    # same numbers as the Python API on the same files (in-memory decode == file decode)
    ref = load_predictor(serve_run).predict_paths(cell_images)
    classes = body["classes"]
    for res, probs in zip(results, ref.probs):
        got = np.array([res["probs"][c] for c in classes])
        assert got.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(got, probs, atol=1e-5)
        assert res["label"] == classes[int(np.argmax(probs))]
        assert res["confidence"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert len(res["top_k"]) == 2 and res["top_k"][0]["label"] == res["label"]
        assert res["top_k"][0]["prob"] >= res["top_k"][1]["prob"]
        assert res["review"] == bool(res["review_reasons"])


def test_review_flag_follows_policy(client: TestClient, serve_run: Path, cell_images: list[Path]) -> None:
    pred = load_predictor(serve_run)
    ref = pred.predict_paths(cell_images)
    expected = pred.review_policy.reasons(ref.logits, ref.probs, pred.temperature)
    results = client.post("/predict", files=files_of(cell_images)).json()["results"]
    assert [r["review_reasons"] for r in results] == expected


def test_count(client: TestClient, cell_images: list[Path]) -> None:
    r = client.post("/count", files=files_of(cell_images))
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["n_cells"] == len(cell_images)
    labels = [cell["label"] for cell in c["cells"]]
    assert sum(row["count"] for row in c["counts"]) == len(cell_images)
    for row in c["counts"]:
        k = labels.count(row["label"])
        assert row["count"] == k
        assert row["percent"] == pytest.approx(100 * k / len(cell_images))
        lo, hi = wilson_interval(k, len(cell_images))
        assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((100 * lo, 100 * hi))
        assert row["ci95_low"] <= row["percent"] <= row["ci95_high"]
    assert c["n_review"] == sum(cell["review"] for cell in c["cells"])
    assert "100 cells" in c["note"]


def test_count_labels(client: TestClient) -> None:
    classes = client.get("/model").json()["classes"]
    labels = [classes[0]] * 60 + [classes[1]] * 40 + [classes[2]] * 20
    r = client.post("/count/labels", json={"labels": labels, "review": [True] * 3 + [False] * 117})
    assert r.status_code == 200
    c = r.json()
    assert c["n_cells"] == 120 and c["n_review"] == 3 and c["note"] is None
    rows = {row["label"]: row for row in c["counts"]}
    assert rows[classes[0]]["percent"] == pytest.approx(50.0)
    # Wilson 95% interval for 60/120 (hand-checked): 41.2%-58.8%
    assert rows[classes[0]]["ci95_low"] == pytest.approx(41.19, abs=0.01)
    assert rows[classes[0]]["ci95_high"] == pytest.approx(58.81, abs=0.01)
    assert rows[classes[3]]["count"] == 0 and rows[classes[3]]["ci95_low"] == 0.0
    assert rows[classes[3]]["ci95_high"] == pytest.approx(3.10, abs=0.01)
    bad = client.post("/count/labels", json={"labels": ["platelet"]})
    assert bad.status_code == 422 and "platelet" in bad.json()["detail"]
    bad = client.post("/count/labels", json={"labels": [classes[0]], "review": [True, False]})
    assert bad.status_code == 422 and "review has 2 entries for 1 labels" in bad.json()["detail"]


def test_explain_png(client: TestClient, cell_images: list[Path]) -> None:
    p = cell_images[0]
    r = client.post("/explain", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "PNG" and im.width > 64 and im.height > 64
    classes = client.get("/model").json()["classes"]
    assert r.headers["x-leuko-label"] in classes
    assert 0.0 <= float(r.headers["x-leuko-confidence"]) <= 1.0
    r = client.post("/explain", params={"target": classes[2]}, files={"file": (p.name, p.read_bytes(), "image/jpeg")})
    assert r.status_code == 200 and r.headers["x-leuko-label"] == classes[2]
    r = client.post("/explain", params={"target": "platelet"}, files={"file": (p.name, p.read_bytes(), "image/jpeg")})
    assert r.status_code == 422 and "platelet" in r.json()["detail"]


def test_onnx_model_serves_and_refuses_explain(serve_run: Path, cell_images: list[Path]) -> None:
    with TestClient(create_app(serve_run / "model.onnx")) as c:
        m = c.get("/model").json()
        assert m["backend"] == "onnxruntime" and m["explain"] is False
        assert m["held_out"]["test"]["n"] > 0  # model.onnx sits in its run folder
        onnx = c.post("/predict", files=files_of(cell_images[:4])).json()["results"]
        r = c.post("/explain", files={"file": (cell_images[0].name, cell_images[0].read_bytes(), "image/jpeg")})
        assert r.status_code == 400 and "not available for ONNX models" in r.json()["detail"]
    ref = load_predictor(serve_run).predict_paths(cell_images[:4])
    got = np.array([[res["probs"][cl] for cl in m["classes"]] for res in onnx])
    np.testing.assert_allclose(got, ref.probs, atol=1e-4)


def test_page_and_assets_are_local(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html
        a = client.get(asset)
        assert a.status_code == 200 and len(a.content) > 1000
        text = a.text.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace is a name, not a fetch
        assert "http://" not in text and "https://" not in text
    assert "https://" not in html and "http://" not in html
    # FastAPI's Swagger/ReDoc pages would load from a CDN: they are off
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/health", "get"), ("/model", "get"), ("/predict", "post"), ("/explain", "post"),
        ("/count", "post"), ("/count/labels", "post"), ("/whoami", "get"),
    }
    assert {(p, m) for p, ops in paths.items() for m in ops} == expected
    for path, method in expected:
        op = paths[path][method]
        assert "200" in op["responses"], path
        if method == "post":
            content = op["requestBody"]["content"]
            if path == "/count/labels":
                assert "application/json" in content
                continue
            schema = content["multipart/form-data"]["schema"]
            field = "file" if path == "/explain" else "files"
            assert schema["required"] == [field]
            prop = schema["properties"][field]
            assert (prop["items"] if path != "/explain" else prop)["format"] == "binary"
            for code in ("413", "415", "422"):
                assert code in op["responses"], (path, code)
    assert paths["/explain"]["post"]["responses"]["200"]["content"] == {"image/png": {}}
    ok = paths["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/PredictResponse")
    assert "ModelInfo" in spec["components"]["schemas"] and "CountResponse" in spec["components"]["schemas"]


# --------------------------------------------------------------------------- refusals
def test_too_many_files_413(client: TestClient, cell_images: list[Path]) -> None:
    r = client.post("/predict", files=files_of(cell_images * 2))  # 24 > 20
    assert r.status_code == 413
    assert r.json()["detail"] == "too many files: at most 20 image(s) per request"
    r = client.post("/explain", files=files_of(cell_images[:2]))
    assert r.status_code == 413 and "at most 1 image" in r.json()["detail"]


def test_file_too_large_413(client: TestClient) -> None:
    big = os.urandom(250_000)
    r = client.post("/predict", files=[("files", ("huge.jpg", big, "image/jpeg"))])
    assert r.status_code == 413
    assert r.json()["detail"] == "huge.jpg: file larger than the limit of 195 KiB per image"


def test_request_too_large_413(client: TestClient) -> None:
    parts = [("files", (f"p{i}.jpg", os.urandom(150_000), "image/jpeg")) for i in range(8)]  # 1.2 MB > 1 MB
    r = client.post("/predict", files=parts)
    assert r.status_code == 413
    assert r.json()["detail"].startswith("request body is 1.1 MiB; the limit is 977 KiB per request")
    # a lying (small) Content-Length does not help: the stream is counted as it arrives
    body = b"".join([b"--xx\r\nContent-Disposition: form-data; name=files; filename=a.png\r\n\r\n", os.urandom(1_100_000), b"\r\n--xx--\r\n"])
    r = client.post("/predict", content=body, headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 413


def test_decompression_bomb_413_before_decoding(client: TestClient) -> None:
    # 4000 x 4000 px of one colour compresses to a few kB; its header says 16 Mpx > 1 Mpx.
    bomb = png_bytes(4000, 4000)
    assert len(bomb) < 200_000
    r = client.post("/predict", files=[("files", ("bomb.png", bomb, "image/png"))])
    assert r.status_code == 413
    assert r.json()["detail"] == "bomb.png: 4000 x 4000 = 16,000,000 pixels; the limit is 1,000,000 per image"


def test_not_an_image_415(client: TestClient, cell_images: list[Path]) -> None:
    parts = files_of(cell_images[:2]) + [("files", ("notes.jpg", b"this is not an image\n", "image/jpeg"))]
    r = client.post("/predict", files=parts)
    assert r.status_code == 415
    assert r.json()["detail"].startswith("notes.jpg: not an image")
    # a format the service does not open (GIF) is refused the same way
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="GIF")
    r = client.post("/count", files=[("files", ("anim.gif", buf.getvalue(), "image/gif"))])
    assert r.status_code == 415 and r.json()["detail"].startswith("anim.gif: not an image")


def test_corrupt_and_empty_422(client: TestClient, cell_images: list[Path]) -> None:
    data = cell_images[0].read_bytes()
    r = client.post("/predict", files=[("files", ("cut.jpg", data[: len(data) // 2], "image/jpeg"))])
    assert r.status_code == 422
    assert r.json()["detail"].startswith("cannot decode cut.jpg:") and "truncated" in r.json()["detail"]
    r = client.post("/predict", files=[("files", ("empty.png", b"", "image/png"))])
    assert r.status_code == 422 and r.json()["detail"] == "empty.png: empty file (zero bytes)"
    # several bad files: every one is named
    r = client.post("/predict", files=[("files", ("a.png", b"", "image/png")), ("files", ("b.jpg", data[:100], "image/jpeg"))])
    assert r.status_code == 422 and "a.png" in r.json()["detail"] and "b.jpg" in r.json()["detail"]


def test_not_multipart_and_no_files(client: TestClient) -> None:
    r = client.post("/predict", content=b"\x89PNG...", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/predict", data={"note": "hello"}, files=[])
    assert r.status_code in (400, 415)
    r = client.post("/predict", content=b"--xx\r\nContent-Disposition: form-data; name=note\r\n\r\nhi\r\n--xx--\r\n",
                    headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 400 and "no image file" in r.json()["detail"]
    r = client.post("/predict", content=b"garbage without boundaries", headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 400


def test_filename_is_never_a_path(client: TestClient, cell_images: list[Path], tmp_path: Path) -> None:
    data = cell_images[0].read_bytes()
    evil = ["../../../../etc/passwd", "..\\..\\windows\\win.ini", "/tmp/x.jpg", ".."]
    before = set(os.listdir(tempfile.gettempdir()))
    r = client.post("/predict", files=[("files", (name, data, "image/jpeg")) for name in evil])
    assert r.status_code == 200, r.text
    assert [x["name"] for x in r.json()["results"]] == ["passwd", "win.ini", "x.jpg", "image-4"]
    assert set(os.listdir(tempfile.gettempdir())) == before  # nothing spooled to disk


def test_display_name() -> None:
    from leuko.serve.uploads import display_name

    assert display_name("a/b\\c\x00\x1b[31m.jpg", 0) == "c[31m.jpg"
    assert display_name("", 2) == "image-3" and display_name("dir/", 0) == "image-1"
    assert len(display_name("x" * 1000, 0)) == 200


def test_unknown_model_is_one_line_error(tmp_path: Path) -> None:
    from leuko.errors import LeukoError

    with pytest.raises(LeukoError, match="model not found"):
        create_app(tmp_path / "nope")


def test_limits_validated() -> None:
    from leuko.errors import LeukoError

    with pytest.raises(LeukoError, match="max_files must be at least 1"):
        UploadLimits(max_files=0)
