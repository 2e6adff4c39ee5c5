"""``leuko data fetch``: downloads against a real HTTP server on 127.0.0.1.

The server is ``http.server`` in a thread on port 0, serving archives built in
``tmp_path``; it can cut a transfer after N bytes, ignore ``Range`` or answer
404, so resume, restart and error paths run over real sockets. A guard makes
any connection to another host fail, so no test can reach the real network.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from leuko.data import fetch
from leuko.data.fetch import (
    MARKER_NAME,
    RemoteDataset,
    fetch_dataset,
    fetched_path,
    get_remote_dataset,
    list_remote_datasets,
    member_parts,
    read_fetch_marker,
)
from leuko.errors import LeukoError

PBC_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte")
PREFIX = {"basophil": "BA", "eosinophil": "EO", "lymphocyte": "LY", "monocyte": "MO"}


# --------------------------------------------------------------------------- fixtures


@dataclass
class ServerState:
    """What the handler serves and how it misbehaves; what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    cut_after: int = 0  # bytes sent before hanging up, while cuts_left > 0
    cuts_left: int = 0
    hangups_left: int = 0  # requests answered by closing the socket, no status line
    requests: list[dict[str, str | None]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    state: ServerState  # set on the subclass per server

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        st = self.state
        rng = self.headers.get("Range")
        st.requests.append({"path": self.path, "range": rng})
        if st.hangups_left > 0:
            st.hangups_left -= 1
            self.close_connection = True
            return
        data = st.files.get(self.path.split("?", 1)[0])
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and st.honour_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if st.cuts_left > 0:  # announce everything, send part, hang up
            st.cuts_left -= 1
            self.wfile.write(body[: st.cut_after])
            self.close_connection = True
            return
        self.wfile.write(body)


@dataclass
class LocalServer:
    state: ServerState
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, data: bytes) -> str:
        self.state.files[path] = data
        return self.url(path)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Cache under tmp_path, no retry sleeps, and no connection to anything but 127.0.0.1."""
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "_RETRY_DELAY", 0.0)
    real = socket.create_connection

    def local_only(address, *args, **kwargs):  # type: ignore[no-untyped-def]
        if address[0] not in ("127.0.0.1", "localhost"):
            raise OSError(f"test tried to reach the network: {address!r}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", local_only)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    state = ServerState()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield LocalServer(state, httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def pbc_zip() -> bytes:
    """A tiny PBC-like archive: PBC_dataset_normal_DIB/<class>/<PREFIX>_<id>.jpg, plus macOS litter."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("PBC_dataset_normal_DIB/", b"")
        for i, cls in enumerate(PBC_CLASSES):
            for j in range(2):
                zf.writestr(f"PBC_dataset_normal_DIB/{cls}/{PREFIX[cls]}_{100 + j}.jpg", _jpeg(10 * i + j))
        zf.writestr("__MACOSX/PBC_dataset_normal_DIB/basophil/._BA_100.jpg", b"\x00\x05\x16\x07junk")
    data = buf.getvalue()
    assert len(data) > 4000  # big enough to cut in several places
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _register(monkeypatch: pytest.MonkeyPatch, **kw: object) -> RemoteDataset:
    """A throw-away registry entry (what a test needs that no real entry has, e.g. a known sha256)."""
    base: dict[str, object] = dict(
        name="tiny", title="tiny test set", citation="-", licence="-", page="http://127.0.0.1/page",
        filename="tiny.zip", archive="zip", layout="pbc",
    )
    base.update(kw)
    ds = RemoteDataset(**base)  # type: ignore[arg-type]
    monkeypatch.setitem(fetch._REGISTRY, ds.name, ds)
    return ds


# --------------------------------------------------------------------------- success


def test_fetch_pbc_extracts_records_checksum_and_reads_as_pbc(server: LocalServer, pbc_zip: bytes, tmp_path: Path) -> None:
    url = server.serve("/PBC_dataset_normal_DIB.zip", pbc_zip)

    folder = fetch_dataset("pbc", url=url, progress=False)

    assert folder == tmp_path / "cache" / "datasets" / "pbc"
    assert sorted(p.name for p in (folder / "PBC_dataset_normal_DIB").iterdir()) == sorted(PBC_CLASSES)
    assert not (folder / "__MACOSX").exists()  # resource forks are not data
    assert not (folder / "PBC_dataset_normal_DIB.zip").exists()  # archive removed once unpacked
    assert not list(folder.glob("*.part")) and not (folder / ".leuko-extract").exists()
    marker = read_fetch_marker(folder)
    assert marker is not None
    assert marker["sha256"] == _sha256(pbc_zip) and marker["bytes"] == len(pbc_zip)
    assert marker["checksum_verified"] is None  # Mendeley publishes none: recorded, not verified
    assert marker["source_url"] == url and marker["layout"] == "pbc"
    assert marker["contents"] == ["PBC_dataset_normal_DIB"]
    assert fetched_path("pbc") == folder

    from leuko.data import load_dataset

    index = load_dataset(folder, "pbc")
    assert len(index.samples) == 8 and sorted(index.classes) == sorted(PBC_CLASSES)


