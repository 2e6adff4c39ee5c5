"""What a crop step did to a dataset: which images fell back, and pictures to check by eye.

``cell-crop`` and ``rbc-crop`` (:mod:`leuko.data.preprocess`) find the white cell in every
image (``rbc-crop`` also measures its red cells). When it finds none it keeps the whole frame, which is a safe default
but must never be silent: a lab that feeds in a new scanner's images should
learn that, say, 30% of them are not being cropped. This module runs the
model's exact preprocessing over samples and reports, per image, whether a
cell was found and where; ``leuko data crops`` saves the crops (files and a
contact sheet) and ``leuko evaluate`` lists the fallbacks beside its metrics.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from leuko.data.imageio import load_rgb
from leuko.data.preprocess import CellBox, Preprocess, Preprocessed, available_cpus, decode_raw
from leuko.data.samples import Sample
from leuko.errors import LeukoError


@dataclass
class CropRecord:
    """One sample through the preprocessing: where the cell was, or that none was found."""

    key: str
    label: str
    fell_back: bool
    cell: CellBox | None = None
    ruler: float | None = None
    window: tuple[int, int, int] | None = None


@dataclass
class CropReport:
    """Every sample's :class:`CropRecord`, plus the files that could not be read."""

    records: list[CropRecord] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    rbc: bool = False

    @property
    def fallbacks(self) -> list[str]:
        """Keys of the images where no cell was found (the whole frame was used)."""
        return [r.key for r in self.records if r.fell_back]

    @property
    def no_ruler(self) -> list[str]:
        """With ``rbc-crop``: keys of images with a cell but no red-cell ruler (cropped at ``cell-crop``'s share)."""
        if not self.rbc:
            return []
        return [r.key for r in self.records if not r.fell_back and r.ruler is None]

    @property
    def found_share(self) -> float:
        """Share of readable images in which a cell was found."""
        return 1.0 - len(self.fallbacks) / len(self.records) if self.records else 0.0

    def summary(self) -> str:
        n, k = len(self.records), len(self.fallbacks)
        text = f"cell found in {n - k} of {n} images"
        if k:
            text += f"; {k} fell back to the whole frame"
        if self.rbc:
            text += f"; red-cell ruler in {n - k - len(self.no_ruler)} of {n - k} (the rest cropped as cell-crop)"
        if self.failed:
            text += f"; {len(self.failed)} unreadable"
        return text


def crop_report(
    samples: Sequence[Sample],
    preprocess: Preprocess,
    *,
    workers: int | None = None,
    on_image: Callable[[int, Sample, Preprocessed], None] | None = None,
) -> CropReport:
    """Run ``preprocess`` over ``samples`` (decoded exactly as training and inference do).

    Args:
        workers: decoding threads (default: the CPUs available; OpenCV and PIL
            release the GIL, so threads overlap).
        on_image: called with ``(i, sample, result)`` for each readable sample
            (in the calling thread, in order), e.g. to save the crop.
    """
    samples = list(samples)

    def one(s: Sample) -> Preprocessed | str:
        try:
            return preprocess.run(decode_raw(s, preprocess, load=load_rgb))
        except (LeukoError, OSError, ValueError) as exc:
            return str(exc)

    report = CropReport(rbc=preprocess.rbc_span is not None)
    n_workers = available_cpus() if workers is None else max(1, int(workers))
    with ThreadPoolExecutor(max_workers=n_workers) as ex:
        for i, (s, res) in enumerate(zip(samples, ex.map(one, samples))):
            if isinstance(res, str):
                report.failed.append((s.key, res))
                continue
            report.records.append(CropRecord(s.key, s.label, res.fell_back, res.cell, res.ruler, res.window))
            if on_image is not None:
                on_image(i, s, res)
    return report


