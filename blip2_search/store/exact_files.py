"""The exact vector index on disk: rows of vectors appended in place, and the ids of those rows.

An exact index is two data files beside the sidecar ``vectors.faiss.json`` (``index_files``), which
names both and is the commit:

- ``vectors.<token>.f32``: one row an image, ``Q x D`` float32 (native order), no header. Rows are only
  ever added past the ones the sidecar counts: a committed row never changes in place;
- ``vectors.<token>.ids``: ``[rows] int64``, the image id of each row, ``-1`` for a row whose image was
  removed or replaced since (a tombstone).

An index run that changed a few photos appends their rows and writes a new ids file, then replaces
the sidecar: it neither reads nor rewrites the rest. A killed save leaves the previous sidecar, whose
rows are whole (what was written past them is cut off by the next save). When a quarter of the rows
are dead, or the index is rebuilt, the save writes a new data file under a new token instead, so a
reader that opened the old one keeps reading what it opened. After a save, the files of the index the
sidecar no longer names are removed (also a FAISS file of the older layout, or of a compact index).

Readers hold the pair lock shared while they read the sidecar and the ids and open the data file;
the rows they then read cannot change under them. Savers hold it exclusively.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from blip2_search.errors import CorruptIndexError
from blip2_search.store.index_choice import EXACT_FACTORY
from blip2_search.store.index_files import (
    DATA_SUFFIX,
    IDS_SUFFIX,
    ROWS_FORMAT,
    IndexInfo,
    LoadState,
    _pair_lock,
    atomic_write,
    read_sidecar,
    remove_unnamed,
    saving,
    sidecar_path,
    write_sidecar,
)

DEAD = -1
"""The id of a row whose image was removed or replaced."""
COMPACT_DEAD_SHARE = 0.25
"""A save rewrites the rows into a new data file once more than this share of them is dead."""
PRUNE_DEAD_SHARE = 0.10
"""A save asked to compact (``prune``) rewrites them from this share on, as ``prune`` compacts the database from
10% free: below it, the rewrite's cost (the whole file read and written) buys little space."""


@dataclass(frozen=True)
class RowFiles:
    """A committed exact index: its data and ids files (names in ``folder``) and its row count."""

    folder: Path
    data: str
    ids: str
    rows: int

    @property
    def data_path(self) -> Path:
        return self.folder / self.data

    @property
    def ids_path(self) -> Path:
        return self.folder / self.ids


def row_bytes(num_query_tokens: int, dim: int) -> int:
    """Bytes of one image's row in the data file."""
    return num_query_tokens * dim * 4


def uses_rows(info: IndexInfo | None) -> bool:
    """Whether a sidecar describes this layout (rather than a FAISS file)."""
    return info is not None and info.format == ROWS_FORMAT


@dataclass(frozen=True)
class ReadRows:
    """The outcome of ``read_rows``: on ``ok``, the files, their row ids and the data file opened
    for reading (the caller closes it); otherwise ``state`` and ``reason`` say why not."""

    state: LoadState
    reason: str
    info: IndexInfo | None = None
    files: RowFiles | None = None
    row_ids: np.ndarray | None = None
    data: BinaryIO | None = None


def read_rows(
    path: str | os.PathLike[str], *, expected_generation: int, num_query_tokens: int, dim: int, store: str, writable: bool = False
) -> ReadRows:
    """Read the sidecar and row ids of the exact index at ``path`` and open its data file
    (``writable``: for appending too, where the file allows it; else read-only)."""
    target = Path(path)
    if not sidecar_path(target).exists():
        return ReadRows("missing", f"no vector index at {target}")
    with _pair_lock(target, exclusive=False):
        return _read(target, expected_generation, num_query_tokens, dim, store, writable)


