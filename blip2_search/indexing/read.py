"""The read-and-decode stage: one file in, its bytes' hash and model-ready pixels (or a reason) out.

A pure function of the file, safe in threads or worker processes (e.g. a Ray Data map stage).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Container

import numpy as np

from ..errors import Blip2SearchError
from ..images import DEFAULT_MAX_PIXELS, ImageInfo, decode_for_model, read_info
from ..imaging.sources import describe
from .scan import FoundFile

HASH_BYTES = 20  # blake2b-160: collision-safe for any photo library, 40 hex characters


@dataclass(frozen=True, eq=False)
class ReadResult:
    """What the read stage learned about one file.

    `pixels` maps a model input `(S, resample)` (`Checkpoint.image_input`) to `[S, S, 3] uint8` RGB (resized straight
    with that PIL filter); it is empty
    when the content hash is already known (the vectors will be reused), when `error` is set, or when the file
    is `gone`: no longer there when read (deleted or moved since the scan; not a failure).
    """

    file: FoundFile
    size: int
    mtime_ns: int
    content_hash: str | None
    pixels: dict[tuple[int, int], np.ndarray]
    info: ImageInfo | None
    error: str | None = None
    gone: bool = False


def content_hash(data: bytes) -> str:
    """Hex blake2b-160 of the file's bytes."""
    return hashlib.blake2b(data, digest_size=HASH_BYTES).hexdigest()


def read_and_decode(
    file: FoundFile,
    inputs: tuple[tuple[int, int], ...],
    known_hashes: Container[str] = (),
    *,
    fast: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ReadResult:
    """Read `file` once, hash it, and unless its hash is in `known_hashes` decode it for each `(S, resample)` input."""
    try:
        with open(file.path, "rb") as f:
            before = os.fstat(f.fileno())
            data = f.read()
        after = os.stat(file.path)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)) and not os.path.lexists(file.path):  # not a broken link
            return ReadResult(file, file.size, file.mtime_ns, None, {}, None, gone=True)
        return ReadResult(file, file.size, file.mtime_ns, None, {}, None, f"cannot read ({exc.strerror}); check the file and its permissions")
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(data) != before.st_size:
        return ReadResult(file, after.st_size, after.st_mtime_ns, None, {}, None, "the file changed while it was read; it is retried on the next run")
    digest = content_hash(data)
    if digest in known_hashes:
        return ReadResult(file, before.st_size, before.st_mtime_ns, digest, {}, None)
    pixels: dict[tuple[int, int], np.ndarray] = {}
    info = None
    try:
        for size, resample in sorted(set(inputs)):
            decoded = decode_for_model(_named_bytes(data, file.path), size, resample=resample, fast=fast, max_pixels=max_pixels)
            pixels[size, resample] = decoded.pixels
            info = decoded.info
    except Blip2SearchError as exc:
        return ReadResult(file, before.st_size, before.st_mtime_ns, digest, {}, None, _reason(str(exc), file.path))
    return ReadResult(file, before.st_size, before.st_mtime_ns, digest, pixels, info)


def header_info(path: str, digest: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo | None:
    """The details (size, date, camera) of the file at `path` from its header, when its bytes still hash to
    `digest`; None when they do not or cannot be read. For content already embedded that no record describes
    (its record failed, or holds other bytes now): `read_and_decode` skips such a file's decode, and with it
    the details."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if content_hash(data) != digest:
            return None
        return read_info(data, max_pixels=max_pixels)
    except (OSError, Blip2SearchError):
        return None


def _named_bytes(data: bytes, path: str) -> io.BytesIO:
    """The file's bytes as a stream named after it: a decode error then says what its extension promised
    ("not an image file ... despite its '.jpg' extension")."""
    stream = io.BytesIO(data)
    stream.name = path
    return stream


def _reason(message: str, path: str) -> str:
    """One line without the decoder's naming of the file (the record already holds the path)."""
    line = message.splitlines()[0] if message else "could not decode"
    prefix = f"cannot decode image {describe(path)}: "
    return line[len(prefix):] if line.startswith(prefix) else line
