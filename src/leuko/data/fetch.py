"""Download public white-blood-cell datasets from their official sources.

``leuko data fetch NAME`` fills ``datasets_cache_dir()/NAME``, the third place
leuko looks for data (after ``--data`` and ``LEUKO_DATA_DIR``). Two datasets are
public and downloaded here (PBC from Mendeley Data, BloodMNIST from Zenodo);
the others sit behind a login or a special download tool, so asking for them
raises a :class:`~leuko.errors.LeukoError` whose message is the exact steps to
do by hand. Nothing is scraped and no credentials are handled.

Why the care below, for what is "just a download":

* Archives are hundreds of MB to GB over flaky links, so bytes go to
  ``<file>.part`` and a later attempt (in the same call or a new one) resumes
  with an HTTP ``Range`` request. Servers that ignore ``Range`` answer ``200``
  with the whole file; the ``.part`` is then rewritten from the start rather
  than appended to, which would silently corrupt it.
* A published checksum (MD5 for MedMNIST) is verified when one is known. None
  is invented: where the source publishes none (PBC on Mendeley), the SHA-256
  of what was received is recorded in the marker file, so a later fetch or a
  colleague can at least compare.
* Zip members with absolute paths or ``..`` are refused before anything is
  written (a crafted or mangled archive must not write outside the dataset
  folder); extraction goes to a staging folder first so a failure leaves no
  half dataset behind.
* ``.leuko-fetch.json`` is written last: its presence means "complete", which
  is what makes a second ``fetch`` a no-op and lets ``--force`` remove exactly
  what the fetch created and nothing of the user's.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from leuko.errors import LeukoError
from leuko.paths import datasets_cache_dir

ArchiveKind = Literal["zip", "npz", "none"]

MARKER_NAME = ".leuko-fetch.json"
"""Written last into a dataset folder: its presence means the fetch completed."""

_STAGING_NAME = ".leuko-extract"
_CHUNK = 1 << 20  # 1 MiB: large enough for speed, small enough for a smooth bar
_MAX_ATTEMPTS = 5  # per URL; each attempt after the first resumes the .part
_RETRY_DELAY = 1.0  # seconds, multiplied by the attempt number; tests set it to 0
_USER_AGENT = "leuko-fetch (+https://pypi.org/project/leuko; python-urllib)"


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RemoteDataset:
    """A dataset leuko knows where to get.

    Attributes:
        name: what ``leuko data fetch NAME`` takes; also the cache sub-folder.
        title: one-line human name.
        citation: what to cite when publishing results on it.
        licence: the data licence as the source states it.
        page: the landing page a person would open (also named in errors).
        urls: direct download URLs, official first, then mirrors tried in
            order when one fails; empty means manual-only.
        filename: the downloaded file's name.
        size: exact byte size when known (used for the bar and a disk check).
        sha256, md5: the *published* checksum, when there is one.
        archive: ``zip`` (extracted, archive removed), ``npz`` or ``none``
            (kept as downloaded).
        extracts_to: top-level folder the archive unpacks to, for the docs.
        layout: the leuko layout that reads the result (``None``: no layout
            reads it yet).
        manual: steps for a person, with ``{dest}`` for the target folder;
            set only for manual-only datasets.
        notes: anything else a user should know (shown by ``--list``).
    """

    name: str
    title: str
    citation: str
    licence: str
    page: str
    urls: tuple[str, ...] = ()
    filename: str = ""
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    archive: ArchiveKind = "none"
    extracts_to: str | None = None
    layout: str | None = None
    manual: str | None = None
    notes: str = ""

    @property
    def manual_only(self) -> bool:
        """True when leuko cannot download it (login, licence click-through, special tool)."""
        return not self.urls

    @property
    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, hex digest)`` of the published checksum, SHA-256 preferred."""
        if self.sha256:
            return ("sha256", self.sha256.lower())
        if self.md5:
            return ("md5", self.md5.lower())
        return None

    def instructions(self, dest: Path | None = None) -> str:
        """The manual steps with the target folder filled in (empty for downloadable sets)."""
        if not self.manual:
            return ""
        target = dest if dest is not None else datasets_cache_dir() / self.name
        return self.manual.format(dest=str(target))


