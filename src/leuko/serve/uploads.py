"""Uploaded images, read and decoded in memory with limits: the service's only door for user bytes.

Why not FastAPI's ``UploadFile``: Starlette spools every file part larger than
1 MiB to a temporary file on disk and only lets a handler look at the parts
after the whole body has been read. Here the multipart body is parsed as it
streams in (python-multipart, the parser Starlette uses), every file stays a
``bytes`` object in memory, and a request is refused with **413** the moment it
passes a limit (request size, file size, file count), before the rest is read.
Nothing is ever written to disk.

Decoding is the second line of defence:

* only raster formats a microscope or a lab PC writes are opened (JPEG, PNG,
  BMP, TIFF, WebP); anything else is **415**, naming the file;
* the header's width x height is checked against :attr:`UploadLimits.max_pixels`
  *before* any pixel is decoded, so a small file that claims 50,000 x 50,000
  pixels (a decompression bomb) is **413** and costs nothing;
* a truncated or corrupt file is **422**, naming the file;
* pixels are decoded by :func:`leuko.data.imageio.load_rgb` straight from the
  bytes, at the model's decode size, so a served image is read exactly like
  ``leuko predict`` and training read it.

The client's filename is only ever a label in the answer (reduced to its last
path component, control characters removed); it never becomes a path.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import AsyncIterator, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header

from leuko.data.imageio import SUPPORTED_MODES, ResizeMode, load_rgb
from leuko.errors import LeukoError, Refusal

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
"""PIL formats the service opens; restricting them keeps rarely used decoders out of reach."""

_MAX_NAME = 200
_MAX_FORM_FIELDS = 16  # non-file parts are ignored, but a body of a million tiny fields is refused


@dataclass(frozen=True)
class UploadLimits:
    """What one request may carry. Defaults fit a differential count (a few hundred cell crops)."""

    max_files: int = 500
    max_file_bytes: int = 10 * 1024 * 1024
    max_request_bytes: int = 100 * 1024 * 1024
    max_pixels: int = 25_000_000  # a whole smear field is 1-5 Mpx; a cell crop far less

    def __post_init__(self) -> None:
        for name in ("max_files", "max_file_bytes", "max_request_bytes", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise LeukoError(f"upload limit {name} must be at least 1; got {getattr(self, name)}")

    def to_dict(self) -> dict[str, int]:
        return {
            "max_files": self.max_files,
            "max_file_bytes": self.max_file_bytes,
            "max_request_bytes": self.max_request_bytes,
            "max_pixels": self.max_pixels,
        }


class UploadError(Refusal):
    """An upload the service refuses: an HTTP status and a one-line message for the client."""


@dataclass(frozen=True)
class Upload:
    """One uploaded file: a display name (never a path) and its bytes."""

    name: str
    data: bytes


def display_name(raw: str, index: int) -> str:
    """The client's filename reduced to a harmless label: last path component, printable, bounded."""
    name = re.split(r"[\\/]", raw)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if name in ("", ".", ".."):
        name = f"image-{index + 1}"
    return name[:_MAX_NAME]


def _mib(n: int) -> str:
    """A byte count as people read limits: ``10 MiB``, ``2.9 MiB``, ``195 KiB``."""
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.1f}".removesuffix(".0") + " MiB"
    return f"{n / 1024:.0f} KiB"


