"""The command line as a user meets it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cells import call
from leuko.cli import main


def run_cli(*args: str) -> tuple[int, str]:
    """Run ``leuko ARGS`` in a subprocess (the real entry point) and return (code, stdout+stderr)."""
    env = dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "leuko", *args], capture_output=True, text=True, env=env, timeout=300, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_help_lists_verbs() -> None:
    code, out = run_cli("--help")
    assert code == 0
    for verb in ("data", "models"):
        assert verb in out
    code, out = run_cli("data", "inspect", "--help")
    assert code == 0 and "--strict" in out and "--layout" in out


def test_inspect_bad_files_named_without_traceback(bad_tree: Path) -> None:
    code, out = run_cli("data", "inspect", str(bad_tree))
    assert code == 0, out
    assert "Traceback" not in out
    assert "a/truncated.jpg: truncated image" in out
    assert "b/notes.jpg: not an image" in out
    assert "b/empty.jpg: zero-byte file" in out
    assert "empty class folder: c_empty" in out
    code, out = run_cli("data", "inspect", str(bad_tree), "--strict")
    assert code != 0
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("error: --strict: 3 unusable file(s) and 1 empty class(es)")


@pytest.mark.parametrize(
    "args, message",
    [
        (("data", "inspect", "/definitely/not/here"), "error: dataset path does not exist"),
        (("data", "inspect", "{tmp}", "--layout", "nope"), "error: unknown layout 'nope'"),
        (("data", "inspect", "{tmp}"), "error: cannot tell the layout"),
    ],
)
def test_bad_inputs_one_line(tmp_path: Path, args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = tuple(a.replace("{tmp}", str(tmp_path)) for a in args)
    assert call(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message)
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_inspect_json(pbc_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(["data", "inspect", str(pbc_tree), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "pbc"
    assert report["class_counts"] == {"basophil": 3, "eosinophil": 3, "ig": 4, "neutrophil": 4}
    assert report["subtype_counts"]["neutrophil"] == {"BNE": 1, "NEUTROPHIL": 1, "SNE": 2}
    assert report["skipped"] == [["PBC_dataset_normal_DIB/neutrophil/.DS_1234.jpg", "not an image (unrecognised file content)"]]


def test_split_command_never_overwrites(tmp_path: Path, folder_tree: Path) -> None:
    out = tmp_path / "split.json"
    assert call(["data", "split", str(folder_tree), "--preset", "holdout-70-30", "--out", str(out)]) == 0
    first = out.read_text()
    assert call(["data", "split", str(folder_tree), "--preset", "holdout-80-20", "--out", str(out)]) == 2
    assert out.read_text() == first


@pytest.mark.shared
def test_inspect_real_pbc(shared_datasets: Path) -> None:
    code, out = run_cli("data", "inspect", str(shared_datasets / "pbc"))
    assert code == 0
    assert "5,966 usable samples" in out and "8 classes" in out
    assert "neutrophil/.DS_169665.jpg: not an image" in out
    assert "BNE 596" in out and "SNE 552" in out and "MMY 350" in out


@pytest.mark.shared
def test_inspect_real_bccd(shared_datasets: Path) -> None:
    code, out = run_cli("data", "inspect", str(shared_datasets / "bccd"), "--layout", "bccd")
    assert code == 0
    assert "neutrophil" in out and "eosinophil" in out
    assert "several cell types" in out and "no WBC box in the annotation" in out