_PBC_CITATION = (
    "Acevedo A, Merino A, Alférez S, Molina Á, Boldú L, Rodellar J. A dataset of microscopic "
    "peripheral blood cell images for development of automatic recognition systems. "
    "Data in Brief 30 (2020) 105474. Mendeley Data V1, doi:10.17632/snkd93bnjr.1"
)
_MEDMNIST_CITATION = (
    "Yang J, Shi R, Wei D, Liu Z, Zhao L, Ke B, Pfister H, Ni B. MedMNIST v2 - A large-scale "
    "lightweight benchmark for 2D and 3D biomedical image classification. Scientific Data 10, 41 "
    "(2023). Source images: " + _PBC_CITATION
)

_MOONEY_STEPS = """\
mooney needs a Kaggle login, so leuko cannot download it for you. To get it by hand:
  1. Sign in at https://www.kaggle.com and open
     https://www.kaggle.com/datasets/paultimothymooney/blood-cells
  2. Click "Download" (saves archive.zip), or with the Kaggle CLI and your API token:
     kaggle datasets download -d paultimothymooney/blood-cells   (saves blood-cells.zip)
  3. Unpack it anywhere. It nests the folder twice: dataset2-master/dataset2-master/images.
     Move the inner dataset2-master folder so that this folder exists:
     {dest}/dataset2-master/images/TRAIN/EOSINOPHIL/
  4. Check it: leuko data inspect {dest} --layout mooney
Any other folder works too: arrange it the same way and pass it with --data."""

_BCCD_WBC_STEPS = """\
bccd-wbc needs a Kaggle login, so leuko cannot download it for you. To get it by hand:
  1. Sign in at https://www.kaggle.com and open
     https://www.kaggle.com/datasets/brikwerk/bccd-white-blood-cell
  2. Click "Download" (saves archive.zip), or with the Kaggle CLI and your API token:
     kaggle datasets download -d brikwerk/bccd-white-blood-cell   (saves bccd-white-blood-cell.zip)
  3. Unpack it into {dest}/
     It holds one folder per cell type (basophil, eosinophil, lymphocyte, monocyte,
     neutrophil), under a top folder such as {dest}/bccd_wbc/. The folder whose
     sub-folders are those cell types is the dataset root (if the archive splits them
     into train/val/test folders, each of those is a root of its own).
  4. Check it: leuko data inspect {dest}/bccd_wbc --layout folder
     (use the root you found in step 3 if it is named differently)
Any other folder works too: pass the dataset root with --data."""

_CNMC_STEPS = """\
cnmc needs TCIA's download tool and its data-use terms (a login/click-through leuko cannot do). To get it by hand:
  1. Open https://www.cancerimagingarchive.net/collection/c-nmc-2019/
     (ALL Challenge dataset of ISBI 2019, doi:10.7937/tcia.2019.dc64i46r)
  2. Accept the data usage policy and download the C-NMC_Leukemia archive with the
     download tool the page offers (IBM Aspera Connect).
  3. Unpack it into {dest}/ so that this folder exists:
     {dest}/C-NMC_Leukemia/training_data/fold_0/all/
     Keep validation_data/ (with its labels CSV) next to training_data/: leuko uses it as
     the test set when present.
  4. Check it: leuko data inspect {dest} --layout cnmc
A Kaggle copy with the same C-NMC_Leukemia folder exists (andrewmvd/leukemia-classification,
Kaggle login). Any other folder works too: pass it with --data."""

_BCCD_STEPS = """\
bccd needs a Kaggle login for its labels.csv, so leuko does not download it. The images and
boxes are public on GitHub; the white-cell types per image (labels.csv) are on Kaggle. By hand:
  1. Images and boxes (public, MIT):
     git clone https://github.com/Shenggan/BCCD_Dataset
     or download and unpack https://github.com/Shenggan/BCCD_Dataset/archive/refs/heads/master.zip
  2. Copy the contents of BCCD_Dataset/BCCD/ (BCCD_Dataset-master/BCCD/ from the zip) into
     {dest}/ so that {dest}/JPEGImages/ and {dest}/Annotations/ exist.
  3. labels.csv: sign in at https://www.kaggle.com, download
     https://www.kaggle.com/datasets/paultimothymooney/blood-cells and copy
     dataset-master/dataset-master/labels.csv to {dest}/labels.csv
  4. Check it: leuko data inspect {dest} --layout bccd
Any other folder works too: arrange it the same way and pass it with --data."""


