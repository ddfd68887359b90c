"""Find image files under the photo folders and decide, from (size, mtime) alone, what needs work.

Pure decisions live in `plan_changes`; `scan` only walks the file system.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ..errors import InvalidInputError
from ..imaging.sources import IMAGE_EXTENSIONS
from ..store.records import KnownFile as Known


@dataclass(frozen=True)
class FoundFile:
    """A file seen on disk. `error` is set (and size/mtime are 0) when it cannot even be stat'ed."""

    path: str
    size: int
    mtime_ns: int
    error: str | None = None
    folder: bool = False  # an unreadable folder: what is known under it is kept, not marked gone


@dataclass(frozen=True)
class ChangePlan:
    """What a run must do. `work` files are read and hashed (then reused or embedded); `gone` are known live
    paths under the scanned roots that are no longer on disk (moved, renamed or deleted)."""

    unchanged: tuple[str, ...]
    work: tuple[FoundFile, ...]
    unreadable: tuple[FoundFile, ...]
    gone: tuple[str, ...]


def is_image_name(name: str) -> bool:
    """True when the file name has an image extension we index (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_roots(roots: Iterable[str | os.PathLike], *, library: str | os.PathLike | None = None) -> list[str]:
    """Absolute, existing directories; a missing or non-directory root, or one that is the `library`
    folder or inside it (its photos would be skipped as library files), is an InvalidInputError naming it."""
    out = []
    lib = os.path.realpath(os.path.expanduser(library)) if library is not None else None
    for root in roots:
        if not os.fspath(root):  # Path('') is the current folder: an unset variable would index it
            raise InvalidInputError(f"photo folder {os.fspath(root)!r} is empty; pass a folder to index ('.' for the current one)")
        p = Path(root).expanduser()
        if not p.exists():
            raise InvalidInputError(f"photo folder {str(root)!r} does not exist; pass an existing folder to index")
        if not p.is_dir():
            raise InvalidInputError(f"photo folder {str(root)!r} is a file, not a folder; pass the folder that holds it")
        real = os.path.realpath(p)
        if lib is not None and (real == lib or real.startswith(lib.rstrip(os.sep) + os.sep)):
            raise InvalidInputError(f"photo folder {str(root)!r} is the library folder or inside it; keep the library in its own "
                                    "folder (e.g. indexes/NAME, or one beside the photos)")
        out.append(os.path.abspath(p))
    if not out:
        raise InvalidInputError("no photo folder given; pass at least one folder to index")
    return out


def scan(roots: Iterable[str], *, skip: Iterable[str] = ()) -> Iterator[FoundFile]:
    """Yield every image-named file under `roots` (following symlinks, each real directory once).

    Hidden entries (".name") and the folders in `skip` (e.g. the library itself) are not entered.
    Broken symlinks, symlink loops and unstat-able files are yielded with `error` set, not dropped.
    """
    skip_real = {os.path.realpath(s) for s in skip}
    seen_dirs: set[tuple[int, int]] = set()
    stack = list(reversed(list(roots)))
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs or os.path.realpath(d) in skip_real:
            continue
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            reason = (f"{_UNREADABLE_FOLDER} ({exc.strerror}); the photos indexed under it are kept as they were; "
                      "fix its permissions (or reconnect the drive) and index again")
            yield FoundFile(os.path.normpath(d), 0, 0, reason, folder=True)
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    subdirs.append(entry.path)
                    continue
            except OSError:
                pass
            if not is_image_name(entry.name):
                continue
            yield _stat_file(entry.path)
        stack.extend(reversed(subdirs))


def empty_roots(roots: Iterable[str], found: Iterable[FoundFile]) -> list[str]:
    """The `roots` under which `found` (what `scan` yielded) holds nothing at all: no image file, and no
    entry that could not be read either."""
    roots = list(roots)
    paths = [f.path for f in found]
    empty = [r for r in roots if not any(p == r or p.startswith(r.rstrip(os.sep) + os.sep) for p in paths)]
    if not empty:
        return []
    real = {r: os.path.realpath(r) for r in roots}

    def overlap(a: str, b: str) -> bool:  # one real folder inside (or equal to) the other
        return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)

    # scan visits each real folder once: a root that is another one's alias (or inside it, or holding it) yields nothing itself
    return [r for r in empty if not any(other != r and overlap(real[r], real[other]) for other in roots)]


def no_images_note(root: str) -> str:
    """What a run says of a folder named to index in which the scan found no image file."""
    return (f"no image files found under {root!r} (supported: {', '.join(sorted(IMAGE_EXTENSIONS))}; names starting with '.' "
            "are skipped); check that it is the folder that holds the photos")


_UNREADABLE_FOLDER = "folder cannot be read"


def unreadable_folder_note(folder: FoundFile) -> str:
    """What a run says of a folder that `scan` could not list (yielded with `folder` set and the reason)."""
    return f"folder {folder.path!r} cannot be read{folder.error[len(_UNREADABLE_FOLDER):]}"


def stat_files(paths: Iterable[str]) -> list[FoundFile]:
    """The files at `paths` as `scan` would report them (those that cannot be stat'ed carry `error`)."""
    return [_stat_file(p) for p in paths]


def _stat_file(path: str) -> FoundFile:
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            reason = "symlink loop; remove or fix the link"
        elif os.path.islink(path):
            reason = f"broken symlink to {os.readlink(path)!r}; remove the link or restore its target"
        else:
            reason = f"cannot stat ({exc.strerror}); check the file's permissions"
        return FoundFile(path, 0, 0, reason)
    if not stat.S_ISREG(st.st_mode):
        return FoundFile(path, 0, 0, "not a regular file; only image files are indexed")
    return FoundFile(path, st.st_size, st.st_mtime_ns)


def plan_changes(found: Iterable[FoundFile], known: Mapping[str, Known], roots: Iterable[str], *, rehash: bool = False) -> ChangePlan:
    """Split what was found against what is known: unchanged (same size and mtime, indexed) are skipped
    without reading; new, changed and previously failed files are work; known live paths under `roots`
    that were not found are gone. `rehash`: every file is work (read and hashed; content already
    embedded is reused, so only files whose bytes changed are embedded)."""
    unchanged, work, unreadable = [], [], []
    seen: set[str] = set()
    for f in found:
        seen.add(f.path)
        if f.error:
            unreadable.append(f)
            continue
        k = known.get(f.path)
        if not rehash and k is not None and k.status == "indexed" and k.size == f.size and k.mtime_ns == f.mtime_ns:
            unchanged.append(f.path)
        else:
            work.append(f)
    prefixes = tuple(r.rstrip(os.sep) + os.sep for r in roots)
    unseen = tuple(f.path.rstrip(os.sep) + os.sep for f in unreadable if f.folder)  # not listed: nothing there is gone
    gone = [p for p, k in known.items()
            if k.status != "deleted" and p not in seen and p.startswith(prefixes) and not p.startswith(unseen)
            and not _hidden_under(p, prefixes)]
    return ChangePlan(tuple(unchanged), tuple(work), tuple(unreadable), tuple(sorted(gone)))


def _hidden_under(path: str, prefixes: tuple[str, ...]) -> bool:
    """Is `path` inside a hidden entry (".name") below the root it is under? `scan` does not enter those, so a
    photo indexed there (its folder named as a root itself) is not gone when its parent folder is indexed."""
    root = closest_root(path, prefixes)  # (one root may be hidden itself)
    return any(part.startswith(".") for part in path[len(root):].split(os.sep))


def closest_root(path: str, prefixes: tuple[str, ...]) -> str:
    """The longest of `prefixes` (roots ending in a separator) that `path` starts with: the root it is under."""
    return max((p for p in prefixes if path.startswith(p)), key=len)
