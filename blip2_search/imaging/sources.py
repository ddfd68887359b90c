"""Where image bytes come from: paths, in-memory bytes and file objects, opened with clear errors.

Everything that can go wrong before a decoder sees a byte (missing file, broken symlink, symlink
loop, directory, FIFO, permissions, empty file) becomes an `ImageDecodeError` naming the file and
the fix. `sniff` names a format from its magic number, so decode errors can say what a file is.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Union

from ..errors import ImageDecodeError, InvalidInputError

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]
"""A path (str or PathLike), the encoded bytes themselves, or a binary file object."""

PREFIX_BYTES = 32

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".dib", ".heic", ".heif", ".hif", ".avif"}
)
"""File name endings (lower case) of the image files indexed; a decode error trusts them to say a file is meant as an image."""

HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
# Generic still-image / sequence brands: the file may be HEIC or AVIF; the ftyp box's other brands decide.
_HEIF_OR_AVIF_BRANDS = frozenset({b"mif1", b"msf1", b"mif2"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_VIDEO_BRANDS = frozenset({b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4", b"3gp5", b"avc1", b"dash"})

_heif_lock = threading.Lock()
_heif_registered = False


@dataclass(frozen=True)
class OpenedSource:
    """A readable binary stream, what error messages call it, its first bytes and file suffix."""

    stream: BinaryIO
    name: str
    prefix: bytes
    suffix: str = ""


def describe(source: object) -> str:
    """How messages name a source: the quoted path (newlines escaped) or what the bytes are."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fsdecode(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    name = getattr(source, "name", None)
    return repr(os.fsdecode(name)) if isinstance(name, (str, bytes)) else "<file object>"


@contextmanager
def open_source(source: ImageSource) -> Iterator[OpenedSource]:
    """Open `source` for reading; the stream is closed on exit if this function opened it.

    Raises `ImageDecodeError` for filesystem problems and empty input, `InvalidInputError` for a
    source of the wrong type. A file object is read from its start, as Pillow does.
    """
    name = describe(source)
    if isinstance(source, (str, os.PathLike)):
        stream: BinaryIO = _open_path(os.fspath(source), name)
        owned = True
    elif isinstance(source, (bytes, bytearray, memoryview)):
        stream, owned = io.BytesIO(bytes(source)), True
    elif hasattr(source, "read"):
        stream, owned = _rewound(source, name), False
    else:
        raise InvalidInputError(
            f"image source {type(source).__name__} is not a path, bytes or binary file object; pass one of those"
        )
    try:
        try:
            prefix = stream.read(PREFIX_BYTES)
            stream.seek(0)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read image {name}: {_os_reason(exc)}; check the disk or network share") from exc
        except UnicodeDecodeError:  # open(path) without "b": its read() decodes the image bytes as text
            prefix = ""
        if not isinstance(prefix, (bytes, bytearray)):
            raise InvalidInputError(f"image {name} is a file opened in text mode; open it with open(path, 'rb'), or pass the path")
        if not prefix:
            raise ImageDecodeError(f"cannot decode image {name}: the file is empty (0 bytes); re-copy or re-export it")
        yield OpenedSource(stream, name, prefix, _suffix(source))
    finally:
        if owned:
            stream.close()


def _suffix(source: ImageSource) -> str:
    """The file-name extension of a path, or of a file object's `name` (an open file, or a BytesIO of a file's
    bytes given the file's name): a decode error says when the content defies it."""
    name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
    return os.path.splitext(os.fsdecode(name))[1] if isinstance(name, (str, bytes, os.PathLike)) else ""


def _rewound(fileobj: BinaryIO, name: str) -> BinaryIO:
    """A seekable stream positioned at the start of `fileobj`'s data."""
    try:
        if fileobj.seekable():
            fileobj.seek(0)
            return fileobj
        return io.BytesIO(fileobj.read())
    except (OSError, ValueError, AttributeError) as exc:
        raise ImageDecodeError(f"cannot read image {name}: {exc}; pass an open binary file or the bytes") from exc


def _open_path(path: str, name: str) -> BinaryIO:
    """Open a regular file; O_NONBLOCK keeps a FIFO from hanging the caller."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        if os.path.islink(path):
            target = _readlink(path)
            raise ImageDecodeError(
                f"cannot read image {name}: broken symlink (its target {target!r} does not exist); fix or remove the link"
            ) from exc
        raise ImageDecodeError(f"cannot read image {name}: no such file; check the path") from exc
    except PermissionError as exc:
        raise ImageDecodeError(
            f"cannot read image {name}: permission denied; make it readable (chmod a+r) by the user running blip2-search"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageDecodeError(
                f"cannot read image {name}: symlink loop (the link never reaches a file); fix or remove the link"
            ) from exc
        raise ImageDecodeError(f"cannot read image {name}: {_os_reason(exc)}; check the path and the disk") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageDecodeError(f"cannot read image {name}: it is a directory, not a file; pass an image file")
        if not stat.S_ISREG(mode):
            raise ImageDecodeError(
                f"cannot read image {name}: not a regular file (a device, FIFO or socket); pass an image file"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def sniff(prefix: bytes) -> str | None:
    """Name the format of a file from its first bytes (e.g. "JPEG", "HEIF", "PDF"); None if unknown."""
    if prefix.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if prefix.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if prefix[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return "WEBP"
    if prefix[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "CR2 raw" if prefix[8:10] == b"CR" else "TIFF"
    if prefix.startswith(b"BM"):
        return "BMP"
    if prefix[4:8] == b"ftyp":
        brand = prefix[8:12]
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand in HEIF_BRANDS:
            return "HEIF"
        if brand in _HEIF_OR_AVIF_BRANDS:
            return "HEIF/AVIF"
        if brand == b"crx ":
            return "CR3 raw"
        if brand in _VIDEO_BRANDS:
            return "MP4/QuickTime video"
        return None
    if prefix.startswith(b"\xff\x0a") or prefix.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL"
    if prefix.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or prefix.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    return _sniff_other(prefix)


def _sniff_other(prefix: bytes) -> str | None:
    signatures = (
        (b"%PDF", "PDF"),
        (b"8BPS", "PSD"),
        (b"FUJIFILMCCD-RAW", "RAF raw"),
        (b"IIRO", "ORF raw"),
        (b"IIU\x00", "RW2 raw"),
        (b"\x00\x00\x01\x00", "ICO"),
        (b"qoif", "QOI"),
        (b"<svg", "SVG"),
        (b"<?xml", "XML/SVG"),
    )
    for magic, label in signatures:
        if prefix.startswith(magic):
            return label
    if prefix[:1] == b"P" and prefix[1:2] in b"123456" and prefix[2:3].isspace():
        return "PPM"
    return None


def ensure_heif_plugin(name: str, *, required: bool = True) -> None:
    """Register pillow-heif's HEIC/HEIF opener with Pillow, once per process.

    When pillow-heif is missing: raises `ImageDecodeError` naming the package if `required`,
    else returns (a "mif1" file may be AVIF, which Pillow reads itself).
    """
    global _heif_registered
    if _heif_registered:
        return
    with _heif_lock:
        if _heif_registered:
            return
        try:
            import pillow_heif
        except ImportError as exc:
            if not required:
                return
            raise ImageDecodeError(
                f"cannot decode image {name}: HEIC/HEIF needs the pillow-heif package; pip install pillow-heif"
            ) from exc
        pillow_heif.register_heif_opener()
        _heif_registered = True