_RAABIN_STEPS = """\
raabin-wbc has no download address leuko can check (the archives are linked from a web page, not
a stable file address with a checksum), so leuko does not download it. By hand:
  1. Open https://raabindata.com/free-data/ (Raabin-WBC, Kouzehkanan et al., Sci. Rep. 2022)
  2. Download the cropped, double-labelled white cells: Train, TestA and TestB.
  3. Unpack them into {dest}/ so that folders such as these exist:
     {dest}/TestA/Neutrophil/   {dest}/TestB/Lymphocyte/
     Each of Train, TestA and TestB holds one folder per cell type (Basophil, Eosinophil,
     Lymphocyte, Monocyte, Neutrophil) and is a dataset root of its own. The authors set
     TestB apart to test generalisation to other imaging conditions: the harder check.
  4. Check it: leuko data inspect {dest}/TestA --layout folder
     Evaluate a PBC-trained model on it with --class-map pbc-to-five (the same five types).
Any other folder works too: pass the dataset root with --data."""


_REGISTRY: dict[str, RemoteDataset] = {
    ds.name: ds
    for ds in (
        RemoteDataset(
            name="pbc",
            title="PBC: peripheral blood cells, Hospital Clinic of Barcelona (17,092 images, 8 classes)",
            citation=_PBC_CITATION,
            licence="CC BY 4.0",
            page="https://data.mendeley.com/datasets/snkd93bnjr/1",
            urls=(
                "https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/"
                "2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded",
            ),
            filename="PBC_dataset_normal_DIB.zip",
            archive="zip",
            extracts_to="PBC_dataset_normal_DIB",
            layout="pbc",
            notes="Mendeley publishes no checksum: the SHA-256 of the download is recorded in "
            f"{MARKER_NAME} instead of verified.",
        ),
        RemoteDataset(
            name="bloodmnist",
            title="BloodMNIST (MedMNIST v2): PBC images resized to 28x28, official 7:1:2 split",
            citation=_MEDMNIST_CITATION,
            licence="CC BY 4.0",
            page="https://zenodo.org/records/10519652",
            urls=(
                "https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1",
                "https://zenodo.org/records/5208230/files/bloodmnist.npz?download=1",
            ),
            filename="bloodmnist.npz",
            md5="7053d0359d879ad8a5505303e11de1dc",
            archive="npz",
            notes="NumPy arrays (train/val/test _images and _labels), not image files: "
            "no leuko image layout reads it yet.",
        ),
        RemoteDataset(
            name="bloodmnist-224",
            title="BloodMNIST+ (MedMNIST): PBC images resized to 224x224, official 7:1:2 split (~1.5 GB)",
            citation=_MEDMNIST_CITATION,
            licence="CC BY 4.0",
            page="https://zenodo.org/records/10519652",
            urls=("https://zenodo.org/records/10519652/files/bloodmnist_224.npz?download=1",),
            filename="bloodmnist_224.npz",
            md5="b718ff6835fcbdb22ba9eacccd7b2601",
            archive="npz",
            notes="NumPy arrays (train/val/test _images and _labels), not image files: "
            "no leuko image layout reads it yet.",
        ),
        RemoteDataset(
            name="mooney",
            title="Kaggle 'Blood Cell Images' (augmented BCCD crops, 4 classes)",
            citation="P. Mooney, Blood Cell Images, Kaggle (paultimothymooney/blood-cells)",
            licence="MIT (BCCD source images); see the Kaggle page",
            page="https://www.kaggle.com/datasets/paultimothymooney/blood-cells",
            layout="mooney",
            manual=_MOONEY_STEPS,
        ),
        RemoteDataset(
            name="bccd-wbc",
            title="Kaggle 'BCCD White Blood Cell Images' (5 classes)",
            citation="brikwerk, BCCD White Blood Cell Images, Kaggle (brikwerk/bccd-white-blood-cell)",
            licence="see the Kaggle page",
            page="https://www.kaggle.com/datasets/brikwerk/bccd-white-blood-cell",
            layout="folder",
            manual=_BCCD_WBC_STEPS,
        ),
        RemoteDataset(
            name="raabin-wbc",
            title="Raabin-WBC: cropped white cells, 5 types, two microscopes and cameras (Train/TestA/TestB)",
            citation="Kouzehkanan ZM et al. A large dataset of white blood cells containing cell locations and "
            "types, along with segmented nuclei and cytoplasm. Sci Rep 12, 1123 (2022). doi:10.1038/s41598-021-04426-x",
            licence="see the Raabin data page",
            page="https://raabindata.com/free-data/",
            layout="folder",
            manual=_RAABIN_STEPS,
        ),
        RemoteDataset(
            name="cnmc",
            title="C-NMC 2019: ALL vs normal B-lineage cells (ISBI 2019 challenge), TCIA",
            citation="Gupta A, Gupta R. ALL Challenge dataset of ISBI 2019 [Data set]. "
            "The Cancer Imaging Archive (2019). doi:10.7937/tcia.2019.dc64i46r",
            licence="TCIA data usage policy; see the collection page",
            page="https://www.cancerimagingarchive.net/collection/c-nmc-2019/",
            layout="cnmc",
            manual=_CNMC_STEPS,
        ),
        RemoteDataset(
            name="bccd",
            title="BCCD: 364 smear fields with VOC boxes (+ labels.csv from Kaggle)",
            citation="Shenggan, BCCD Dataset, https://github.com/Shenggan/BCCD_Dataset",
            licence="MIT",
            page="https://github.com/Shenggan/BCCD_Dataset",
            layout="bccd",
            manual=_BCCD_STEPS,
        ),
    )
}


