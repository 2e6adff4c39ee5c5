"""Every verb answers ``--help``; layout names in help come from the layout registry."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import typer.main

from leuko.cli import app, main
from leuko.cli.options import layouts_accepting
from leuko.data.layouts import list_layouts

ROOT = typer.main.get_command(app)


def _walk(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(argv prefix, command) for the root, every group and every verb, in help order."""
    found = [(path, cmd)]
    if getattr(cmd, "commands", None) is not None:
        for name in cmd.list_commands(None):
            found += _walk(cmd.commands[name], path + (name,))
    return found


COMMANDS = _walk(ROOT)
WITH_LAYOUT = [(p, c) for p, c in COMMANDS if any("--layout" in prm.opts for prm in c.params)]
WITH_MARGIN = [(p, c) for p, c in COMMANDS if any("--margin" in prm.opts for prm in c.params)]


def _ids(items: list) -> list[str]:
    return [" ".join(p) or "leuko" for p, _ in items]


def _help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        main([*path, "--help"])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr().out
    assert code == 0, out
    return " ".join(out.replace("│", " ").split())  # one line, whatever Rich wrapped


def test_verbs() -> None:
    top = ROOT.list_commands(None)
    assert top == ["train", "cv", "compare", "demo", "curve", "evaluate", "explain", "report", "predict", "export",
                   "evaluate-fields", "count", "adapt", "route", "ensemble", "finetune", "serve", "data", "models"]
    assert ROOT.commands["data"].list_commands(None) == ["layouts", "inspect", "split", "audit", "crops",
                                                         "export-reviews", "fetch"]
    assert WITH_LAYOUT and WITH_MARGIN


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=_ids(COMMANDS))
def test_every_help_exits_0(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert "Usage:" in _help(path, capsys)


@pytest.mark.parametrize("path, cmd", WITH_LAYOUT, ids=_ids(WITH_LAYOUT))
def test_layout_help_lists_registered_layouts(path: tuple[str, ...], cmd: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    names = [spec.name for spec in list_layouts()]
    assert len(names) >= 6
    option = next(prm for prm in cmd.params if "--layout" in prm.opts)
    assert all(name in option.help for name in names), option.help
    assert f"Dataset layout ({', '.join(names)}); detected when omitted." in _help(path, capsys)


@pytest.mark.parametrize("path, cmd", WITH_MARGIN, ids=_ids(WITH_MARGIN))
def test_margin_help_names_layouts_that_take_it(path: tuple[str, ...], cmd: Any) -> None:
    option = next(prm for prm in cmd.params if "--margin" in prm.opts)
    assert "bccd" in layouts_accepting("margin")
    assert option.help.startswith(", ".join(layouts_accepting("margin")) + ":")


def test_cli_import_stays_light() -> None:
    """``leuko --help`` (and predicting with an ONNX file) must not pay for torch."""
    code = "import sys, leuko.cli; bad = [m for m in ('torch', 'lightning', 'timm') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
