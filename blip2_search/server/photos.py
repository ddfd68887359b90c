"""Reading the files of indexed images for the web: only what the index vouches for, and cached thumbnails.

Clients name images by id only; the path always comes from the library's record. Before a file is
opened its real path is checked (`check_photo_path`): a recorded path that is now a symlink to a
file the library never indexed (e.g. a link re-pointed at /etc/passwd) is refused. A link to a file
outside the photo folders is served when that file still has the size and modification time the
index recorded for the link (`index` follows file links and records what it read through them), so a
photo indexed through such a link is shown, while a link re-pointed at another file is not. The file
is then opened without following a last-moment symlink (O_NOFOLLOW), must be the checked path (on
Linux the kernel's own record of the opened file is compared, so a folder re-pointed between the
check and the open is caught) and must be a regular file (with the recorded size and time again,
where those are what vouched for it).
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from PIL import Image

from ..errors import Blip2SearchError
from ..images import decoded_pixels, open_image
from ..indexing.read import content_hash
from ..library.options import THUMBS_DIRNAME
from ..store.records import STATUS_INDEXED, STATUS_PENDING, ImageRecord

THUMBNAIL_SIDE = 320
"""Long side of a thumbnail, in pixels."""
THUMBNAIL_QUALITY = 85
_CHUNK = 256 * 1024
SERVED_STATUSES = (STATUS_INDEXED, STATUS_PENDING)
"""Images whose files are served: indexed ones, and those waiting to be re-embedded (`index --reembed`)."""
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class PhotoUnavailable(Exception):
    """The file of an image id cannot be served; `status` is the HTTP status (404), the text says why and what to do."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


@dataclass
class PhotoFile:
    """An opened, checked image file. `file` is positioned at 0; the caller closes it."""

    record: ImageRecord
    real_path: str
    file: BinaryIO
    size: int
    mtime_ns: int

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes in chunks; closes the file at the end."""
        try:
            while chunk := self.file.read(_CHUNK):
                yield chunk
        finally:
            self.file.close()


@dataclass
class ThumbnailSource:
    """A photo whose thumbnail is not cached yet, opened and checked. `pixels`: what decoding it holds at once
    (a JPEG is decoded at 1/2 to 1/8 scale, other formats in full), about 4 bytes each (8 with alpha)."""

    photo: PhotoFile
    cache_path: Path
    pixels: int

    def close(self) -> None:
        """Close the photo's file (done by `Photos.make_thumbnail`; for a caller that will not make it)."""
        self.photo.file.close()


def check_photo_path(recorded: str, is_indexed: Callable[[str], bool], recorded_stat: tuple[int, int] | None = None) -> str:
    """The real path to read for the recorded path of an indexed image, or PhotoUnavailable.

    Allowed: the recorded file itself, reached through its (possibly symlinked) folders; or, when the
    recorded path is a symlink, a target that is itself an indexed image: `is_indexed` holds for the
    target's real path, or for the path that reaches it through a symlinked folder of `recorded`
    (a folder indexed through a link records its photos under the link's name); or a target outside
    the indexed photos whose (size, mtime_ns) equal `recorded_stat`, what the index recorded for
    `recorded` (`index` stats through the link): the file that was indexed, still unchanged. `Photos.open`
    then also checks its bytes against the recorded content hash: size and mtime are the file owner's to set, so
    a bait photo given a secret file's size and mtime would otherwise vouch for the secret once the link is
    re-pointed at it.
    Refused: a symlink whose target is neither (re-pointed elsewhere, or its photo since edited), a
    missing file, and anything that is not a regular file.
    """
    return _checked(recorded, is_indexed, recorded_stat)[0]