def list_remote_datasets() -> list[RemoteDataset]:
    """Every dataset ``leuko data fetch`` knows, downloadable ones first, for ``--list``."""
    return sorted(_REGISTRY.values(), key=lambda d: (d.manual_only, d.name))


def get_remote_dataset(name: str) -> RemoteDataset:
    """The registry entry for ``name``; a :class:`LeukoError` listing the known names otherwise."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        names = ", ".join(d.name for d in list_remote_datasets())
        raise LeukoError(f"unknown dataset {name!r} for fetch; choose one of: {names}")
    return _REGISTRY[key]


# --------------------------------------------------------------------------- public entry points


def fetch_dataset(
    name: str,
    dest: Path | None = None,
    *,
    url: str | None = None,
    force: bool = False,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download, verify and unpack dataset ``name``; return its folder.

    Args:
        name: a registry name (see :func:`list_remote_datasets`).
        dest: the dataset folder to fill; default ``datasets_cache_dir()/name``,
            where leuko's data resolution looks.
        url: download from here instead of the registry URLs (a mirror, or a
            local server in tests). The published checksum still applies.
        force: fetch again even if ``dest`` holds a completed fetch; only what
            that fetch created is removed first.
        progress: show a progress bar (bytes, speed, ETA) on stderr.
        timeout: seconds to wait for the server on connect and on each read.

    Returns:
        ``dest``: for a zip, the folder the archive was unpacked into (e.g.
        ``dest/PBC_dataset_normal_DIB/<class>/`` for PBC); for an ``.npz``, the
        folder holding it.

    Raises:
        LeukoError: unknown name; manual-only dataset (the message is the
            steps); network failure; checksum mismatch; unsafe or broken
            archive; not enough disk space.
    """
    ds = get_remote_dataset(name)
    target = Path(dest).expanduser() if dest is not None else datasets_cache_dir() / ds.name
    if ds.manual_only:
        raise LeukoError(ds.instructions(target))
    if read_fetch_marker(target) is not None:
        if not force:
            return target
        _remove_previous_fetch(target)

    urls = (url,) if url else ds.urls
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeukoError(f"cannot create dataset folder {target}: {exc.strerror or exc}") from None
    try:
        archive, used_url, digests = _obtain_file(ds, urls, target, progress=progress, timeout=timeout)
        contents = _unpack(ds, archive, target)
        _write_marker(ds, target, used_url, archive, digests, contents)
    except BaseException:
        _remove_if_empty(target, created)
        raise
    return target