def _read(target: Path, expected_generation: int, q: int, d: int, store: str, writable: bool) -> ReadRows:
    sidecar = sidecar_path(target)
    try:
        info = read_sidecar(target)
        files = _files_of(target.parent, info)
    except FileNotFoundError:
        return ReadRows("missing", f"no vector index at {target}")
    except (OSError, ValueError, TypeError, KeyError) as error:
        return ReadRows("invalid", f"unreadable sidecar {sidecar} ({error})")
    expected = (store, EXACT_FACTORY, q, d, ROWS_FORMAT)
    found = (info.store, info.factory, info.num_query_tokens, info.dim, info.format)
    if found != expected:
        return ReadRows("invalid", f"index {target} was built as {found}, expected {expected}", info)
    if info.vectors_generation != expected_generation:
        return ReadRows("stale", f"index {target} has vectors generation {info.vectors_generation}, "
                        f"the library is at {expected_generation}", info)
    try:
        row_ids = np.fromfile(files.ids_path, dtype=np.int64)
    except (OSError, ValueError) as error:
        return ReadRows("invalid", f"unreadable row ids {files.ids_path} ({error})", info)
    live = row_ids[row_ids != DEAD]
    if len(row_ids) != files.rows or len(live) != info.images or (live < 0).any() or len(np.unique(live)) != len(live):
        return ReadRows("invalid", f"row ids {files.ids_path} do not match the sidecar {sidecar}", info)
    data = _open_data(files.data_path, writable)
    if data is None:
        return ReadRows("invalid", f"cannot open the vectors {files.data_path}", info)
    if os.fstat(data.fileno()).st_size < files.rows * row_bytes(q, d):
        data.close()
        return ReadRows("invalid", f"vectors {files.data_path} hold fewer rows than the sidecar {sidecar} counts", info)
    return ReadRows("ok", "current", info, files, row_ids, data)


def _files_of(folder: Path, info: IndexInfo) -> RowFiles:
    params = info.params
    names = (str(params["data"]), str(params["ids"]))
    if any(os.sep in name or name.startswith(".") for name in names):
        raise ValueError(f"file names {names} are not plain names in the library folder")
    return RowFiles(folder, names[0], names[1], int(params["rows"]))


def _open_data(path: Path, writable: bool) -> BinaryIO | None:
    for mode in (("r+b", "rb") if writable else ("rb",)):
        try:
            return open(path, mode)  # noqa: SIM115 - the caller owns it
        except OSError:
            continue
    return None


def read_vectors(data: BinaryIO, row_ids: np.ndarray, out: np.ndarray, num_query_tokens: int, dim: int) -> None:
    """Read the live rows (``row_ids != -1``) of ``data`` in order into ``out [live, Q, D] float32``
    (a view into the index's own storage: no second copy), one read a run of live rows."""
    read_rows_at(data, np.flatnonzero(row_ids != DEAD), out, num_query_tokens, dim)