def contact_sheet(images: Sequence[np.ndarray], titles: Sequence[str], flagged: Sequence[bool], *, cols: int = 8, tile: int = 128) -> np.ndarray:
    """One RGB picture of the crops in a grid, a caption under each; flagged tiles get a red frame."""
    if not images:
        raise LeukoError("no crops to put on a contact sheet")
    cap = 14
    rows = (len(images) + cols - 1) // cols
    sheet = np.full((rows * (tile + cap), cols * tile, 3), 255, np.uint8)
    for i, (im, title, flag) in enumerate(zip(images, titles, flagged)):
        r, c = divmod(i, cols)
        y, x = r * (tile + cap), c * tile
        sheet[y : y + tile, x : x + tile] = cv2.resize(im, (tile, tile), interpolation=cv2.INTER_AREA)
        if flag:
            cv2.rectangle(sheet, (x + 1, y + 1), (x + tile - 2, y + tile - 2), (220, 0, 0), 3)
        cv2.putText(sheet, title[:22], (x + 2, y + tile + cap - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


@dataclass
class CropsWritten:
    """What :func:`write_crops` wrote."""

    report: CropReport
    out: Path
    sheets: list[Path]
    n_files: int


def _safe_name(sample: Sample, i: int) -> str:
    stem = sample.path.stem
    if sample.crop is not None:
        stem += "_" + "-".join(str(v) for v in sample.crop)
    return f"{i:05d}_{stem}.png"


def write_crops(
    samples: Sequence[Sample],
    preprocess: Preprocess,
    out: str | Path,
    *,
    files: bool = True,
    sheet_size: int = 64,
    max_sheets: int = 4,
) -> CropsWritten:
    """Save what the model sees: crops as PNG files, contact sheets, ``crops.csv`` and ``fallbacks.txt``.

    Fallbacks go first on the contact sheets (framed red), then the rest, so
    the images to look at are on the first page.

    Raises:
        LeukoError: ``out`` exists and is not an empty folder (nothing is overwritten).
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LeukoError(f"{out} exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    thumbs: list[tuple[bool, np.ndarray, str]] = []
    budget = sheet_size * max_sheets
    n_files = 0

    def keep(i: int, s: Sample, res: Preprocessed) -> None:
        nonlocal n_files
        if files:
            folder = out / "crops" / (s.label if s.label and s.label != "?" else "unlabelled")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / _safe_name(s, i)), cv2.cvtColor(res.image, cv2.COLOR_RGB2BGR))
            n_files += 1
        if res.fell_back or len(thumbs) < budget:
            thumbs.append((res.fell_back, res.image, f"{s.label} {s.path.stem}"))

    report = crop_report(samples, preprocess, on_image=keep)
    with open(out / "crops.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "label", "cell_found", "cell_x0", "cell_y0", "cell_x1", "cell_y1", "decoded_size",
                    "window_left", "window_top", "window_side", "rbc_diameter"])
        for r in report.records:
            box = [f"{v:.1f}" for v in r.cell.cell] if r.cell is not None else ["", "", "", ""]
            win = list(r.window) if r.window is not None else ["", "", ""]
            ruler = f"{r.ruler:.1f}" if r.ruler is not None else ""
            w.writerow([r.key, r.label, int(not r.fell_back), *box, preprocess.decode_size, *win, ruler])
    (out / "fallbacks.txt").write_text("".join(k + "\n" for k in report.fallbacks))
    if report.failed:
        (out / "unreadable.txt").write_text("".join(f"{k}\t{why}\n" for k, why in report.failed))
    ordered = sorted(thumbs, key=lambda t: not t[0])[:budget]
    sheets = []
    for j in range(0, len(ordered), sheet_size):
        part = ordered[j : j + sheet_size]
        picture = contact_sheet([t[1] for t in part], [t[2] for t in part], [t[0] for t in part])
        path = out / f"sheet_{j // sheet_size + 1:02d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        sheets.append(path)
    return CropsWritten(report, out, sheets, n_files)


__all__ = ["CropRecord", "CropReport", "CropsWritten", "contact_sheet", "crop_report", "write_crops"]
