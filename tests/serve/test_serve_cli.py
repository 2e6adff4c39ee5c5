"""``leuko serve`` as a user meets it: options, and one-line errors before anything listens."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cells import call

from leuko.serve.server import is_loopback


def test_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert call(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--host" in out and "--port" in out and "127.0.0.1" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "/definitely/not/here"], "error: model not found: /definitely/not/here"),
        (["serve", "{run}", "--port", "70000"], "error: --port must be between 0 and 65535; got 70000"),
    ],
)
def test_bad_input_one_line(args: list[str], message: str, serve_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call([a.replace("{run}", str(serve_run)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1 and "Traceback" not in err


def test_port_in_use_one_line(serve_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert call(["serve", str(serve_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and len(err.splitlines()) == 1


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_help_lists_store_and_login_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert call(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--db" in out and "leuko-lab.db" in out and "--auth" in out and "--insecure" in out and "--images" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "{run}", "--host", "0.0.0.0"], "error: refusing to listen on 0.0.0.0 without --auth"),
        (["serve", "{run}", "--auth", "{tmp}/no-tokens.txt", "--port", "{port}"], "error: --auth: no tokens file"),
        (["serve", "{run}", "--db", "{tmp}/no/such/folder/lab.db", "--port", "{port}"], "error: --db"),
        (["serve", "{run}", "--db", "mysql://x@y/z", "--port", "{port}"], "error: --db: the store runs on SQLite"),
        (["data", "export-reviews", "{tmp}/nothing.db", "--out", "{tmp}/x"], "error: no store at"),
    ],
)
def test_store_and_login_errors_one_line(args: list[str], message: str, serve_run: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from serving import free_port

    monkeypatch.chdir(tmp_path)
    subs = {"{run}": str(serve_run), "{tmp}": str(tmp_path), "{port}": str(free_port())}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    assert call(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "leuko-lab.db").exists()  # a refused start leaves no database behind


def test_export_reviews_verb(serve_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from leuko.serve.store import ModelRef, NewCell, Store
    from leuko.serve.store.views import PredictionView

    db = tmp_path / "lab.db"
    with Store.open(db) as store:
        s = store.create_sample("V-1", "ann", ModelRef(name="m", fingerprint="f" * 64, classes=["a", "b"]))
        pred = PredictionView(label="a", confidence=0.9, probs={"a": 0.9, "b": 0.1}, review=False, review_reasons=[])
        png = (Path(__file__).parent / "conftest.py").read_bytes()  # any bytes: the store keeps them as given
        c = store.add_cells(s.id, [NewCell("x.png", png, "image/png", 1, 1, pred)], "ann", "f" * 64).added[0]
        store.review(c.id, "relabel", "bob", label="b")
        store.sign_off(s.id, "bob")
    assert call(["data", "export-reviews", str(db), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 reviewed cell(s) of 1 signed-off sample(s)" in out and "reviews.csv" in out
    assert (tmp_path / "out" / "reviews.csv").read_text().splitlines() == ["path,label,group", f"images/V-1/{c.id}.png,b,V-1"]
    assert call(["data", "export-reviews", str(db), "--out", str(tmp_path / "out")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