def read_fetch_marker(folder: Path) -> dict[str, Any] | None:
    """The marker a completed fetch left in ``folder`` (``None`` if there is none or it is unreadable)."""
    path = Path(folder) / MARKER_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fetched_path(name: str) -> Path | None:
    """``datasets_cache_dir()/name`` when a fetch of ``name`` completed there, else ``None``.

    This is the "local cache" step of leuko's data resolution order.
    """
    folder = datasets_cache_dir() / name
    marker = read_fetch_marker(folder)
    return folder if marker is not None and marker.get("name") == name else None


# --------------------------------------------------------------------------- download


class _Interrupted(Exception):
    """The connection ended before the expected number of bytes: resumable."""


@dataclass
class _Digests:
    """Checksums of the downloaded file; both are computed in one pass for the marker."""

    sha256: str
    md5: str
    size: int

    def get(self, algo: str) -> str:
        return self.sha256 if algo == "sha256" else self.md5


def _obtain_file(
    ds: RemoteDataset, urls: tuple[str, ...], target: Path, *, progress: bool, timeout: float
) -> tuple[Path, str, _Digests]:
    """Make ``target/filename`` a complete, verified download; return it, its source URL and digests.

    A complete file left by an earlier run that failed later (e.g. disk full
    while unpacking) is re-used after its checksum is checked.
    """
    final = target / ds.filename
    part = final.with_name(final.name + ".part")
    if final.is_file():
        digests = _hash_file(final)
        if _checksum_ok(ds, digests):
            return final, urls[0], digests
        final.unlink()

    used_url = _download_any(ds, urls, part, progress=progress, timeout=timeout)
    digests = _hash_file(part)
    if not _checksum_ok(ds, digests):
        part.unlink(missing_ok=True)
        algo, expected = ds.checksum  # type: ignore[misc]  # _checksum_ok is False only with one
        raise LeukoError(
            f"checksum mismatch for {ds.filename} from {used_url}: expected {algo} {expected}, "
            f"got {digests.get(algo)}; the download was deleted, run the command again "
            f"or download it by hand from {ds.page}"
        )
    part.replace(final)
    return final, used_url, digests


def _download_any(ds: RemoteDataset, urls: tuple[str, ...], part: Path, *, progress: bool, timeout: float) -> str:
    """Try each URL in turn (official first, then mirrors); return the one that worked."""
    failure = ""
    for u in urls:
        try:
            _download_with_resume(u, part, label=ds.filename, size_hint=ds.size, progress=progress, timeout=timeout)
            return u
        except LeukoError:
            raise
        except _Interrupted as exc:
            failure = f"{u}: {exc}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            failure = f"{u}: {_describe_network_error(exc)}"
    have = part.stat().st_size if part.exists() else 0
    resume = f"; {have} bytes kept in {part.name}, running the command again resumes" if have else ""
    raise LeukoError(
        f"could not download {ds.name} ({ds.filename}) from {failure}{resume}; "
        f"check the network or proxy, pass --url with a mirror, or download it by hand from {ds.page} "
        f"into {part.parent}"
    )


def _download_with_resume(
    url: str, part: Path, *, label: str, size_hint: int | None, progress: bool, timeout: float
) -> None:
    """Fill ``part`` from ``url``, resuming after dropped connections; raise when attempts run out.

    ``_Interrupted`` (and connection errors) on the last attempt propagate so
    the caller can try a mirror; what was received stays in ``part``.
    """
    with _progress_bar(label, enabled=progress) as bar:
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                _download_once(url, part, bar=bar, size_hint=size_hint, timeout=timeout)
                return
            except (_Interrupted, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                if attempt == _MAX_ATTEMPTS or not _is_transient(exc):
                    raise
            time.sleep(_RETRY_DELAY * attempt)


def _is_transient(exc: BaseException) -> bool:
    """Worth another (resumed) attempt on the same URL: a dropped or stalled connection.

    A refused connection, an unknown host or an HTTP error status is not: the
    next mirror (or the error message) is the better use of the user's time.
    """
    if isinstance(exc, _Interrupted):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return False
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, ConnectionRefusedError):
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, http.client.HTTPException))


