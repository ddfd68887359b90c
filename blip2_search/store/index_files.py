"""A vector index on disk: atomic writes, the JSON sidecar that says what built it, the pair lock.

This module writes a FAISS file (the compact index): ``vectors.faiss`` first, then its sidecar
``vectors.faiss.json``; ``exact_files`` writes the exact index's row files with the same sidecar (its
commit), lock and atomic writes. Each file is written by: write a temporary file in the same folder,
fsync it, ``os.replace`` it over the old one, fsync the folder. A crash at any point leaves either the
old or the new version of each file, and a new index beside an old sidecar reads as stale (the
sidecar's generation is older), so the caller rebuilds.

Two processes may save the same index (an `index` run, and a search that rebuilt a stale file), and
a third may read it meanwhile: ``vectors.faiss.lock`` is held exclusively for a save's writes and
shared for a read, so neither a saved set of files nor one read mixes two saves (an old index under a
newer sidecar of the same size would otherwise pass as current). A save, holding it, first removes
what killed saves left (``tidy``).
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss

from blip2_search.errors import LibraryError

SIDECAR_SUFFIX = ".json"
DATA_SUFFIX, IDS_SUFFIX = ".f32", ".ids"
"""Suffixes of an exact index's row files (``exact_files``): ``<stem>.<token>.f32`` and ``.ids``."""
LOCK_SUFFIX = ".lock"
SIDECAR_FORMAT = 1
"""The sidecar ``format`` of an index in one FAISS file."""
ROWS_FORMAT = 2
"""The sidecar ``format`` of an exact index in row files (``exact_files``)."""
EXACT_STORE = "exact"
COMPACT_STORE = "compact"

LoadState = Literal["ok", "missing", "stale", "invalid"]


@dataclass(frozen=True)
class IndexInfo:
    """What the sidecar records about a saved index (``index_infos.json`` style).

    ``params``: the store's build parameters; ``params["store"]`` names the store class that
    wrote it (``exact`` or ``compact``; sidecars without it were written by the exact store).
    """

    factory: str
    metric: str
    num_query_tokens: int
    dim: int
    images: int
    vectors: int
    vectors_generation: int
    faiss_version: str
    index_bytes: int
    format: int = SIDECAR_FORMAT
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> str:
        """Which store wrote the index: ``exact`` or ``compact``."""
        return str(self.params.get("store", EXACT_STORE))


