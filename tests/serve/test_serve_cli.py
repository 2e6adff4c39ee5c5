"""``leuko serve`` as a user meets it: options, and one-line errors before anything listens."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from leuko.cli import main
from leuko.serve.server import is_loopback


def call(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


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