def _download_once(
    url: str, part: Path, *, bar: _Bar, size_hint: int | None, timeout: float
) -> None:
    """One HTTP request: append to ``part`` from where it ends, or rewrite it if the server won't resume."""
    offset = part.stat().st_size if part.exists() else 0
    resp, start, total = _open(url, offset, timeout)
    with resp:
        total = total if total is not None else size_hint
        _check_disk_space(part.parent, None if total is None else total - start)
        bar.start(total, start)
        mode = "ab" if start > 0 else "wb"
        written = start
        with open(part, mode) as fh:
            try:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    fh.write(chunk)
                    written += len(chunk)
                    bar.advance(len(chunk))
            except (ConnectionError, TimeoutError, socket.timeout, http.client.IncompleteRead) as exc:
                raise _Interrupted(f"connection lost after {written} bytes ({_describe_network_error(exc)})") from None
    if total is not None and written < total:
        raise _Interrupted(f"connection closed after {written} of {total} bytes")
    if total is not None and written > total:
        part.unlink(missing_ok=True)
        raise LeukoError(f"{url} sent {written} bytes but announced {total}; the download was deleted, run it again")


def _open(url: str, offset: int, timeout: float) -> tuple[http.client.HTTPResponse, int, int | None]:
    """Open ``url`` asking for bytes from ``offset``; return the response, where it starts, and the full size.

    Servers that ignore ``Range`` answer 200 with the whole file: the start is
    then 0 and the caller rewrites the ``.part``. A 416 means the ``.part``
    does not fit the file on the server (changed, or already whole but
    unverifiable), so the download restarts from zero.
    """
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) URLs from the registry or the user
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset > 0:
            exc.close()
            return _open(url, 0, timeout)
        raise
    status = resp.status
    length = _int_header(resp.headers.get("Content-Length"))
    if offset > 0 and status == 206:
        first, total = _parse_content_range(resp.headers.get("Content-Range"))
        if first == offset:
            if total is None and length is not None:
                total = offset + length
            return resp, offset, total
        resp.close()  # a range we did not ask for: start clean rather than guess
        return _open(url, 0, timeout)
    if status == 206:  # no Range sent, yet partial content: do not trust it
        resp.close()
        raise http.client.HTTPException(f"server answered 206 Partial Content to a plain request for {url}")
    return resp, 0, length


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``"bytes 100-199/200"`` → ``(100, 200)``; unknown parts are ``None``."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe_network_error(exc: BaseException) -> str:
    """A short reason, without the nested tuple noise urllib puts in ``str(exc)``."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _check_disk_space(folder: Path, needed: int | None) -> None:
    """Fail before writing a byte when the download cannot fit (with 1% slack)."""
    if not needed or needed <= 0:
        return
    free = shutil.disk_usage(folder).free
    if needed * 1.01 > free:
        raise LeukoError(f"not enough disk space in {folder}: need {_fmt_bytes(needed)}, {_fmt_bytes(free)} free")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# --------------------------------------------------------------------------- checksums


def _hash_file(path: Path) -> _Digests:
    """SHA-256 and MD5 in one read: MD5 to match MedMNIST's published sums, SHA-256 for the record."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            sha.update(block)
            md5.update(block)
            size += len(block)
    return _Digests(sha.hexdigest(), md5.hexdigest(), size)


def _checksum_ok(ds: RemoteDataset, digests: _Digests) -> bool:
    expected = ds.checksum
    return expected is None or digests.get(expected[0]) == expected[1]


# --------------------------------------------------------------------------- unpacking


def _unpack(ds: RemoteDataset, archive: Path, target: Path) -> list[str]:
    """Put the dataset in place; return the top-level names the fetch created in ``target``."""
    if ds.archive != "zip":
        return [archive.name]
    try:
        contents = _extract_zip(archive, target)
    except zipfile.BadZipFile as exc:
        archive.unlink(missing_ok=True)
        raise LeukoError(
            f"{archive.name} is not a valid zip archive ({exc}); the server may have sent a web page "
            f"instead of the file. It was deleted; download it by hand from {ds.page}"
        ) from None
    except LeukoError:
        archive.unlink(missing_ok=True)
        raise
    archive.unlink()
    return contents


