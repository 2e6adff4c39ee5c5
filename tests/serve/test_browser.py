"""The review page in a real browser (headless Chromium via Playwright) against a real uvicorn server.

A technologist's session in miniature: pick images, wait for the grid,
correct one label with a key press, see the count change, ask for Grad-CAM,
export the labels and the count as CSV. Every request the page makes must go
to the service itself (no CDN, no internet).

Run as a script to take the README screenshot with any model and images::

    python tests/serve/test_browser.py RUN_DIR IMAGE_FOLDER docs/images/serve.png [--n 40]
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    found = CHROMIUM if CHROMIUM.is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found is None and shutil.which(name):
            found = Path(str(shutil.which(name)))
    return str(found) if found else None


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def open_page(p: Any, url: str, viewport: tuple[int, int] = (1280, 860)) -> tuple[Any, Any, list[str], list[str]]:
    """A page on ``url`` that records every request leaving for another origin and every console error."""
    browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True)
    foreign: list[str] = []
    errors: list[str] = []
    page.on("request", lambda req: None if req.url.startswith((url, "blob:", "data:")) else foreign.append(req.url))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    # expect() rather than wait_for_function(): the page's CSP forbids eval, and it stays on in tests
    expect(page.locator("#model-line")).to_contain_text("classes")
    return browser, page, foreign, errors


def upload_and_wait(page: Any, images: list[Path]) -> None:
    page.set_input_files("#pick-files", [str(p) for p in images])
    expect(page.locator("#grid .tile .lab")).to_have_count(len(images), timeout=60_000)
    expect(page.locator("#count-total")).to_have_text(str(len(images)))


def count_table(page: Any) -> dict[str, int]:
    rows = page.eval_on_selector_all("#count-table tbody tr", "rs => rs.map(r => [r.dataset.label, r.children[1].textContent])")
    return {label: int(n) for label, n in rows}


def download_text(page: Any, button: str) -> tuple[str, str]:
    with page.expect_download() as info:
        page.click(button)
    d = info.value
    return d.suggested_filename, Path(d.path()).read_text()


def test_review_session_in_browser(serve_run: Path, cell_images: list[Path], start_server: Any, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    if chromium_path() is None:
        pytest.skip("no Chromium found (/usr/bin/chromium); CI installs Debian's chromium")
    from leuko.serve import create_app

    app = create_app(serve_run)
    classes: list[str] = app.state.service.classes
    shot = tmp_path / "serve.png"
    with start_server(app) as url, sync_api.sync_playwright() as p:
        browser, page, foreign, errors = open_page(p, url)
        try:
            upload_and_wait(page, cell_images)
            assert page.locator("#grid .tile").count() == len(cell_images)
            before = count_table(page)
            assert sum(before.values()) == len(cell_images)

            # select the first cell and correct its label with a digit key
            first = page.locator("#grid .tile").first
            first.click()
            predicted = first.locator(".lab").text_content()
            target = next(c for c in classes if c != predicted)
            page.keyboard.press(str(classes.index(target) + 1))
            expected = dict(before)
            expected[predicted] -= 1
            expected[target] += 1
            expect(page.locator(f"#count-table tr[data-label='{target}'] td:nth-child(2)")).to_have_text(str(expected[target]))
            assert count_table(page) == expected
            assert first.locator(".was").text_content() == f"was {predicted}"
            # the chart is redrawn from the same numbers: one bar per class
            assert page.locator("#chart rect.bar").count() == len(classes)
            # the selection moved on to the next cell; accept it with A
            assert page.locator("#grid .tile.selected").get_attribute("data-id") == "1"
            page.keyboard.press("a")
            assert page.locator("#grid .tile.selected").get_attribute("data-id") == "2"

            # Grad-CAM on demand (E)
            page.keyboard.press("e")
            expect(page.locator("#detail-cam")).to_be_visible(timeout=30_000)
            assert "Grad-CAM for" in page.locator("#cam-status").text_content()

            # export: the labels CSV carries the correction, the count CSV the new count
            name, text = download_text(page, "#export-labels-csv")
            assert name == "leuko-labels.csv"
            rows = list(csv.DictReader(io.StringIO(text)))
            assert [r["name"] for r in rows] == [p.name for p in sorted(cell_images)]
            assert rows[0]["predicted"] == predicted and rows[0]["label"] == target
            assert rows[0]["corrected"] == "true" and rows[0]["reviewed"] == "true"
            assert rows[1]["corrected"] == "false" and rows[1]["reviewed"] == "true"
            assert sum(r["reviewed"] == "true" for r in rows) == 2
            assert all(r["answered_by"] == "" for r in rows)  # one network: no routing column values
            name, text = download_text(page, "#export-count-csv")
            assert name == "leuko-count.csv"
            counted = {r["label"]: int(r["count"]) for r in csv.DictReader(io.StringIO(text))}
            assert counted == {**expected, "total": len(cell_images)}

            # the review filter shows only flagged, unreviewed cells
            flagged = sum(1 for r in rows if r["flagged"] == "true" and r["reviewed"] == "false")
            page.keyboard.press("r")
            expect(page.locator("#grid .tile")).to_have_count(flagged)
            page.keyboard.press("r")

            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not foreign, f"the page reached outside the service: {foreign}"
    assert not errors, f"console errors: {errors}"
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def tile_labels(page: Any) -> list[str]:
    return page.eval_on_selector_all("#grid .tile .lab", "ts => ts.map(t => t.textContent)")


def test_sample_session_in_browser(serve_run: Path, cell_images: list[Path], start_server: Any, tmp_path: Path) -> None:
    """Samples kept in a store: review, reload, restart the service, same labels and count; sign off, frozen."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    if chromium_path() is None:
        pytest.skip("no Chromium found (/usr/bin/chromium); CI installs Debian's chromium")
    from leuko.serve import create_app

    db = tmp_path / "lab.db"
    app = create_app(serve_run, store=db)
    classes: list[str] = app.state.service.classes
    with sync_api.sync_playwright() as p:
        with start_server(app) as url:
            browser, page, foreign, errors = open_page(p, url)
            try:
                expect(page.locator("#samples-view")).to_be_visible()
                expect(page.locator("#samples-empty")).to_be_visible()
                page.fill("#reviewer", "Ann Smith")
                page.fill("#new-accession", "S24-000101")
                page.click("#create-sample")
                expect(page.locator("#sample-title")).to_have_text("S24-000101")
                assert page.url.endswith("#/samples/1")
                page.set_input_files("#pick-files", [str(x) for x in cell_images])
                expect(page.locator("#grid .tile .lab")).to_have_count(len(cell_images), timeout=60_000)
                predicted = tile_labels(page)

                # correct the first cell, accept the second, correct the third, all with keys
                page.locator("#grid .tile").first.click()
                wanted = list(predicted)
                for i in (0, 2):
                    wanted[i] = next(c for c in classes if c != predicted[i])
                page.keyboard.press(str(classes.index(wanted[0]) + 1))
                page.keyboard.press("a")
                page.keyboard.press(str(classes.index(wanted[2]) + 1))
                expect(page.locator("#save-status")).to_have_text("all changes saved")
                expected = {c: wanted.count(c) for c in classes}
                expect(page.locator(f"#count-table tr[data-label='{wanted[0]}'] td:nth-child(2)")).to_have_text(str(expected[wanted[0]]))
                assert tile_labels(page) == wanted and count_table(page) == expected

                # the first cell's history: the model's answer, then Ann's correction
                page.locator("#grid .tile").first.click()
                expect(page.locator("#history-list li")).to_have_count(2)
                assert f"Ann Smith: {predicted[0]} → {wanted[0]}" in page.locator("#history-list li").nth(1).text_content()

                page.reload()  # everything came from the store: a reload shows the same
                expect(page.locator("#grid .tile .lab")).to_have_count(len(cell_images))
                expect(page.locator("#count-total")).to_have_text(str(len(cell_images)))
                assert tile_labels(page) == wanted and count_table(page) == expected
                assert page.locator("#grid .tile.reviewed").count() == 3
            finally:
                browser.close()
        assert not foreign, f"the page reached outside the service: {foreign}"
        assert not errors, f"console errors: {errors}"

        # a new service process on the same database: the same sample, labels and count
        with start_server(create_app(serve_run, store=db)) as url:
            browser, page, foreign, errors = open_page(p, url)
            try:
                row = page.locator("#sample-table tbody tr[data-accession='S24-000101']")
                expect(row).to_have_count(1)
                assert row.locator("td").nth(2).text_content() == "open" and row.locator("td").nth(4).text_content() == "3"
                row.locator("a").click()
                expect(page.locator("#grid .tile .lab")).to_have_count(len(cell_images))
                assert tile_labels(page) == wanted and count_table(page) == expected

                page.click("#sign-off")  # another browser: it does not know who reviews yet, and says so
                expect(page.locator("#message")).to_contain_text("Type your name in the reviewer box")
                assert page.locator("#sample-status").text_content() == "open"
                page.fill("#reviewer", "Ann Smith")
                page.click("#sign-off")
                expect(page.locator("#sample-status")).to_have_text("signed off")
                expect(page.locator("#message")).to_contain_text("signed off: its count is frozen")
                assert "by Ann Smith" in page.locator("#sample-signed").text_content()
                assert page.locator("#drop").is_hidden() and page.locator("#reopen-box").is_visible()
                # frozen: a key changes nothing, the page says why
                page.locator("#grid .tile").nth(1).click()
                assert page.locator("#class-buttons button").first.is_disabled()
                page.keyboard.press(str(classes.index(next(c for c in classes if c != wanted[1])) + 1))
                expect(page.locator("#message")).to_contain_text("is signed off: re-open it to change a label")
                page.reload()
                expect(page.locator("#sample-status")).to_have_text("signed off")
                assert tile_labels(page) == wanted and count_table(page) == expected
                page.click("#back")
                row = page.locator("#sample-table tbody tr[data-accession='S24-000101']")
                expect(row.locator("td").nth(2)).to_have_text("signed-off")
                assert "Ann Smith" in row.locator("td").nth(7).text_content()
            finally:
                browser.close()
        assert not foreign, f"the page reached outside the service: {foreign}"
        assert not errors, f"console errors: {errors}"
    with create_app(serve_run, store=db).state.store as store:
        detail = store.get_sample(1)
        assert detail.status == "signed-off" and [c.label for c in detail.cells] == wanted
        assert [e.action for e in detail.events] == ["create", "sign-off"]


