"""``leuko report``: a self-contained HTML file (and Markdown) of a tiny trained run, checked as files and in a browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from cells import call, make_cell, model_payload
from PIL import Image

from leuko.run.folder import RunFolder, load_model, save_model

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]
ADAPTED = {"data": "/labs/other-hospital/cells", "method": "batch-norm statistics", "images": 57}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frozen EfficientNet-Lite0 head on 120 cells with 20% wrong-looking labels (so there are mistakes).

    Twelve validation images, so a temperature is fitted; ``adapted`` is added to
    the model's metadata afterwards, as adaptation would.
    """
    from leuko.train import train

    base = tmp_path_factory.mktemp("report")
    root = base / "cells"
    for ci, cls in enumerate(CLASSES):
        for i in range(40):
            hue = 70 * ((ci + 1) % 3) if i % 5 == 0 else 70 * ci  # every fifth image looks like another class
            make_cell(root / cls / f"{cls[:3]}_{i}.png", size=(48, 48), seed=1000 * ci + i, hue=hue)
    out = base / "run"
    over = [
        "model.name=efficientnet_lite0",
        "model.pretrained=bundled",
        "model.freeze=backbone",
        "data.image_size=64",
        "data.num_workers=0",
        "train.epochs=15",
        "train.lr=0.01",
        "trainer.progress=false",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKO_CACHE_DIR", str(base / "cache"))
        train(None, out, overrides=over, data_path=root, echo=lambda s: None)
    model, meta = load_model(out)
    save_model(out / "model.pt", model, meta.with_(adapted=ADAPTED))
    return out


@pytest.fixture(scope="module")
def report(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``leuko report RUN --out .../r/report.html`` through the CLI (no evaluation exists yet: it runs one)."""
    import leuko.cli

    html = tmp_path_factory.mktemp("out") / "r" / "report.html"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(leuko.cli.console, "width", 400)
        buf = io.StringIO()
        # Patch the private slot: undoing a patch of the `file` property would pin the console to the stream
        # that was current here (pytest's capture of this test) and later tests' capsys would see nothing.
        mp.setattr(leuko.cli.console, "_file", buf)
        code = call(["report", str(run), "--out", str(html)])
    return {"code": code, "html": html, "stdout": buf.getvalue()}


def _metrics(run: Path) -> dict:
    return json.loads((run / "eval" / "test" / "metrics.json").read_text())


def test_cli_writes_html_markdown_and_figures(report: dict, run: Path) -> None:
    html: Path = report["html"]
    assert report["code"] == 0, report["stdout"]
    assert "evaluating the test split now" in report["stdout"]
    assert html.is_file() and html.with_suffix(".md").is_file()
    assert (html.parent / "report_files").is_dir()
    assert (run / "eval" / "test" / "metrics.json").is_file()  # the evaluation it ran is where evaluate puts it


def test_html_is_self_contained(report: dict) -> None:
    text = report["html"].read_text()
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", text, flags=re.I)
    assert refs, "expected images and in-page links"
    assert not [r for r in refs if re.match(r"\s*(https?:)?//", r, flags=re.I)]
    assert not re.search(r"<(script|link)\b", text, flags=re.I)
    assert "@import" not in text and "url(" not in text
    imgs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)
    assert len(imgs) >= 7  # curves, 2 confusion matrices, per-class, reliability, Grad-CAM correct + mistakes
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG_MAGIC
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.width > 100 and im.height > 50


def test_numbers_match_the_run(report: dict, run: Path) -> None:
    text = report["html"].read_text()
    m = _metrics(run)
    shown = re.search(r'data-metric="accuracy" data-value="([^"]+)">([^<]+)<', text)
    assert shown is not None
    assert float(shown.group(1)) == m["accuracy"] and shown.group(2) == f"{m['accuracy']:.4f}"
    meta = model_payload(run / "model.pt")
    t = re.search(r'data-metric="temperature" data-value="([^"]+)"', text)
    assert t is not None and float(t.group(1)) == pytest.approx(meta["temperature"]) and meta["temperature"] != 1.0
    summary = json.loads((run / "summary.json").read_text())["calibration"]
    v = re.search(r'data-metric="val_ece_after" data-value="([^"]+)"', text)
    assert v is not None and float(v.group(1)) == pytest.approx(summary["ece_after"])
    assert re.search(r'data-metric="ece_before" data-value="[0-9.e-]+"', text)  # test ECE before scaling, recovered
    for c in CLASSES:  # per-class F1 from metrics.json
        f1 = re.search(rf'data-metric="f1:{c}" data-value="([^"]+)"', text)
        assert f1 is not None and float(f1.group(1)) == pytest.approx(m["per_class"][c]["f1"])
    counts = json.loads((run / "data.json").read_text())["counts"]
    assert f"<td>{sum(counts['train'].values())}</td>" in text
    assert "model:\n  name: efficientnet_lite0" in text  # the config, verbatim
    assert ADAPTED["data"] in text and "batch-norm statistics" in text
    pairs = json.loads((run / "leakage.json").read_text())["train_vs_heldout_pairs"]
    assert 'id="leakage"' in text and f"<td>{pairs}</td>" in text
    wrong = pd.read_csv(run / "eval" / "test" / "predictions.csv").query("true != pred")
    assert len(wrong) > 0  # the fixture's label noise makes mistakes to show
    assert f"most confident of {len(wrong)} misclassified images" in text


def test_markdown_links_existing_pngs(report: dict) -> None:
    md_path: Path = report["html"].with_suffix(".md")
    md = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(re.findall(r"<img\b", report["html"].read_text()))
    for link in links:
        assert not link.startswith(("http:", "https:", "/"))
        target = md_path.parent / link
        assert target.is_file() and target.read_bytes()[:8] == PNG_MAGIC
    assert "| accuracy |" in md and "```yaml" in md


def test_existing_evaluation_is_reused(report: dict, run: Path) -> None:
    from leuko.reports.build import load_or_evaluate

    lines: list[str] = []
    ev = load_or_evaluate(RunFolder.open(run), echo=lines.append)
    assert ev.reused and lines == [f"reusing the evaluation in {run / 'eval' / 'test'}"]
    assert ev.metrics["accuracy"] == _metrics(run)["accuracy"]


def test_bad_out_is_one_line_error(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = call(["report", str(run), "--out", str(tmp_path / "report.pdf")])
    err = capsys.readouterr().err
    assert code == 2 and "must end in .html" in err and "Traceback" not in err
    code = call(["report", str(tmp_path / "nope")])
    assert code == 2 and "run folder not found" in capsys.readouterr().err


def _browser() -> tuple[str, object]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("needs Chromium (apt install chromium) for the real-browser check")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs the playwright Python package for the real-browser check")
    return exe, sync_playwright


def test_report_renders_in_headless_chromium(report: dict, tmp_path: Path) -> None:
    exe, sync_playwright = _browser()
    shot = tmp_path / "report.png"
    with sync_playwright() as p:  # type: ignore[operator]
        browser = p.chromium.launch(
            executable_path=exe,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report["html"].as_uri(), wait_until="load")
            loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
            heading = page.inner_text("h1")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(loaded) >= 7 and all(loaded)
    assert heading.startswith("leuko run report")
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing from the network
    with Image.open(shot) as im:
        assert im.width == 1200 and im.height > 3000  # the whole page, not one screen
        assert len(im.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 1000  # figures, not a blank page