def _extract_zip(archive: Path, target: Path) -> list[str]:
    """Unpack ``archive`` into ``target`` via a staging folder; refuse unsafe members first.

    macOS resource forks (``__MACOSX/``) are skipped: they are not data and
    would show up as extra "images" to a layout scan.
    """
    staging = target / _STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        members = _safe_members(zf, archive.name)
        _check_disk_space(target, sum(info.file_size for info, _ in members))
        staging.mkdir()
        try:
            for info, parts in members:
                _extract_member(zf, info, staging.joinpath(*parts))
            return _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _safe_members(zf: zipfile.ZipFile, archive_name: str) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Members to extract with their path parts; :class:`LeukoError` on any unsafe name."""
    out: list[tuple[zipfile.ZipInfo, list[str]]] = []
    for info in zf.infolist():
        parts = member_parts(info.filename)
        if parts is None:
            raise LeukoError(
                f"refusing to unpack {archive_name}: member {info.filename!r} would be written outside "
                "the dataset folder (absolute path or '..')"
            )
        if not parts or parts[0] == "__MACOSX":
            continue
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise LeukoError(f"refusing to unpack {archive_name}: member {info.filename!r} is a symbolic link")
        out.append((info, parts))
    return out


def member_parts(name: str) -> list[str] | None:
    """Path parts of a zip member name, or ``None`` when it is absolute or climbs with ``..``.

    Backslashes count as separators too: archives made on Windows use them,
    and ``..\\x`` must not slip through as one odd file name.
    """
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return None
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return parts


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    if info.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def _move_into_place(staging: Path, target: Path) -> list[str]:
    """Move the staged top-level entries into ``target``, never over something already there."""
    entries = sorted(p for p in staging.iterdir())
    clashes = [p.name for p in entries if (target / p.name).exists()]
    if clashes:
        raise LeukoError(
            f"{target / clashes[0]} already exists and was not created by leuko fetch; "
            "move it away or choose another destination"
        )
    for p in entries:
        p.rename(target / p.name)
    return [p.name for p in entries]


# --------------------------------------------------------------------------- marker and cleanup


def _write_marker(
    ds: RemoteDataset, target: Path, url: str, archive: Path, digests: _Digests, contents: list[str]
) -> None:
    """Record where the data came from and what was checked; written last, it marks completion."""
    expected = ds.checksum
    marker = {
        "name": ds.name,
        "title": ds.title,
        "source_url": url,
        "page": ds.page,
        "filename": archive.name,
        "bytes": digests.size,
        "sha256": digests.sha256,
        "md5": digests.md5,
        "checksum_verified": expected[0] if expected else None,
        "checksum_note": (
            f"matched the published {expected[0]}"
            if expected
            else "no published checksum: sha256 recorded on first download, not verified"
        ),
        "layout": ds.layout,
        "contents": contents,
        "citation": ds.citation,
        "licence": ds.licence,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = target / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(target / MARKER_NAME)


def _remove_previous_fetch(target: Path) -> None:
    """For ``force``: delete what the marker says the fetch created, and the marker, nothing else."""
    marker = read_fetch_marker(target) or {}
    for entry in marker.get("contents", []):
        parts = member_parts(str(entry))
        if not parts or len(parts) != 1:
            continue  # a marker edited by hand must not make us delete elsewhere
        path = target / parts[0]
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (target / MARKER_NAME).unlink(missing_ok=True)


def _remove_if_empty(target: Path, created: bool) -> None:
    """After a failure, drop the dataset folder if this call created it and nothing useful is in it."""
    if created:
        try:
            target.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------- progress


@dataclass
class _Bar:
    """A thin wrapper so the download code is the same with and without a bar."""

    update: Callable[..., None] | None = None
    task: Any = None

    def start(self, total: int | None, completed: int) -> None:
        """(Re)start at ``completed`` bytes: a resumed transfer shows what is already on disk."""
        if self.update is not None:
            self.update(self.task, total=total, completed=completed)

    def advance(self, n: int) -> None:
        if self.update is not None:
            self.update(self.task, advance=n)


@contextmanager
def _progress_bar(label: str, *, enabled: bool) -> Iterator[_Bar]:
    """A rich bar (bytes, speed, ETA) on stderr, so stdout stays clean for scripts; a no-op when disabled."""
    if not enabled:
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task(label, total=None)
        yield _Bar(update=progress.update, task=task)


__all__ = [
    "MARKER_NAME",
    "RemoteDataset",
    "fetch_dataset",
    "fetched_path",
    "get_remote_dataset",
    "list_remote_datasets",
    "member_parts",
    "read_fetch_marker",
]