def read_rows_at(data: BinaryIO, positions: np.ndarray, out: np.ndarray, num_query_tokens: int, dim: int) -> None:
    """Read the rows at ``positions`` (ascending) of ``data`` into ``out [len(positions), Q, D] float32``, one
    read a run of consecutive positions."""
    size = row_bytes(num_query_tokens, dim)
    if not len(positions):
        return
    flat = out.reshape(len(positions), size // 4).view(np.uint8).reshape(-1)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    written = 0
    for run in np.split(positions, breaks):
        first, count = int(run[0]), len(run)
        view = memoryview(flat[written * size : (written + count) * size])
        got = 0
        while got < len(view):
            n = os.preadv(data.fileno(), [view[got:]], first * size + got)
            if n <= 0:
                raise CorruptIndexError(f"vectors file {data.name} ends before its row {first + count} (it was cut short); "
                                        "delete the library's vectors.faiss.json and the index is rebuilt from the database")
            got += n
        written += count


def write_rows(data: BinaryIO, first_row: int, vectors: np.ndarray) -> None:
    """Write ``vectors [n, Q, D] float32`` as rows ``first_row...`` of ``data`` (in place, unsynced)."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    view = memoryview(array.reshape(-1).view(np.uint8))
    offset = first_row * (array[0].nbytes if len(array) else 0)
    done = 0
    while done < len(view):
        done += os.pwrite(data.fileno(), view[done:], offset + done)


def _new_name(target: Path, suffix: str) -> str:
    return f"{target.stem}.{secrets.token_hex(6)}{suffix}"


def save_full(
    target: Path, info: IndexInfo, image_ids: np.ndarray, chunks: Iterable[np.ndarray], *, keep_open: bool = False
) -> tuple[IndexInfo, RowFiles, BinaryIO | None]:
    """Write a new data file (rows of ``chunks``, ``[n, Q, D]`` each, for ``image_ids`` in order), its ids
    and the sidecar; remove the files the sidecar named before. Returns the sidecar, the files and, with
    ``keep_open``, the new data file opened under the lock (for appending where it can be written). Raises
    LibraryError naming the path."""
    size = row_bytes(info.num_query_tokens, info.dim)

    def fill(temporary: Path) -> None:
        with open(temporary, "wb") as out:
            for chunk in chunks:
                out.write(np.ascontiguousarray(chunk, dtype=np.float32).tobytes())

    with saving(target):
        files = RowFiles(target.parent, _new_name(target, DATA_SUFFIX), _new_name(target, IDS_SUFFIX), len(image_ids))
        atomic_write(files.data_path, fill)
        if files.data_path.stat().st_size != files.rows * size:
            raise OSError(f"wrote {files.data_path.stat().st_size} bytes of vectors, expected {files.rows * size}")
        written = _commit(target, info, files, np.asarray(image_ids, dtype=np.int64))
        return written, files, _open_data(files.data_path, writable=True) if keep_open else None


def save_appended(
    target: Path, info: IndexInfo, base: RowFiles, row_ids: np.ndarray, written_rows: int, tail: Iterable[np.ndarray]
) -> tuple[IndexInfo, RowFiles, BinaryIO] | None:
    """Commit more rows of ``base``'s data file: ``row_ids`` for every row (tombstones included); rows up to
    ``written_rows`` are in the file already (``base``'s, and any the store wrote past them), ``tail``
    (``[t, Q, D]`` chunks) follows them. Returns the sidecar, the files and the data file, still open for
    reading and writing (opened under the lock: the file the sidecar names); None, writing nothing, when
    the sidecar no longer names ``base`` (another process saved since)."""
    size = row_bytes(info.num_query_tokens, info.dim)
    with saving(target):
        try:
            current = _files_of(target.parent, read_sidecar(target))
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if current != base:
            return None
        data = open(base.data_path, "r+b")  # noqa: SIM115 - returned open
        try:
            if os.fstat(data.fileno()).st_size < written_rows * size:
                raise CorruptIndexError(f"vectors file {base.data_path} is shorter than the rows written to it (damaged?); "
                                        "delete the library's vectors.faiss.json and the index is rebuilt from the database")
            end = written_rows
            for chunk in tail:
                write_rows(data, end, chunk)
                end += len(chunk)
            if len(row_ids) != end:
                raise ValueError(f"{len(row_ids)} row ids for {end} rows")
            os.ftruncate(data.fileno(), end * size)  # what a killed save wrote past these rows
            os.fsync(data.fileno())
            files = RowFiles(target.parent, base.data, _new_name(target, IDS_SUFFIX), end)
            return _commit(target, info, files, row_ids), files, data
        except BaseException:
            data.close()
            raise


def _commit(target: Path, info: IndexInfo, files: RowFiles, row_ids: np.ndarray) -> IndexInfo:
    atomic_write(files.ids_path, lambda temporary: np.ascontiguousarray(row_ids, dtype=np.int64).tofile(temporary))
    live = int((row_ids != DEAD).sum())
    params: dict[str, Any] = {**info.params, "data": files.data, "ids": files.ids, "rows": files.rows}
    written = replace(info, format=ROWS_FORMAT, factory=EXACT_FACTORY, images=live, vectors=live * info.num_query_tokens,
                      index_bytes=files.rows * row_bytes(info.num_query_tokens, info.dim), params=params)
    write_sidecar(target, written)
    remove_unnamed(target, {files.data, files.ids})
    return written
