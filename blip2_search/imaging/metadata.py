"""What an image says about itself: size after orientation, format, EXIF date and camera.

EXIF comes from cameras, phones and editors of every quality, so every read here is defensive:
a corrupt or odd EXIF block yields `None` fields and orientation 1, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from PIL import Image

ORIENTATION_TAG = 0x0112
DATETIME_TAG = 0x0132
DATETIME_ORIGINAL_TAG = 0x9003
MAKE_TAG = 0x010F
MODEL_TAG = 0x0110
EXIF_IFD_TAG = 0x8769
XMP_INFO_KEYS = ("xmp", "XML:com.adobe.xmp")

# The transpose that makes an image with EXIF Orientation n upright: the same table as
# PIL.ImageOps.exif_transpose. Orientations 5-8 swap width and height.
TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_DATE_RE = re.compile(r"(\d{4})[:\-/.](\d{1,2})[:\-/.](\d{1,2})(?:[ T]+(\d{1,2}):(\d{2})(?::(\d{2}))?)?")
_MAX_TEXT = 128


@dataclass(frozen=True)
class ImageInfo:
    """Facts about one image file.

    width, height: pixels of the upright image (after EXIF orientation), full resolution.
    format: Pillow's format name ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "HEIF", "AVIF", ...);
        multi-picture JPEGs (MPO, written by many phones) are reported as "JPEG".
    taken_at: EXIF DateTimeOriginal, else DateTime; naive local time as the camera wrote it.
    camera_make, camera_model: EXIF Make / Model, stripped; None when absent or empty.
    """

    width: int
    height: int
    format: str
    taken_at: datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None


def read_exif(im: Image.Image) -> Image.Exif | None:
    """The image's EXIF block, or None when it is absent or cannot be parsed."""
    try:
        exif = im.getexif()
        len(exif)
    except Exception:
        return None
    return exif


def orientation_of(exif: Image.Exif | None) -> int:
    """EXIF Orientation 1..8; 1 when missing or not a valid value."""
    if exif is None:
        return 1
    try:
        value = int(exif.get(ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def upright(im: Image.Image, orientation: int) -> Image.Image:
    """`im` transposed so that an image stored with EXIF `orientation` displays upright."""
    method = TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return im if method is None else im.transpose(method)


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) after orientation: orientations 5-8 swap the axes."""
    return (size[1], size[0]) if orientation >= 5 else size


def forget_orientation(im: Image.Image) -> None:
    """Drop orientation metadata from an already-upright image so nothing rotates it twice."""
    try:
        exif = im.getexif()
        if ORIENTATION_TAG in exif:
            del exif[ORIENTATION_TAG]
            im.info["exif"] = exif.tobytes()
    except Exception:
        im.info.pop("exif", None)
    for key in XMP_INFO_KEYS:
        im.info.pop(key, None)


def image_info(file_format: str | None, stored_size: tuple[int, int], orientation: int, exif: Image.Exif | None) -> ImageInfo:
    """Build the `ImageInfo` of a file whose pixels are stored as `stored_size` (width, height)."""
    width, height = upright_size(stored_size, orientation)
    fmt = "JPEG" if file_format == "MPO" else (file_format or "unknown")
    if exif is None:
        return ImageInfo(width, height, fmt)
    sub_ifd = _exif_ifd(exif)
    taken = parse_exif_datetime(sub_ifd.get(DATETIME_ORIGINAL_TAG)) or parse_exif_datetime(_safe_get(exif, DATETIME_TAG))
    return ImageInfo(
        width,
        height,
        fmt,
        taken_at=taken,
        camera_make=clean_text(_safe_get(exif, MAKE_TAG)),
        camera_model=clean_text(_safe_get(exif, MODEL_TAG)),
    )


def parse_exif_datetime(value: object) -> datetime | None:
    """Parse an EXIF date such as "2023:07:14 18:02:33" (also "-" separators, "T", no seconds).

    Returns a naive datetime, or None for missing, blank ("    :  :  "), zero or impossible dates.
    """
    text = clean_text(value)
    if text is None:
        return None
    match = _DATE_RE.match(text)
    if match is None:
        return None
    parts = [int(p) if p is not None else 0 for p in match.groups()]
    try:
        return datetime(*parts)
    except ValueError:
        return None


def clean_text(value: object) -> str | None:
    """An EXIF ASCII value as str: NULs and surrounding blanks removed; None when empty."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    text = value.replace("\x00", " ").strip()
    text = " ".join(text.split())
    return text[:_MAX_TEXT] or None


def _safe_get(mapping: object, tag: int) -> object:
    try:
        return mapping.get(tag)  # type: ignore[attr-defined]
    except Exception:
        return None


def _exif_ifd(exif: Image.Exif) -> dict:
    try:
        return dict(exif.get_ifd(EXIF_IFD_TAG))
    except Exception:
        return {}