def test_sample_page_with_login(serve_run: Path, cell_images: list[Path], start_server: Any, tmp_path: Path) -> None:
    """With --auth the page asks for a token; every call carries it, and the events carry the token's reviewer."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    if chromium_path() is None:
        pytest.skip("no Chromium found (/usr/bin/chromium); CI installs Debian's chromium")
    from leuko.serve import create_app
    from leuko.serve.auth import add_token

    tokens = tmp_path / "tokens.txt"
    secret = add_token(tokens, "Bob Jones")
    app = create_app(serve_run, store=tmp_path / "lab.db", auth=tokens)
    with start_server(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(url + "/")
            expect(page.locator("#login")).to_be_visible()
            page.fill("#token", "not-a-token")
            page.click("#sign-in")
            expect(page.locator("#message")).to_contain_text("unknown token")
            page.fill("#token", secret)
            page.click("#sign-in")
            expect(page.locator("#signed-in-name")).to_have_text("signed in as Bob Jones")
            expect(page.locator("#model-line")).to_contain_text("classes")
            assert page.locator("#who-reviewer").is_hidden()  # the token names the reviewer: no name box
            page.fill("#new-accession", "AUTH-7")
            page.click("#create-sample")
            expect(page.locator("#sample-title")).to_have_text("AUTH-7")
            page.set_input_files("#pick-files", [str(x) for x in cell_images[:4]])
            expect(page.locator("#grid .tile .lab")).to_have_count(4, timeout=60_000)
            page.locator("#grid .tile").first.click()
            page.keyboard.press("a")
            expect(page.locator("#save-status")).to_have_text("all changes saved")
            # images came through fetch with the token (blob: URLs), since an <img> cannot send a header
            expect(page.locator("#grid .tile img").first).to_have_attribute("src", re.compile(r"^blob:"))
            assert page.eval_on_selector("#grid .tile img", "i => i.naturalWidth") > 0
        finally:
            browser.close()
    assert not errors, errors
    with app.state.store.__class__.open(tmp_path / "lab.db") as store:
        (cell,) = [c for c in store.get_sample(1).cells if c.reviewed]
        assert cell.last_review is not None and cell.last_review.reviewer == "Bob Jones"
        assert store.get_sample(1).created_by == "Bob Jones"


def take_screenshot(model: Path, folder: Path, out: Path, n: int = 40, review: int = 10, samples: bool = False) -> None:
    """Serve ``model``, review ``n`` images of ``folder`` the way a person would, save a screenshot (README).

    The first ``review`` cells are reviewed with the keyboard: where the image's
    folder names one of the model's classes (PBC's layout) and the prediction
    differs, the digit key corrects it; otherwise A accepts it. ``samples``: the
    page on a store (a throwaway one): a sample is created and its reviews saved,
    and the first corrected cell's history is shown.
    """
    import tempfile

    from playwright.sync_api import sync_playwright

    from leuko.infer.predict import collect_images
    from leuko.serve import create_app

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]  # this folder's conftest, and tests/cells.py it imports
    from serving import live_server

    paths = collect_images([folder])
    images = paths[:: max(1, len(paths) // n)][:n]
    app = create_app(model, store=Path(tempfile.mkdtemp()) / "lab.db" if samples else None)
    classes = app.state.service.classes
    with live_server(app) as url, sync_playwright() as p:
        browser, page, _, _ = open_page(p, url, viewport=(1360, 1000))
        try:
            if samples:
                page.fill("#reviewer", "A. Technologist")
                page.fill("#new-accession", "S24-000123")
                page.click("#create-sample")
                expect(page.locator("#sample-title")).to_have_text("S24-000123")
                page.set_input_files("#pick-files", [str(x) for x in images])
                expect(page.locator("#grid .tile .lab")).to_have_count(len(images), timeout=120_000)
            else:
                upload_and_wait(page, images)
            tiles = page.locator("#grid .tile")
            tiles.first.click()
            by_name = {p.name: p for p in images}
            for i in range(min(review, len(images))):
                truth = by_name[Path(tiles.nth(i).get_attribute("title").splitlines()[0]).name].parent.name
                predicted = tiles.nth(i).locator(".lab").text_content()
                page.keyboard.press(str(classes.index(truth) + 1) if truth in classes and truth != predicted else "a")
            if samples:
                expect(page.locator("#save-status")).to_have_text("all changes saved", timeout=60_000)
                fixed = page.locator("#grid .tile:has(.was)")
                (fixed.first if fixed.count() else tiles.first).click()
                expect(page.locator("#history-list li").first).to_be_visible()
            page.keyboard.press("e")
            expect(page.locator("#detail-cam")).to_be_visible(timeout=60_000)
            png = page.screenshot(full_page=False)
        finally:
            browser.close()
    # a palette keeps the README image small (< 300 KB) and still sharp for UI text
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    im = im.resize((1200, round(im.height * 1200 / im.width)), Image.Resampling.LANCZOS)
    im.quantize(96, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"written: {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=40, help="images to upload")
    ap.add_argument("--review", type=int, default=10, help="cells to review with the keyboard first")
    ap.add_argument("--samples", action="store_true", help="the page on a (throwaway) store: a sample, saved reviews, a history")
    args = ap.parse_args()
    take_screenshot(args.model, args.images, args.out, args.n, args.review, args.samples)


def test_fields_in_browser(serve_run: Path, field_files: dict[str, Path], missed_at: tuple[int, int], start_server: Any,
                           tmp_path: Path) -> None:
    """Smear fields on the samples page: boxes coloured by class, a box re-labelled by key, a false detection deleted,
    a missed cell added by a click on it; the count follows each, and a reload shows the same boxes."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    if chromium_path() is None:
        pytest.skip("no Chromium found (/usr/bin/chromium); CI installs Debian's chromium")
    from leuko.serve import create_app

    app = create_app(serve_run, store=tmp_path / "lab.db")
    classes: list[str] = app.state.service.classes
    overlap = [field_files[k] for k in ("overlap_0", "overlap_1", "overlap_2", "empty")]
    with sync_api.sync_playwright() as p, start_server(app) as url:
        browser, page, foreign, errors = open_page(p, url)
        try:
            page.fill("#reviewer", "Ann Smith")
            page.fill("#new-accession", "F24-000007")
            page.click("#create-sample")
            expect(page.locator("#sample-title")).to_have_text("F24-000007")
            expect(page.locator("#pick-fields-label")).to_be_visible()
            page.set_input_files("#pick-fields", [str(x) for x in overlap] + [str(field_files["missed"])])
            expect(page.locator("#field-list figure.field")).to_have_count(5, timeout=60_000)
            expect(page.locator("#message")).to_contain_text("field_3_empty.jpg holds no white cell")
            boxes = page.locator("#field-list rect.box")
            n_boxes = boxes.count()
            assert n_boxes >= 8 and page.locator("#grid .tile").count() == n_boxes
            assert page.locator("#field-list rect.box.repeat").count() >= 2  # the same cells seen in overlapping windows
            assert "repeat(s) in overlapping fields merged" in page.locator("#count-fields").text_content()
            total = int(page.locator("#count-total").text_content())
            # every box is drawn in its class's colour, and the legend names the classes
            assert page.locator("#field-legend .key").count() == len(classes) + 1
            colours = page.eval_on_selector_all("#field-list rect.box", "rs => rs.map(r => [r.dataset.label, r.style.stroke])")
            by_label: dict[str, set[str]] = {}
            for label, colour in colours:
                by_label.setdefault(label, set()).add(colour)
            assert all(len(v) == 1 for v in by_label.values()) and len({next(iter(v)) for v in by_label.values()}) == len(by_label)

            # click the first box of the last field (the cell the finder found there), re-label it with a key
            missed_field = page.locator("#field-list figure.field").nth(4)
            first = missed_field.locator("rect.box").first
            first.click()
            cell_id = first.get_attribute("data-id")
            was = first.get_attribute("data-label")
            new = next(c for c in classes if c != was)
            page.keyboard.press(str(classes.index(new) + 1))
            expect(page.locator("#save-status")).to_have_text("all changes saved")
            expect(page.locator(f"#field-list rect.box[data-id='{cell_id}']")).to_have_attribute("data-label", new)

            # delete it as a false detection: out of the count, drawn grey and dashed; then add the missed cell by a click
            page.locator(f"#field-list rect.box[data-id='{cell_id}']").click()
            page.keyboard.press("d")
            expect(page.locator(f"#field-list rect.box.deleted[data-id='{cell_id}']")).to_have_count(1)
            expect(page.locator("#count-total")).to_have_text(str(total - 1))
            missed_field.locator("svg").click(position={"x": missed_at[0], "y": missed_at[1]})
            expect(missed_field.locator("rect.box")).to_have_count(2)
            expect(page.locator("#count-total")).to_have_text(str(total))
            expect(page.locator("#message")).to_contain_text("cell added to missed.jpg")

            page.reload()  # all of it came from the store
            expect(page.locator("#field-list figure.field")).to_have_count(5)
            expect(page.locator("#field-list rect.box")).to_have_count(n_boxes + 1)
            expect(page.locator(f"#field-list rect.box.deleted[data-id='{cell_id}']")).to_have_attribute("data-label", new)
            expect(page.locator("#count-total")).to_have_text(str(total))
        finally:
            browser.close()
    assert not foreign, f"the page reached outside the service: {foreign}"
    assert not errors, f"console errors: {errors}"