def _checked(recorded: str, is_indexed: Callable[[str], bool], recorded_stat: tuple[int, int] | None) -> tuple[str, bool]:
    """`check_photo_path`, and whether only the recorded size and time vouch for the file (the opened file
    must then show them too: a different file renamed onto the target after the check is not the one indexed)."""
    if not os.path.isabs(recorded) or os.path.normpath(recorded) != recorded:
        raise PhotoUnavailable(f"the recorded path {recorded!r} is not a normal absolute path; re-index the folder that holds it")
    real = os.path.realpath(recorded)
    in_place = os.path.join(os.path.realpath(os.path.dirname(recorded)), os.path.basename(recorded))
    try:
        st = os.stat(real)
    except OSError:
        st = None
    by_stat = False
    if real != in_place and not any(is_indexed(name) for name in _names_of(real, recorded)):
        by_stat = True
        if st is None or recorded_stat is None or (st.st_size, st.st_mtime_ns) != tuple(recorded_stat):
            raise PhotoUnavailable(
                f"{recorded} is a symlink to a file outside the indexed photos that is not the file indexed through it "
                "(its size or modification time differ); point it back at an indexed photo, or re-index its folder"
            )
    if st is None:
        raise PhotoUnavailable(f"the file of {recorded} is gone; re-index its folder to update the library")
    if not stat.S_ISREG(st.st_mode):
        raise PhotoUnavailable(f"{recorded} is no longer a regular file; re-index its folder to update the library")
    return real, by_stat


def _names_of(real: str, recorded: str) -> Iterator[str]:
    """Paths under which the file at `real` may have been indexed: `real`, and for each folder on the way to
    `recorded` that is (under) a symlink, the path through that folder that resolves to `real` itself."""
    yield real
    folder = os.path.dirname(recorded)
    while True:
        resolved = os.path.realpath(folder)
        inside = resolved.rstrip("/") + "/"
        if resolved != folder and real.startswith(inside):
            candidate = os.path.join(folder, real[len(inside):])
            if os.path.realpath(candidate) == real:
                yield candidate
        if os.path.dirname(folder) == folder:
            return
        folder = os.path.dirname(folder)


def _recorded_stat(record: ImageRecord) -> tuple[int, int] | None:
    """(size, mtime_ns) the index recorded for the image's path, or None where it recorded none."""
    return None if record.size is None or record.mtime_ns is None else (record.size, record.mtime_ns)