def sidecar_path(index_path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar beside ``index_path`` (``<index>.json``)."""
    path = Path(index_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def lock_path(index_path: str | os.PathLike[str]) -> Path:
    """The lock file beside ``index_path`` (``<index>.lock``) that keeps its two files a pair."""
    path = Path(index_path)
    return path.with_name(path.name + LOCK_SUFFIX)


@contextmanager
def _pair_lock(index_path: Path, *, exclusive: bool) -> Iterator[bool]:
    """Hold the index's lock file: exclusively to write the index and its sidecar, shared to read them.

    The lock file is as writable as its folder (a library shared by a group), and opened read-only where it
    cannot be opened for writing (flock needs no write access). Where it cannot be opened at all (read-only
    media, where nothing saves) or the file system has no locks (some network mounts), the files are used
    unlocked, as before the lock existed. On NFS, flock is a per-process POSIX lock: threads of one process
    do not exclude each other there. Yields whether the lock is held.
    """
    descriptor = _lock_descriptor(lock_path(index_path))
    try:
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError:  # ENOLCK, EOPNOTSUPP: no locks on this file system
                os.close(descriptor)
                descriptor = None
        yield descriptor is not None
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


def _lock_descriptor(target: Path) -> int | None:
    """The lock file opened (made as writable as its folder when new), or None when it cannot be opened."""
    try:
        descriptor = os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            return os.open(target, os.O_RDONLY)
        except OSError:
            return None
    try:
        if os.fstat(descriptor).st_uid == os.geteuid():
            os.fchmod(descriptor, target.parent.stat().st_mode & 0o666)
    except OSError:
        pass  # it still locks; another user may not be able to open it for writing, and opens it read-only
    return descriptor


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles (Windows) make os.replace durable themselves
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


STALE_TEMPORARY_S = 3600
"""A temporary of `atomic_write` this old was left by a killed run (a save takes seconds): removed."""


def _remove_stale_temporaries(path: Path, older_than_s: float = STALE_TEMPORARY_S, *, pattern: str | None = None) -> None:
    now = time.time()
    for leftover in path.parent.glob(pattern or f"{glob.escape(path.name)}.*.tmp"):
        try:
            if now - leftover.stat().st_mtime >= older_than_s:
                leftover.unlink()
        except OSError:
            pass  # gone meanwhile, or not ours to remove


def remove_leftovers(path: str | os.PathLike[str]) -> None:
    """Remove what killed saves of the index at ``path`` left (index-sized files): for the holder of the library's
    lock, at the start of an `index` or `prune`. It waits for a save in progress (a search that rebuilt the
    index may be saving it). See ``tidy``."""
    path = Path(path)
    with _pair_lock(path, exclusive=True) as locked:
        tidy(path, locked=locked)


def tidy(target: Path, *, locked: bool) -> None:
    """Remove the temporaries of the index's files (``<stem>.*.tmp``) and the index files its sidecar does not
    name (a save killed after its commit left its predecessor's). The caller holds the exclusive pair lock
    (``locked``), so no save is in progress: all go. Where the file system has no locks, only temporaries older
    than ``STALE_TEMPORARY_S`` go (a save's own commit removes what it replaced)."""
    _remove_stale_temporaries(target, older_than_s=0 if locked else STALE_TEMPORARY_S,
                              pattern=f"{glob.escape(target.stem)}.*.tmp")
    if not locked:
        return  # another save may be between writing its files and committing them: they are unnamed until then
    try:
        info = read_sidecar(target)
    except (OSError, ValueError, TypeError):
        return  # no commit to go by: nothing is known to be unused
    if info.format == SIDECAR_FORMAT:
        remove_unnamed(target, {target.name})
    elif info.format == ROWS_FORMAT and isinstance(info.params.get("data"), str) and isinstance(info.params.get("ids"), str):
        remove_unnamed(target, {info.params["data"], info.params["ids"]})


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``write`` fills a temporary file in the same folder, which is
    fsynced and moved over ``path``; the folder is fsynced. On error the temporary is removed."""
    _remove_stale_temporaries(path)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, path.parent.stat().st_mode & 0o666)  # as readable as its folder (mkstemp makes 0600)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_index_files(index: faiss.Index, path: str | os.PathLike[str], info: IndexInfo) -> IndexInfo:
    """Save ``index`` and its sidecar atomically; return the sidecar as written.

    ``info.index_bytes`` is filled in here. Raises LibraryError naming the path on OS errors.
    """
    target = Path(path)
    with saving(target):
        atomic_write(target, lambda temporary: faiss.write_index(index, str(temporary)))
        written = IndexInfo(**{**asdict(info), "index_bytes": target.stat().st_size})
        write_sidecar(target, written)
        remove_unnamed(target, {target.name})  # an exact index's row files, when a compact index replaced it
    return written


@contextmanager
def saving(target: Path) -> Iterator[None]:
    """A save of the index at ``target``: the exclusive pair lock held, what killed saves left removed first
    (``tidy``), and OS errors (FAISS's write errors too) raised as one LibraryError naming the index and the fix."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _pair_lock(target, exclusive=True) as locked:
            tidy(target, locked=locked)
            yield
    except (OSError, RuntimeError) as error:
        raise LibraryError(
            f"cannot save vector index {target} ({error}); free disk space or make the folder "
            "writable, then run the command again"
        ) from error


def write_sidecar(target: Path, info: IndexInfo) -> None:
    """Replace the sidecar of the index at ``target`` atomically (the caller holds the exclusive pair lock)."""
    text = json.dumps(asdict(info), indent=2, sort_keys=True)
    atomic_write(sidecar_path(target), lambda temporary: temporary.write_text(text, encoding="utf-8"))


def files_of_index(target: str | os.PathLike[str]) -> list[Path]:
    """Every file of the vector index at ``target`` that exists: its FAISS file or row files, and its sidecar."""
    target = Path(target)
    found = [path for path in (target, sidecar_path(target)) if path.exists()]
    for suffix in (DATA_SUFFIX, IDS_SUFFIX):
        found += sorted(target.parent.glob(f"{glob.escape(target.stem)}.*{suffix}"))
    return found


def remove_unnamed(target: Path, keep: set[str]) -> None:
    """Remove the files of the index at ``target`` (its FAISS file, row files) whose names are not in ``keep``:
    what the sidecar just written no longer names. The caller holds the exclusive pair lock. Best effort: a
    file that cannot be removed stays."""
    removed = False
    for path in files_of_index(target):
        if path.name not in keep and path != sidecar_path(target):
            try:
                path.unlink(missing_ok=True)
                removed = True
            except OSError:
                pass  # not ours to remove (another user's library): a later save by its owner removes it
    if removed:
        _fsync_dir(target.parent)


def save_vector_index(
    index: faiss.Index,
    path: str | os.PathLike[str],
    *,
    factory: str,
    num_query_tokens: int,
    dim: int,
    images: int,
    vectors: int,
    generation: int,
    params: dict[str, Any],
) -> IndexInfo:
    """`write_index_files` for a vector store's FAISS index, its sidecar filled from the store's facts."""
    info = IndexInfo(
        factory=factory,
        metric="inner_product",
        num_query_tokens=num_query_tokens,
        dim=dim,
        images=images,
        vectors=vectors,
        vectors_generation=int(generation),
        faiss_version=faiss.__version__,
        index_bytes=0,
        params=params,
    )
    return write_index_files(index, path, info)


def read_sidecar(path: str | os.PathLike[str]) -> IndexInfo:
    """The sidecar of the index at ``path``; raises OSError, ValueError or TypeError when unreadable."""
    info = IndexInfo(**json.loads(sidecar_path(Path(path)).read_text(encoding="utf-8")))
    if not isinstance(info.params, dict):  # damaged but still JSON: read as unreadable (rebuilt), not a crash
        raise ValueError(f"sidecar params {info.params!r} are not a JSON object")
    return info


def saved_generation(path: str | os.PathLike[str]) -> int | None:
    """The vectors generation an index file was saved at (from its sidecar), or None when unreadable."""
    try:
        return read_sidecar(path).vectors_generation
    except (OSError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class ReadIndex:
    """The outcome of reading index files: ``index`` is set only when ``state`` is ``"ok"``."""

    state: LoadState
    reason: str
    index: Any = None
    info: IndexInfo | None = None


def read_index_files(
    path: str | os.PathLike[str],
    *,
    expected_generation: int,
    factory: str | None,
    num_query_tokens: int,
    dim: int,
    store: str = EXACT_STORE,
) -> ReadIndex:
    """Read an index saved by ``write_index_files`` if it is current and matches the shape.

    ``factory`` None accepts any factory (the caller checks it and ``info.params``); ``store``
    must match the sidecar's. ``state``: ``missing`` (no files), ``invalid`` (unreadable, or built
    for another shape, factory or store), ``stale`` (older generation than
    ``expected_generation``), or ``ok``.
    """
    target = Path(path)
    if not target.exists() or not sidecar_path(target).exists():
        return ReadIndex("missing", f"no vector index at {target}")
    with _pair_lock(target, exclusive=False):  # both files from one save
        return _read_pair(target, expected_generation, factory, num_query_tokens, dim, store)


def _read_pair(
    target: Path, expected_generation: int, factory: str | None, num_query_tokens: int, dim: int, store: str
) -> ReadIndex:
    sidecar = sidecar_path(target)
    if not target.exists() or not sidecar.exists():
        return ReadIndex("missing", f"no vector index at {target}")
    try:
        info = read_sidecar(target)
    except (OSError, ValueError, TypeError) as error:
        return ReadIndex("invalid", f"unreadable sidecar {sidecar} ({error})")
    expected = (store, factory or info.factory, num_query_tokens, dim, SIDECAR_FORMAT)
    found = (info.store, info.factory, info.num_query_tokens, info.dim, info.format)
    if found != expected:
        return ReadIndex("invalid", f"index {target} was built as {found}, expected {expected}", info=info)
    if info.vectors_generation != expected_generation:
        return ReadIndex(
            "stale",
            f"index {target} has vectors generation {info.vectors_generation}, "
            f"the library is at {expected_generation}",
            info=info,
        )
    if target.stat().st_size != info.index_bytes:
        return ReadIndex("stale", f"index {target} does not match its sidecar (size differs)", info=info)
    try:
        index = faiss.read_index(str(target))
    except RuntimeError as error:
        return ReadIndex("invalid", f"unreadable index {target} ({str(error).splitlines()[0]})", info=info)
    if index.ntotal != info.vectors or index.d != dim:
        return ReadIndex(
            "invalid", f"index {target} holds {index.ntotal} vectors, sidecar says {info.vectors}", info=info
        )
    return ReadIndex("ok", "current", index=index, info=info)