async def read_uploads(
    headers: Mapping[str, str],
    stream: AsyncIterator[bytes],
    limits: UploadLimits,
    *,
    max_files: int | None = None,
) -> list[Upload]:
    """Parse a ``multipart/form-data`` body into in-memory uploads, enforcing ``limits`` as it streams.

    Every part with a filename counts as an image, whatever its field name;
    other parts are ignored. ``max_files`` lowers the file limit for one
    endpoint (``/explain`` takes one image).

    Raises:
        UploadError: 415 for a body that is not multipart, 413 past a limit,
            400 for a malformed body or one without any file.
    """
    file_limit = min(limits.max_files, max_files or limits.max_files)
    ctype = headers.get("content-type", "")
    kind, params = parse_options_header(ctype)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, f"expected a multipart/form-data upload of image files; got content type {ctype or 'none'!r}")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise UploadError(413, f"request body is {_mib(int(declared))}; the limit is {_mib(limits.max_request_bytes)} per request")

    uploads: list[Upload] = []
    state: dict[str, object] = {"name": b"", "value": b"", "disposition": b"", "buf": None, "fields": 0, "filename": ""}

    def on_part_begin() -> None:
        state["disposition"], state["buf"], state["filename"] = b"", None, ""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["name"] = state["name"] + data[start:end]  # type: ignore[operator]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] = state["value"] + data[start:end]  # type: ignore[operator]

    def on_header_end() -> None:
        if bytes(state["name"]).lower() == b"content-disposition":  # type: ignore[arg-type]
            state["disposition"] = state["value"]
        state["name"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["disposition"])  # type: ignore[arg-type]
        if b"filename" not in opts:
            state["fields"] = int(state["fields"]) + 1  # type: ignore[call-overload]
            if int(state["fields"]) > _MAX_FORM_FIELDS:  # type: ignore[call-overload]
                raise UploadError(413, f"too many form fields; at most {_MAX_FORM_FIELDS} besides the files")
            return
        if len(uploads) + 1 > file_limit:
            raise UploadError(413, f"too many files: at most {file_limit} image(s) per request")
        state["filename"] = display_name(opts[b"filename"].decode("utf-8", "replace"), len(uploads))
        state["buf"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        buf = state["buf"]
        if buf is None:  # a plain form field: ignored (bounded by the request limit)
            return
        assert isinstance(buf, bytearray)
        if len(buf) + (end - start) > limits.max_file_bytes:
            raise UploadError(413, f"{state['filename']}: file larger than the limit of {_mib(limits.max_file_bytes)} per image")
        buf.extend(data[start:end])

    def on_part_end() -> None:
        buf = state["buf"]
        if isinstance(buf, bytearray):
            uploads.append(Upload(str(state["filename"]), bytes(buf)))
        state["buf"] = None

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > limits.max_request_bytes:
                raise UploadError(413, f"request body larger than the limit of {_mib(limits.max_request_bytes)} per request")
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as exc:  # python-multipart's parse errors: a malformed body, not a server fault
        raise UploadError(400, f"malformed multipart body ({exc})") from None
    if not uploads:
        raise UploadError(400, "no image file in the upload (send files in the multipart field 'files')")
    return uploads


class _NamedBytes(io.BytesIO):
    """In-memory file whose ``str`` is the upload's name, so decoder messages name the file, not a buffer."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


def decode_upload(upload: Upload, limits: UploadLimits, *, size: int | None, resize: ResizeMode = "stretch") -> np.ndarray:
    """Decode one upload to an RGB ``uint8`` array of ``size`` x ``size`` (``None``: its own size), checking the header first.

    Raises:
        UploadError: 415 (not an image of an accepted format), 413 (too many
            pixels), 422 (empty, truncated, corrupt, unsupported colour mode).
    """
    name = upload.name
    if not upload.data:
        raise UploadError(422, f"{name}: empty file (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(upload.data), formats=ALLOWED_FORMATS) as im:
                width, height, mode = im.width, im.height, im.mode
    except UnidentifiedImageError:
        raise UploadError(415, f"{name}: not an image, or not one of {', '.join(ALLOWED_FORMATS)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"{name}: image has more pixels than the limit of {limits.max_pixels:,}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UploadError(422, f"{name}: corrupt image header ({exc})") from None
    if width * height > limits.max_pixels:
        raise UploadError(413, f"{name}: {width} x {height} = {width * height:,} pixels; the limit is {limits.max_pixels:,} per image")
    if mode not in SUPPORTED_MODES:
        raise UploadError(422, f"{name}: unsupported image mode {mode!r}")
    try:
        return load_rgb(_NamedBytes(upload.data, name), size, resize=resize)  # type: ignore[arg-type]
    except LeukoError as exc:
        reason = str(exc).removeprefix("cannot read image ")
        raise UploadError(422, f"cannot decode {reason}") from None