def _opened_path(fd: int) -> str | None:
    """The path the kernel opened for `fd` (Linux /proc), or None where that cannot be known."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


class Photos:
    """The files of one library's indexed images, and their thumbnails cached under `thumbs_dir`."""

    def __init__(self, metadata, thumbs_dir: Path, *, side: int = THUMBNAIL_SIDE):
        self.metadata = metadata
        self.thumbs_dir = thumbs_dir
        self.side = side

    def records(self, image_ids: list[int]) -> list[ImageRecord]:
        """Records of those ids that are indexed images or wait to be re-embedded (unknown, failed and deleted
        ones are left out)."""
        return [r for r in self.metadata.get_records(image_ids) if r.status in SERVED_STATUSES]

    def record(self, image_id: int) -> ImageRecord:
        """The record of an indexed (or pending) image; PhotoUnavailable for unknown, failed or deleted ids."""
        found = self.records([image_id])
        if not found:
            raise PhotoUnavailable(f"image {image_id} is not an indexed image of this library; use an id from /api/search results")
        return found[0]

    def _is_indexed(self, path: str) -> bool:
        rec = self.metadata.get_by_paths([path]).get(path)
        return rec is not None and rec.status in SERVED_STATUSES

    def real_path(self, record: ImageRecord) -> str:
        """`check_photo_path` for a record."""
        return check_photo_path(record.path, self._is_indexed, _recorded_stat(record))

    def open(self, image_id: int) -> PhotoFile:
        """Open the checked file of an indexed image."""
        record = self.record(image_id)
        real, by_stat = _checked(record.path, self._is_indexed, _recorded_stat(record))
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except OSError:
            raise PhotoUnavailable(f"the file of image {image_id} ({record.path}) cannot be opened; check it exists and is readable") from None
        f = os.fdopen(fd, "rb")
        opened = _opened_path(fd)
        if opened is not None and opened != real:  # a folder on the way was re-pointed after the check
            f.close()
            raise PhotoUnavailable(f"the file of image {image_id} ({record.path}) changed while it was opened; try again")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise PhotoUnavailable(f"{record.path} is no longer a regular file; re-index its folder to update the library")
        if by_stat and (st.st_size, st.st_mtime_ns) != _recorded_stat(record):
            f.close()
            raise PhotoUnavailable(f"the file of image {image_id} ({record.path}) changed while it was opened; try again")
        if by_stat:  # size and mtime are the owner's to set: only the indexed bytes vouch for a file outside the photos
            with f:
                data = f.read(st.st_size + 1)
            if record.content_hash is None or content_hash(data) != record.content_hash:
                raise PhotoUnavailable(
                    f"{record.path} is a symlink to a file outside the indexed photos whose content is not the one indexed through it; "
                    "point it back at the photo, or re-index its folder")
            f = io.BytesIO(data)  # what was checked is what is served
        return PhotoFile(record, real, f, st.st_size, st.st_mtime_ns)

    def thumbnail(self, image_id: int) -> bytes:
        """The JPEG thumbnail of an image (upright, long side `side`), from the cache when the photo's size and
        mtime still match, else made and cached (not cached when the library folder is read-only).
        `cached_thumbnail` then `make_thumbnail`, for a caller that need not bound decoding memory."""
        found = self.cached_thumbnail(image_id)
        return found if isinstance(found, bytes) else self.make_thumbnail(found)

    def cached_thumbnail(self, image_id: int) -> bytes | ThumbnailSource:
        """The cached thumbnail, or the opened photo to make it from (the caller passes it to `make_thumbnail`,
        or closes it) with the pixels its decode will hold: what the server reserves before decoding."""
        photo = self.open(image_id)
        cached = self.thumbs_dir / f"{image_id}-{photo.size}-{photo.mtime_ns}-{self.side}.jpg"
        handed_over = False
        try:
            try:
                return cached.read_bytes()
            except OSError:
                pass
            source = ThumbnailSource(photo, cached, decoded_pixels(photo.file, draft_side=2 * self.side))  # the header only
            handed_over = True
            return source
        except Blip2SearchError as exc:
            raise PhotoUnavailable(f"image {image_id} cannot be shown: {exc}") from None
        finally:
            if not handed_over:
                photo.file.close()

    def make_thumbnail(self, source: ThumbnailSource) -> bytes:
        """Decode, shrink and cache the thumbnail of a `cached_thumbnail` source; closes its file."""
        image_id = source.photo.record.id
        try:
            im = open_image(source.photo.file, draft_side=2 * self.side)  # JPEGs: DCT-scaled to >= 2x the thumbnail
        except Blip2SearchError as exc:
            raise PhotoUnavailable(f"image {image_id} cannot be shown: {exc}") from None
        finally:
            source.close()
        im.thumbnail((self.side, self.side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
        data = buf.getvalue()
        try:
            self._store(image_id, source.cache_path, data)
        except OSError:
            pass  # a read-only library still gets thumbnails, just not cached ones
        return data

    def _store(self, image_id: int, target: Path, data: bytes) -> None:
        """Write atomically (readers never see half a file), then drop older thumbnails of this image."""
        self.thumbs_dir.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.thumbs_dir, prefix=".tmp-", suffix=".jpg")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for old in self.thumbs_dir.glob(f"{image_id}-*.jpg"):
            if old != target:
                old.unlink(missing_ok=True)


__all__ = ["PhotoFile", "PhotoUnavailable", "Photos", "SERVED_STATUSES", "THUMBNAIL_SIDE", "THUMBS_DIRNAME", "ThumbnailSource", "check_photo_path"]