def test_published_checksum_is_verified_and_plain_file_kept(server: LocalServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    payload = b"\x93NUMPY" + bytes(range(256)) * 20
    _register(monkeypatch, filename="tiny.npz", archive="npz", sha256=_sha256(payload),
              urls=(server.serve("/tiny.npz", payload),))

    folder = fetch_dataset("tiny", progress=False)

    assert (folder / "tiny.npz").read_bytes() == payload
    marker = read_fetch_marker(folder)
    assert marker is not None and marker["checksum_verified"] == "sha256" and marker["contents"] == ["tiny.npz"]


def test_dest_argument_is_the_dataset_folder(server: LocalServer, pbc_zip: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "elsewhere" / "my-pbc"
    folder = fetch_dataset("pbc", dest, url=server.serve("/p.zip", pbc_zip), progress=False)
    assert folder == dest and (dest / "PBC_dataset_normal_DIB" / "monocyte").is_dir()
    assert fetched_path("pbc") is None  # the cache was not touched


def test_already_fetched_returns_at_once_and_force_fetches_again(server: LocalServer, pbc_zip: bytes) -> None:
    url = server.serve("/p.zip", pbc_zip)
    folder = fetch_dataset("pbc", url=url, progress=False)
    (folder / "my-notes.txt").write_text("user file")  # not ours: force must keep it
    n = len(server.state.requests)

    assert fetch_dataset("pbc", url=url, progress=False) == folder
    assert len(server.state.requests) == n  # no request at all

    stale = folder / "PBC_dataset_normal_DIB" / "basophil" / "stale.jpg"
    stale.write_bytes(b"old")
    assert fetch_dataset("pbc", url=url, progress=False, force=True) == folder
    assert len(server.state.requests) == n + 1
    assert not stale.exists()  # the previous fetch's contents were replaced
    assert (folder / "my-notes.txt").read_text() == "user file"


def test_progress_bar_runs(server: LocalServer, pbc_zip: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    fetch_dataset("pbc", url=server.serve("/p.zip", pbc_zip), progress=True)
    assert capsys.readouterr().out == ""  # the bar goes to stderr, stdout stays clean


def test_mirrors_are_tried_in_order(server: LocalServer, monkeypatch: pytest.MonkeyPatch, pbc_zip: bytes) -> None:
    good = server.serve("/mirror/tiny.zip", pbc_zip)
    _register(monkeypatch, urls=(server.url("/gone/tiny.zip"), good), sha256=_sha256(pbc_zip))

    folder = fetch_dataset("tiny", progress=False)

    assert [r["path"] for r in server.state.requests] == ["/gone/tiny.zip", "/mirror/tiny.zip"]
    assert read_fetch_marker(folder)["source_url"] == good  # type: ignore[index]


# --------------------------------------------------------------------------- resume


def test_interrupted_transfer_resumes_with_range(server: LocalServer, pbc_zip: bytes) -> None:
    cut = 1500
    server.state.cut_after, server.state.cuts_left = cut, 1
    url = server.serve("/p.zip", pbc_zip)

    folder = fetch_dataset("pbc", url=url, progress=False)

    ranges = [r["range"] for r in server.state.requests]
    assert ranges == [None, f"bytes={cut}-"]
    assert read_fetch_marker(folder)["sha256"] == _sha256(pbc_zip)  # type: ignore[index]
    assert len(list((folder / "PBC_dataset_normal_DIB").rglob("*.jpg"))) == 8


def test_connection_dropped_before_headers_is_retried(server: LocalServer, pbc_zip: bytes) -> None:
    server.state.hangups_left = 2
    folder = fetch_dataset("pbc", url=server.serve("/p.zip", pbc_zip), progress=False)
    assert len(server.state.requests) == 3
    assert read_fetch_marker(folder)["sha256"] == _sha256(pbc_zip)  # type: ignore[index]


def test_part_left_by_an_earlier_run_is_resumed(server: LocalServer, monkeypatch: pytest.MonkeyPatch, pbc_zip: bytes, tmp_path: Path) -> None:
    _register(monkeypatch, urls=(server.serve("/tiny.zip", pbc_zip),), sha256=_sha256(pbc_zip))
    dest = tmp_path / "cache" / "datasets" / "tiny"
    dest.mkdir(parents=True)
    (dest / "tiny.zip.part").write_bytes(pbc_zip[:1234])

    fetch_dataset("tiny", progress=False)

    assert [r["range"] for r in server.state.requests] == ["bytes=1234-"]
    assert read_fetch_marker(dest)["checksum_verified"] == "sha256"  # type: ignore[index]


def test_server_ignoring_range_restarts_cleanly(server: LocalServer, monkeypatch: pytest.MonkeyPatch, pbc_zip: bytes, tmp_path: Path) -> None:
    server.state.honour_range = False
    _register(monkeypatch, urls=(server.serve("/tiny.zip", pbc_zip),), sha256=_sha256(pbc_zip))
    dest = tmp_path / "cache" / "datasets" / "tiny"
    dest.mkdir(parents=True)
    (dest / "tiny.zip.part").write_bytes(b"X" * 999)  # would corrupt the file if appended to

    fetch_dataset("tiny", progress=False)

    assert [r["range"] for r in server.state.requests] == ["bytes=999-"]  # asked, got a 200
    assert read_fetch_marker(dest)["sha256"] == _sha256(pbc_zip)  # type: ignore[index]


def test_part_longer_than_file_restarts_after_416(server: LocalServer, monkeypatch: pytest.MonkeyPatch, pbc_zip: bytes, tmp_path: Path) -> None:
    _register(monkeypatch, urls=(server.serve("/tiny.zip", pbc_zip),), sha256=_sha256(pbc_zip))
    dest = tmp_path / "cache" / "datasets" / "tiny"
    dest.mkdir(parents=True)
    (dest / "tiny.zip.part").write_bytes(b"X" * (len(pbc_zip) + 10))

    fetch_dataset("tiny", progress=False)

    assert [r["range"] for r in server.state.requests] == [f"bytes={len(pbc_zip) + 10}-", None]
    assert read_fetch_marker(dest)["checksum_verified"] == "sha256"  # type: ignore[index]


def test_connection_that_keeps_dropping_keeps_the_part_and_says_how_to_resume(server: LocalServer, pbc_zip: bytes, tmp_path: Path) -> None:
    server.state.cut_after, server.state.cuts_left = 300, 99
    with pytest.raises(LeukoError) as err:
        fetch_dataset("pbc", url=server.serve("/p.zip", pbc_zip), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "resumes" in msg and "by hand" in msg
    part = tmp_path / "cache" / "datasets" / "pbc" / "PBC_dataset_normal_DIB.zip.part"
    assert part.read_bytes() == pbc_zip[: 300 * fetch._MAX_ATTEMPTS]
    assert read_fetch_marker(part.parent) is None

    server.state.cuts_left = 0  # the network is back: the next run finishes from there
    fetch_dataset("pbc", url=server.url("/p.zip"), progress=False)
    assert server.state.requests[-1]["range"] == f"bytes={300 * fetch._MAX_ATTEMPTS}-"
    assert read_fetch_marker(part.parent)["sha256"] == _sha256(pbc_zip)  # type: ignore[index]


# --------------------------------------------------------------------------- failures


def test_checksum_mismatch_deletes_download_and_names_both_sums(server: LocalServer, tmp_path: Path) -> None:
    payload = b"not the real bloodmnist" * 50
    with pytest.raises(LeukoError) as err:
        fetch_dataset("bloodmnist", url=server.serve("/bloodmnist.npz", payload), progress=False)
    msg = str(err.value)
    assert "7053d0359d879ad8a5505303e11de1dc" in msg and hashlib.md5(payload).hexdigest() in msg
    assert "\n" not in msg
    assert not (tmp_path / "cache" / "datasets" / "bloodmnist").exists()  # nothing half-done left


def test_network_error_is_one_line_with_the_manual_route(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LeukoError) as err:
        fetch_dataset("pbc", url=f"http://127.0.0.1:{port}/x.zip", progress=False, timeout=2)
    msg = str(err.value)
    assert "\n" not in msg and "could not download pbc" in msg
    assert "https://data.mendeley.com/datasets/snkd93bnjr/1" in msg and "--url" in msg
    assert not (tmp_path / "cache" / "datasets" / "pbc").exists()


def test_http_error_is_reported(server: LocalServer) -> None:
    with pytest.raises(LeukoError, match="HTTP 404"):
        fetch_dataset("pbc", url=server.url("/missing.zip"), progress=False)


def test_web_page_instead_of_zip_is_rejected(server: LocalServer, tmp_path: Path) -> None:
    with pytest.raises(LeukoError, match="not a valid zip archive"):
        fetch_dataset("pbc", url=server.serve("/login", b"<html>please sign in</html>"), progress=False)
    assert not (tmp_path / "cache" / "datasets" / "pbc").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil.txt", "PBC_dataset_normal_DIB/../../evil.txt", "..\\evil.txt", "C:/evil.txt"])
def test_zip_member_escaping_the_folder_is_rejected(server: LocalServer, tmp_path: Path, evil: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("PBC_dataset_normal_DIB/basophil/BA_1.jpg", _jpeg(1))
        zf.writestr(zipfile.ZipInfo(evil), b"pwned")
    with pytest.raises(LeukoError, match="refusing to unpack") as err:
        fetch_dataset("pbc", url=server.serve("/evil.zip", buf.getvalue()), progress=False)
    assert repr(evil) in str(err.value)
    assert not (tmp_path / "cache" / "datasets" / "pbc").exists()  # not even the safe member
    assert not list(tmp_path.rglob("evil.txt"))


def test_never_overwrites_a_folder_it_did_not_create(server: LocalServer, pbc_zip: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    own = dest / "PBC_dataset_normal_DIB" / "keep.txt"
    own.parent.mkdir(parents=True)
    own.write_text("mine")
    with pytest.raises(LeukoError, match="already exists"):
        fetch_dataset("pbc", dest, url=server.serve("/p.zip", pbc_zip), progress=False)
    assert own.read_text() == "mine" and sorted(p.name for p in dest.iterdir()) == ["PBC_dataset_normal_DIB"]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(LeukoError) as err:
        fetch_dataset("imagenet", progress=False)
    msg = str(err.value)
    assert "'imagenet'" in msg
    for name in ("pbc", "bloodmnist", "mooney", "cnmc", "bccd", "bccd-wbc", "raabin-wbc"):
        assert name in msg


@pytest.mark.parametrize(
    ("name", "layout", "page", "why", "root"),
    [
        ("mooney", "mooney", "https://www.kaggle.com/datasets/paultimothymooney/blood-cells", "login", ""),
        ("bccd-wbc", "folder", "https://www.kaggle.com/datasets/brikwerk/bccd-white-blood-cell", "login", ""),
        ("cnmc", "cnmc", "https://www.cancerimagingarchive.net/collection/c-nmc-2019/", "login", ""),
        ("bccd", "bccd", "https://github.com/Shenggan/BCCD_Dataset", "login", ""),
        ("raabin-wbc", "folder", "https://raabindata.com/free-data/", "no download address", "/TestA"),
    ],
)
def test_manual_only_datasets_give_precise_steps(name: str, layout: str, page: str, why: str, root: str, tmp_path: Path) -> None:
    with pytest.raises(LeukoError) as err:
        fetch_dataset(name, url="http://127.0.0.1:9/ignored.zip", progress=False)
    msg = str(err.value)
    first = msg.splitlines()[0]
    assert first.startswith(name) and why in first
    dest = tmp_path / "cache" / "datasets" / name
    assert str(dest) in msg and page in msg
    assert f"leuko data inspect {dest}{root}" in msg and f"--layout {layout}" in msg and "--data" in msg
    assert not dest.exists()
    custom = tmp_path / "somewhere"
    with pytest.raises(LeukoError) as err2:
        fetch_dataset(name, custom, progress=False)
    assert str(custom) in str(err2.value)


# --------------------------------------------------------------------------- registry and helpers


def test_registry_points_at_official_sources() -> None:
    names = [d.name for d in list_remote_datasets()]
    assert names[:3] == ["bloodmnist", "bloodmnist-224", "pbc"]  # downloadable first
    pbc = get_remote_dataset("PBC")
    assert pbc.urls[0].startswith("https://data.mendeley.com/public-files/datasets/snkd93bnjr/")
    assert pbc.filename == "PBC_dataset_normal_DIB.zip" and pbc.archive == "zip" and pbc.layout == "pbc"
    assert pbc.checksum is None  # none is published; none is invented
    blood = get_remote_dataset("bloodmnist")
    assert blood.checksum == ("md5", "7053d0359d879ad8a5505303e11de1dc")
    assert all(u.startswith("https://zenodo.org/records/") for u in blood.urls)
    assert get_remote_dataset("bloodmnist-224").filename == "bloodmnist_224.npz"
    for d in list_remote_datasets():
        assert d.manual_only == (d.manual is not None), d.name
        assert d.citation and d.licence and d.page.startswith("https://")


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b.jpg", ["a", "b.jpg"]),
        ("./a//b/", ["a", "b"]),
        ("../x", None),
        ("a/../../x", None),
        ("a\\..\\x", None),
        ("/etc/passwd", None),
        ("\\\\server\\share", None),
        ("D:x", None),
    ],
)
def test_member_parts(name: str, parts: list[str] | None) -> None:
    assert member_parts(name) == parts


def test_unreadable_marker_counts_as_not_fetched(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "datasets" / "pbc"
    folder.mkdir(parents=True)
    (folder / MARKER_NAME).write_text("{not json")
    assert read_fetch_marker(folder) is None and fetched_path("pbc") is None
    (folder / MARKER_NAME).write_text(json.dumps({"name": "pbc"}))
    assert fetched_path("pbc") == folder
