"""Reading cell images: validation with a reason, and fast decoding.

Two jobs live here because they share one detail, how PIL decodes:

* :func:`check_image` says why a file cannot be used (zero bytes, not an
  image, truncated, unsupported mode), so ``inspect`` and every loader report
  the same reasons.
* :func:`load_rgb` decodes an image (or a crop of it) to an RGB ``uint8``
  array at a target size. When the target is far below the source, JPEG
  *draft mode* lets libjpeg decode at 1/2, 1/4 or 1/8 scale via the DCT,
  which is several times faster than decoding at full size and resizing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from leuko.errors import LeukoError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
"""File suffixes treated as images when scanning folders."""

SUPPORTED_MODES = frozenset({"RGB", "RGBA", "L", "P", "LA", "CMYK", "YCbCr", "I;16", "I", "1"})
"""PIL modes that convert to RGB without losing the picture."""

# Decompression-bomb guard: a smear field is ~1-5 Mpx; 89 Mpx is PIL's default.
Image.MAX_IMAGE_PIXELS = 89_478_485

ResizeMode = Literal["stretch", "pad", "crop"]
RESIZE_MODES: tuple[str, ...] = ("stretch", "pad", "crop")


def is_image_name(path: Path) -> bool:
    """True for files whose suffix says "image" (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageInfo:
    """Header facts about a readable image (for ``inspect``)."""

    width: int
    height: int
    mode: str
    format: str


def check_image(path: Path, *, full_decode: bool = True) -> tuple[ImageInfo | None, str | None]:
    """Return ``(info, None)`` for a usable image, else ``(None, reason)``.

    ``full_decode`` decodes the pixels (in JPEG draft mode, so it stays fast)
    to catch truncated files, which PIL's header check alone does not.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        return None, f"cannot read file ({exc.strerror or exc})"
    if size == 0:
        return None, "zero-byte file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                info = ImageInfo(im.width, im.height, im.mode, im.format or "?")
                if im.mode not in SUPPORTED_MODES:
                    return None, f"unsupported image mode {im.mode!r}"
                if full_decode:
                    if im.format == "JPEG":
                        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
    except UnidentifiedImageError:
        return None, "not an image (unrecognised file content)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large (decompression-bomb limit)"
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "premature" in msg.lower():
            return None, "truncated image (file ends before the picture does)"
        return None, f"cannot decode image ({msg})"
    except (ValueError, SyntaxError) as exc:  # PIL raises these for some corrupt headers
        return None, f"cannot decode image ({exc})"
    return info, None


def _draft_scale(im: Image.Image, want: tuple[int, int]) -> float:
    """Ask libjpeg for the smallest DCT scale that stays >= ``want``; return the scale used."""
    if im.format != "JPEG":
        return 1.0
    full = im.size
    im.draft("RGB", want)
    return im.size[0] / full[0]


def load_rgb(
    path: Path,
    size: int | tuple[int, int] | None = None,
    *,
    crop: tuple[int, int, int, int] | None = None,
    resize: ResizeMode = "stretch",
    draft: bool = True,
    pad_value: int = 0,
) -> np.ndarray:
    """Decode ``path`` (or ``crop`` of it) to an ``H x W x 3`` uint8 RGB array.

    Args:
        size: output side (square) or ``(height, width)``; ``None`` keeps the source size.
        crop: ``(left, top, right, bottom)`` in source pixels, applied before resizing.
        resize: ``stretch`` (ignore aspect), ``pad`` (letterbox to square, then
            resize; keeps cell shape), or ``crop`` (scale the short side, centre crop).
        draft: allow JPEG draft-mode decoding when the output is much smaller.

    Raises:
        LeukoError: the file cannot be decoded (message names the file).
    """
    if resize not in RESIZE_MODES:
        raise LeukoError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    out_hw: tuple[int, int] | None
    if size is None:
        out_hw = None
    elif isinstance(size, int):
        out_hw = (size, size)
    else:
        out_hw = (int(size[0]), int(size[1]))
    try:
        with Image.open(path) as im:
            scale = 1.0
            if draft and out_hw is not None and im.format == "JPEG":
                src_w, src_h = im.size
                if crop is not None:
                    src_w, src_h = crop[2] - crop[0], crop[3] - crop[1]
                # keep at least the output size after the crop, at the draft scale
                fx = out_hw[1] / max(1, src_w)
                fy = out_hw[0] / max(1, src_h)
                f = max(fx, fy)
                if f < 0.5:
                    req = (max(1, int(im.size[0] * f + 0.999)), max(1, int(im.size[1] * f + 0.999)))
                    scale = _draft_scale(im, req)
            im = im.convert("RGB")
            if crop is not None:
                box = tuple(int(round(v * scale)) for v in crop)
                im = _crop_filled(im, box)  # type: ignore[arg-type]
            if out_hw is not None:
                im = _resize(im, out_hw, resize, pad_value)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise LeukoError(f"cannot read image {path}: {exc}") from None


def background_colour(image: np.ndarray) -> tuple[int, int, int]:
    """The smear's background colour: the median of the brightest tenth of the pixels."""
    flat = image.reshape(-1, 3)
    grey = flat.astype(np.int32).sum(axis=1)
    bright = flat[grey >= np.percentile(grey, 90)]
    return tuple(int(v) for v in np.median(bright, axis=0))  # type: ignore[return-value]


def filled_window(
    image: np.ndarray, box: tuple[int, int, int, int], fill_from: np.ndarray | None = None
) -> np.ndarray:
    """The ``box`` (left, top, right, bottom) of an ``H x W x 3`` array; any part of it outside the
    image is filled with the :func:`background_colour` of ``fill_from`` (default: the part inside).

    Reflection would mirror the cell itself into the border, a second half-cell that no
    training image has, and black is a border no other image has; plain background is what
    usually surrounds a white cell anyway. Used by the decoder (a box sample grown past the
    edge of its field) and by ``cell-crop`` (a window reaching past a tight crop).
    """
    left, top, right, bottom = box
    h, w = image.shape[:2]
    if left >= 0 and top >= 0 and right <= w and bottom <= h:
        return image[top:bottom, left:right]
    il, it, ir, ib = max(0, left), max(0, top), min(w, right), min(h, bottom)
    if ir <= il or ib <= it:
        raise ValueError(f"crop {box} lies outside the {w}x{h} image")
    part = image[it:ib, il:ir]
    canvas = np.empty((bottom - top, right - left, image.shape[2]), image.dtype)
    canvas[...] = background_colour(part if fill_from is None else fill_from)
    canvas[it - top : ib - top, il - left : ir - left] = part
    return canvas


def _crop_filled(im: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """``im.crop(box)``, with the part of ``box`` outside the image filled as :func:`filled_window` does."""
    w, h = im.size
    if box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h:
        return im.crop(box)
    return Image.fromarray(filled_window(np.asarray(im), box))


def _resize(im: Image.Image, out_hw: tuple[int, int], mode: str, pad_value: int) -> Image.Image:
    h, w = out_hw
    if mode == "stretch":
        return im.resize((w, h), Image.BILINEAR, reducing_gap=None)
    if mode == "pad":
        side = max(im.size)
        canvas = Image.new("RGB", (side, side), (pad_value,) * 3)
        canvas.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
        return canvas.resize((w, h), Image.BILINEAR)
    # crop: scale so the short side fits, then centre-crop
    sw, sh = im.size
    f = max(w / sw, h / sh)
    nw, nh = max(w, int(round(sw * f))), max(h, int(round(sh * f)))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))
