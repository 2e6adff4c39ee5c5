"""The image store: cell images kept by content (sha256) in a folder beside the database.

``ROOT/ab/abcdef…`` holds the bytes of the image whose sha256 is ``abcdef…``;
the same image uploaded twice, to one sample or to several, is one file.
A file is written to a temporary name in its folder, flushed to disk and
renamed into place before the database row that names it is committed, so a
cell the store has acknowledged always has its image, and a crash leaves at
worst an unreferenced file (harmless, and reused if the image comes again).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from leuko.errors import LeukoError

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "TIFF": "image/tiff", "WEBP": "image/webp"}
SUFFIXES = {"image/jpeg": ".jpg", "image/png": ".png", "image/bmp": ".bmp", "image/tiff": ".tif", "image/webp": ".webp"}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageStore:
    """A content-addressed folder of image files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LeukoError(f"cannot create the image store {self.root} ({exc.strerror or exc})") from None

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` (durably, once) and return its sha256."""
        digest = sha256_of(data)
        dest = self.path(digest)
        if dest.is_file() and dest.stat().st_size == len(data):
            return digest
        dest.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
