"""The library's metadata store: opening (engine, migrations, model check) and queries.

``open_metadata`` is the entry point. ``MetadataStore`` returns frozen records (``records.py``),
never ORM rows; every database error leaves it as a one-line ``LibraryError``. Writes that change
which vectors are live (upsert, fail, delete, reset) bump ``vectors_generation`` in the same
transaction, so a FAISS file stamped with an older generation is known to be stale.
The write operations live in ``updates.py``; this module holds opening and reading.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
from sqlalchemy import URL, Connection, Engine, Text, exists, func, select, type_coerce

from blip2_search.errors import OPEN_FOLDER, REEMBED, REEMBED_WITH, InvalidInputError, LibraryError, ModelMismatchError
from blip2_search.store import updates
from blip2_search.store.captions import search_captions
from blip2_search.store.codec import ESCAPED_PREFIX, blobs_to_vectors, decode_path
from blip2_search.store.engine import (
    create_library_engine,
    describe_url,
    read_transaction,
    resolve_location,
    translate_errors,
    vacuum,
    write_transaction,
)
from blip2_search.store.migrations import migrate
from blip2_search.store.records import (
    STATUS_DELETED,
    STATUS_FAILED,
    STATUS_INDEXED,
    STATUS_PENDING,
    CaptionUpdate,
    EmbedderInfo,
    EmbeddingRecord,
    FailedFile,
    Failure,
    ImageRecord,
    IndexedImage,
    KnownFile,
    LibraryInfo,
    ModelRef,
    StatusCounts,
)
from blip2_search.store.rows import (
    CHUNK,
    EMBEDDING_ROWS,
    ChangedVectors,
    LiveVectors,
    chunks,
    iter_caption_vectors,
    library_info_record,
    read_embedder,
    read_info,
    to_embedding_record,
    to_image_record,
)
from blip2_search.store.schema import (
    INFO_CAPTIONS_GENERATION,
    INFO_CHANGES_SINCE,
    INFO_VECTOR_INDEX,
    INFO_EMBEDDER_SINCE,
    INFO_VECTORS_GENERATION,
    caption_vectors,
    embeddings,
    images,
)

DEFAULT_BUSY_TIMEOUT_S = 10.0
"""How long a write waits for another process's write lock before failing as 'locked'."""


def open_metadata(
    url_or_path: str | os.PathLike[str],
    *,
    create: bool,
    embedder: EmbedderInfo | None = None,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
) -> MetadataStore:
    """Open (or with ``create`` create) a library's metadata and migrate it to the current schema.

    ``url_or_path``: a library folder (its ``metadata.sqlite``), a SQLite file, or a SQLAlchemy
    URL such as ``postgresql://...``. With ``embedder``, the library records it when it has none
    and raises ModelMismatchError when it recorded a different one. Raises LibraryError for a
    missing, read-only, locked, corrupt or too-new library.
    """
    text = os.fspath(url_or_path)
    url, path = resolve_location(text)
    location = str(path) if path is not None else describe_url(url)
    read_only = path is not None and _check_sqlite_file(path, location, create=create, check_folder="://" not in text)
    if read_only:
        url = read_only_url(path)  # a library on read-only media: searched, never written
    engine = create_library_engine(url, busy_timeout_s=busy_timeout_s)
    try:
        with translate_errors(location):
            migrate(engine, location, create=create, read_only=read_only)
        store = MetadataStore(engine, location, path)
        if embedder is not None:
            store.ensure_embedder(embedder)
    except BaseException:
        engine.dispose()
        raise
    return store


def _check_sqlite_file(path: Path, location: str, *, create: bool, check_folder: bool) -> bool:
    """Whether the library is on read-only media (it then opens read-only); LibraryError when it cannot open."""
    if not path.exists():
        if not create:
            raise LibraryError("no library at {location}; index photos into it first or name the right library folder ({open})",
                               location=location, open=OPEN_FOLDER)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LibraryError("cannot create library folder {folder} ({reason}); choose a writable library folder ({open})",
                               folder=path.parent, reason=error.strerror, open=OPEN_FOLDER) from error
    if not check_folder or os.access(path.parent, os.W_OK):
        return False
    if not on_read_only_media(path.parent):  # only unwritable to us: its owner may be writing it, which SQLite must see
        raise LibraryError(
            f"library folder {path.parent} is read-only (SQLite needs to write its journal there); "
            "make it writable or copy the library to a writable folder"
        )
    journal = path.with_name(path.name + "-wal")
    if journal.exists() and journal.stat().st_size:
        raise LibraryError(
            f"library {location} is on read-only media with an unfinished write-ahead log ({journal.name}), which a "
            "read-only opening cannot fold in; open the library once where it is writable (e.g. `blip2-search status`), then copy it again"
        )
    return True


def on_read_only_media(folder: Path) -> bool:
    """Whether `folder` is on a file system mounted read-only (a DVD, a read-only share or snapshot)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False


def read_only_url(path: Path) -> URL:
    """A SQLite URL that opens `path` read-only and immutable: no journal, no locks (nothing can change it)."""
    return URL.create("sqlite", database=f"file:{quote(str(path.absolute()), safe='/')}", query={"mode": "ro", "immutable": "1", "uri": "true"})


class MetadataStore:
    """Images, embeddings and library facts of one library. Create with ``open_metadata``."""

    def __init__(self, engine: Engine, location: str, path: Path | None) -> None:
        self._engine = engine
        self._closed = False
        self.location = location
        """The SQLite file or the URL (password hidden), as named in messages."""
        self.path = path
        """The SQLite file, or None for a server database."""

    def close(self) -> None:
        """Release all database connections; later reads and writes raise LibraryError."""
        self._engine.dispose()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise LibraryError(f"library {self.location} was closed; open it again (Library.open) to use it")

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        self._check_open()
        with translate_errors(self.location), read_transaction(self._engine) as connection:
            yield connection

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        self._check_open()
        with translate_errors(self.location), write_transaction(self._engine) as connection:
            yield connection

    # -- library facts ---------------------------------------------------------------------

    def info(self) -> LibraryInfo:
        """Schema version, creation time, recorded models and the vectors generation."""
        with self._read() as connection:
            return library_info_record(connection)

    def vectors_generation(self) -> int:
        """The counter bumped by every committed change to the live vectors."""
        with self._read() as connection:
            return int(read_info(connection)[INFO_VECTORS_GENERATION])

    def embedder_since(self) -> int | None:
        """The vectors generation from which every saved vector index holds the recorded embedder's vectors (a
        `--reembed` moves it past the index saved before); None when not recorded (a library not indexed since
        this was kept): then an index that is not current is not known to hold them."""
        with self._read() as connection:
            since = read_info(connection).get(INFO_EMBEDDER_SINCE)
        return None if since is None else int(since)

    def captions_generation(self) -> int:
        """The counter bumped by `captions_changed` (captions written after their images were indexed)."""
        with self._read() as connection:
            return int(read_info(connection).get(INFO_CAPTIONS_GENERATION, 0))

    def generations(self) -> tuple[int, int]:
        """``(vectors_generation, captions_generation)`` in one read: what a long-lived reader checks per request."""
        with self._read() as connection:
            info = read_info(connection)
        return int(info[INFO_VECTORS_GENERATION]), int(info.get(INFO_CAPTIONS_GENERATION, 0))

    def captions_changed(self) -> int:
        """Tell long-lived readers (a server) to reload the caption vectors: once after a run of `set_captions`,
        not per batch (each reload reads every caption vector)."""
        with self._write() as connection:
            return updates.bump_captions_generation(connection)

    def ensure_embedder(self, embedder: EmbedderInfo) -> None:
        """Record ``embedder`` if none is recorded; raise ModelMismatchError if another one is."""
        with self._read() as connection:
            recorded = read_embedder(connection)
            since = read_info(connection).get(INFO_EMBEDDER_SINCE)
        if recorded is None:
            with self._write() as connection:
                recorded = read_embedder(connection)
                if recorded is None:
                    updates.write_embedder(connection, embedder, since=int(read_info(connection)[INFO_VECTORS_GENERATION]))
                    return
        if recorded == embedder and since is None:
            with self._write() as connection:
                updates.mark_embedder_since(connection)
        if recorded != embedder:
            if replace(recorded, model=embedder.model) == embedder and recorded.model.model_id == embedder.model.model_id:
                raise ModelMismatchError(  # the same model by name, its files changed (weights, preprocessor, tokenizer)
                    "library {location} was built with embedder {model} whose files have changed since (revision {then}, now {now}); "
                    "restore the original model files, or re-embed every image ({reembed})", location=self.location,
                    model=recorded.model.model_id, then=recorded.model.revision, now=embedder.model.revision, reembed=REEMBED)
            raise ModelMismatchError(
                "library {location} was built with embedder {recorded} but {requested} was requested; use the library's model, or "
                "re-embed every image ({reembed})", location=self.location, recorded=recorded.describe(),
                requested=embedder.describe(), reembed=REEMBED_WITH)

    def adopt_embedder_revision(self, recorded: EmbedderInfo, revision: str) -> None:
        """Record ``revision`` for the embedder if ``recorded`` is still what the library holds (the same weights
        under a new fingerprint); otherwise change nothing."""
        with self._write() as connection:
            if read_embedder(connection) == recorded:
                updates.write_embedder(connection, replace(recorded, model=replace(recorded.model, revision=revision)))

    def reset_embedder(self, embedder: EmbedderInfo) -> int:
        """Drop all vectors, record ``embedder``, and mark indexed images pending; return how many.

        This is what ``--reembed`` runs before recomputing vectors with a new model.
        """
        with self._write() as connection:
            return updates.reset_embedder(connection, embedder)

    def set_captioner(self, captioner: ModelRef | None) -> None:
        """Record the captioner used for new captions (None: the library writes none)."""
        with self._write() as connection:
            updates.write_captioner(connection, captioner)

    def vector_index(self) -> str | None:
        """The vector index kind the library asked for (``exact``, ``compact``, ``auto``), or None."""
        with self._read() as connection:
            return read_info(connection).get(INFO_VECTOR_INDEX)

    def set_vector_index(self, kind: str) -> None:
        """Record the vector index kind (checked by the caller, see ``index_choice``); bumps the vectors
        generation, so the index file is rebuilt in that kind and long-lived readers (a server) reload it."""
        with self._write() as connection:
            updates.set_info(connection, {INFO_VECTOR_INDEX: kind})
            updates.bump_generation(connection, None)

    # -- change detection ------------------------------------------------------------------

    def known_files(self) -> dict[str, KnownFile]:
        """Every path in the library (any status) with what change detection compares."""
        statement = select(
            images.c.id,
            images.c.path,
            images.c.size,
            images.c.mtime_ns,
            images.c.content_hash,
            images.c.status,
        )
        with self._read() as connection:  # unpacked, not row.path: 1.8x faster at 200k rows
            return {
                path: KnownFile(id_, size, mtime_ns, content_hash, status)
                for id_, path, size, mtime_ns, content_hash, status in connection.execute(statement)
            }

    def pending_count(self) -> int:
        """How many images wait to be embedded with the library's model (after a re-embed began): one index lookup."""
        with self._read() as connection:
            return int(connection.scalar(select(func.count()).where(images.c.status == STATUS_PENDING)) or 0)

    def photos_under(self, folder: str) -> int:
        """How many images (indexed or waiting to be re-embedded) are recorded under the absolute path `folder`."""
        inside = folder.rstrip(os.sep) + os.sep
        recorded = images.c.status.in_((STATUS_INDEXED, STATUS_PENDING))
        with self._read() as connection:  # an exact prefix test (LIKE ignores case in SQLite), paths stored as bytes decoded here
            plain = connection.scalar(select(func.count()).where(recorded, func.substr(images.c.path, 1, len(inside)) == inside))
            escaped = connection.execute(
                select(images.c.path).where(recorded, func.substr(images.c.path, 1, len(ESCAPED_PREFIX)) == ESCAPED_PREFIX)).scalars()
            return int(plain or 0) + sum(1 for text in escaped if decode_path(text).startswith(inside))

    def live_paths(self) -> list[tuple[int, str]]:
        """(id, path) of every image not marked deleted: what `status` and `prune --missing` look for on disk."""
        with self._read() as connection:
            live = select(images.c.id, images.c.path).where(images.c.status != STATUS_DELETED)
            return [(id_, path) for id_, path in connection.execute(live)]

    def get_by_paths(self, paths: Iterable[str]) -> dict[str, ImageRecord]:
        """Records for those of ``paths`` that are in the library (any status)."""
        result: dict[str, ImageRecord] = {}
        with self._read() as connection:
            for part in chunks(list(dict.fromkeys(paths))):
                for row in connection.execute(select(images).where(images.c.path.in_(part))):
                    result[row.path] = to_image_record(row)
        return result

    def images_by_hash(
        self, hashes: Iterable[str], statuses: Sequence[str] = (STATUS_INDEXED, STATUS_PENDING)
    ) -> dict[str, list[ImageRecord]]:
        """Images with each content hash and one of ``statuses`` (default: live), by ascending id."""
        result: dict[str, list[ImageRecord]] = {}
        with self._read() as connection:
            for part in chunks(list(dict.fromkeys(hashes))):
                statement = (
                    select(images)
                    .where(images.c.content_hash.in_(part), images.c.status.in_(list(statuses)))
                    .order_by(images.c.id)
                )
                for row in connection.execute(statement):
                    result.setdefault(row.content_hash, []).append(to_image_record(row))
        return result

    def embedded_hashes(self) -> set[str]:
        """Content hashes that have an embedding row (for the current embedder), whatever their images'
        status: a deleted photo's vectors stay until its content is gone for good."""
        with self._read() as connection:
            return set(connection.scalars(select(embeddings.c.content_hash)))

    def get_embeddings(self, hashes: Iterable[str]) -> dict[str, EmbeddingRecord]:
        """Stored embedding rows for those of ``hashes`` that have one."""
        result: dict[str, EmbeddingRecord] = {}
        with self._read() as connection:
            embedder = read_embedder(connection)
            for part in chunks(list(dict.fromkeys(hashes))):
                rows = connection.execute(EMBEDDING_ROWS.where(embeddings.c.content_hash.in_(part)))
                for row in rows:
                    result[row.content_hash] = to_embedding_record(row, embedder)
        return result

    # -- writes (one transaction per call) -------------------------------------------------

    def upsert_indexed(self, items: Sequence[IndexedImage]) -> list[int]:
        """Insert or update indexed images and their embeddings in one transaction; return ids.

        An existing path keeps its id. Bumps ``vectors_generation`` once.
        """
        if not items:
            return []
        with self._write() as connection:
            return updates.upsert_indexed(connection, items, self.location)

    def rename(self, moves: Sequence[tuple[int, str]]) -> None:
        """Give images new paths, keeping id, caption and vectors: ``[(image_id, new_path)]``.

        A different row already at a new path (a file that was replaced) is removed.
        """
        if moves:
            with self._write() as connection:
                updates.rename(connection, moves)

    def mark_failed(self, failures: Sequence[FailedFile]) -> list[int]:
        """Record files that failed (insert or update by path); return their ids."""
        if not failures:
            return []
        with self._write() as connection:
            return updates.mark_failed(connection, failures)

    def mark_deleted(self, image_ids: Iterable[int]) -> int:
        """Mark images deleted (they leave search, keep their id); return how many changed. Failure records
        of files never indexed are removed (they were no photo: not counted as deleted); one whose re-index failed
        is a deleted photo like the others."""
        ids = [int(image_id) for image_id in image_ids]
        if not ids:
            return 0
        with self._write() as connection:
            return updates.mark_deleted(connection, ids)

    def forget_deleted(self, deleted_before: datetime | None = None) -> tuple[int, int]:
        """Remove images marked deleted (before ``deleted_before``, an aware datetime, when given)
        and the vectors no remaining image shares; return ``(images, embeddings)`` removed.

        A photo restored afterwards is embedded again. Disk space returns with ``vacuum``.
        """
        if deleted_before is not None and deleted_before.utcoffset() is None:
            raise InvalidInputError(f"deleted_before {deleted_before} has no time zone; pass an aware datetime")
        with self._write() as connection:
            forgotten = updates.forget_deleted(connection, deleted_before=deleted_before)
            return forgotten, updates.purge_unreferenced_embeddings(connection)

    def vacuum(self) -> bool:
        """Give the space of removed rows back to the disk; return whether the database was compacted.

        SQLite: VACUUM only once enough of the file is free (``engine.worth_compacting``); until then
        later inserts reuse the free pages. PostgreSQL: VACUUM.
        """
        self._check_open()
        with translate_errors(self.location):
            return vacuum(self._engine)

    def set_captions(self, captions: Sequence[CaptionUpdate]) -> None:
        """Store captions (and caption vectors); each also applies to same-content images."""
        if captions:
            with self._write() as connection:
                updates.set_captions(connection, captions, self.location)

    # -- status and search -----------------------------------------------------------------

    def counts(self) -> StatusCounts:
        """How many images are present, indexed, pending, captioned, failed and deleted."""
        with self._read() as connection:
            by_status = dict(
                connection.execute(select(images.c.status, func.count()).group_by(images.c.status)).all()
            )
            captioned = connection.scalar(
                select(func.count()).where(images.c.status == STATUS_INDEXED, images.c.caption.is_not(None))
            )
            n_embeddings = connection.scalar(select(func.count()).select_from(embeddings))
        total = sum(by_status.values())
        deleted = by_status.get(STATUS_DELETED, 0)
        return StatusCounts(
            present=total - deleted,
            indexed=by_status.get(STATUS_INDEXED, 0),
            pending=by_status.get(STATUS_PENDING, 0),
            captioned=int(captioned or 0),
            failed=by_status.get(STATUS_FAILED, 0),
            deleted=deleted,
            embeddings=int(n_embeddings or 0),
        )

    def failures(self, limit: int | None = None) -> list[Failure]:
        """Failed images, ordered by path."""
        statement = (
            select(images.c.id, images.c.path, images.c.error, images.c.updated_at)
            .where(images.c.status == STATUS_FAILED)
            .order_by(images.c.path)
            .limit(limit)
        )
        with self._read() as connection:
            return [
                Failure(row.id, row.path, row.error or "", row.updated_at)
                for row in connection.execute(statement)
            ]

    def get_records(self, image_ids: Iterable[int]) -> list[ImageRecord]:
        """Records for ``image_ids`` in the given order (any status); unknown ids are skipped."""
        ids = [int(image_id) for image_id in image_ids]
        found: dict[int, ImageRecord] = {}
        with self._read() as connection:
            for part in chunks(list(dict.fromkeys(ids))):
                for row in connection.execute(select(images).where(images.c.id.in_(part))):
                    found[row.id] = to_image_record(row)
        return [found[image_id] for image_id in ids if image_id in found]

    def files_as_indexed(self, image_ids: Iterable[int]) -> dict[int, tuple[int | None, int | None, str | None]]:
        """``{id: (size, mtime_ns, content_hash)}`` of each image's file as indexed: what a reranker rereading files
        checks them against (`search.rerank.RecomputeVit`)."""
        return {r.id: (r.size, r.mtime_ns, r.content_hash) for r in self.get_records(image_ids)}

    def filter_ids(self, *, path_glob: str | None = None, after: datetime | None = None, before: datetime | None = None,
                   undated: bool = False) -> np.ndarray:
        """Ids of indexed images matching all given filters, ascending: ``[n] int64``.

        ``path_glob``: shell pattern on the absolute path, case-sensitive, ``*`` also crosses ``/``
        (``*.png``, ``*/2023/*``). ``after``/``before``: capture time (EXIF) bounds, inclusive;
        images without a capture time never match a date filter. ``undated``: only images without one.
        """
        columns = [images.c.id] if path_glob is None else [images.c.id, type_coerce(images.c.path, Text)]  # stored text
        statement = select(*columns).where(images.c.status == STATUS_INDEXED)
        if undated:
            statement = statement.where(images.c.taken_at.is_(None))
        if after is not None:
            statement = statement.where(images.c.taken_at >= after)
        if before is not None:
            statement = statement.where(images.c.taken_at <= before)
        with self._read() as connection:
            rows = connection.execute(statement.order_by(images.c.id)).all()
        if path_glob is None:
            return np.array([row[0] for row in rows], dtype=np.int64)
        match = re.compile(fnmatch.translate(path_glob)).match  # as fnmatchcase, compiled once
        return np.array(
            [image_id for image_id, text in rows if match(decode_path(text) if text.startswith(ESCAPED_PREFIX) else text)],
            dtype=np.int64,
        )

    def uncaptioned(self, limit: int | None = None, *, after: int = 0) -> list[ImageRecord]:
        """Indexed images without a caption and with an id above ``after``, by ascending id."""
        statement = (
            select(images)
            .where(images.c.status == STATUS_INDEXED, images.c.caption.is_(None), images.c.id > after)
            .order_by(images.c.id)
            .limit(limit)
        )
        with self._read() as connection:
            return [to_image_record(row) for row in connection.execute(statement)]

    def captions_without_vectors(self, limit: int | None = None, *, after: int = 0) -> list[ImageRecord]:
        """Indexed images with a caption but no caption vector for their content (their vectors were reset by a
        re-embed that wrote no captions), id above ``after``, by ascending id."""
        has_vector = exists().where(caption_vectors.c.content_hash == images.c.content_hash)
        statement = (
            select(images)
            .where(images.c.status == STATUS_INDEXED, images.c.caption.is_not(None), images.c.id > after, ~has_vector)
            .order_by(images.c.id)
            .limit(limit)
        )
        with self._read() as connection:
            return [to_image_record(row) for row in connection.execute(statement)]

    def search_captions(self, query: str, limit: int, *, require_all: bool = True) -> list[tuple[int, float]]:
        """Indexed images whose caption matches ``query``: ``[(image_id, rank)]``, best first.

        SQLite: FTS5 BM25 rank, lower is better. Any user text is safe (see ``captions.py``).
        """
        with self._read() as connection:
            return search_captions(connection, query, limit, require_all=require_all)

    def vectors_for(self, image_ids: Iterable[int], *, missing: str = "raise") -> np.ndarray:
        """Stored vectors of images by id, any status: ``[n, Q, D] float32`` in the given order.

        This is the compact vector index's exact rescoring read. Images with no stored vectors:
        ``missing="raise"`` raises LibraryError naming them; ``missing="nan"`` gives them NaN rows
        (a search that started before ``prune`` removed them scores them out).
        """
        if missing not in ("raise", "nan"):
            raise ValueError(f"missing={missing!r}: expected 'raise' or 'nan'")
        ids = [int(image_id) for image_id in image_ids]
        found: dict[int, bytes] = {}
        with self._read() as connection:
            embedder = read_embedder(connection)
            shape = (embedder.num_query_tokens, embedder.dim) if embedder else (0, 0)
            statement = select(images.c.id, embeddings.c.image_vectors).join(
                embeddings, images.c.content_hash == embeddings.c.content_hash
            )
            for part in chunks(list(dict.fromkeys(ids))):
                found.update(connection.execute(statement.where(images.c.id.in_(part))).all())
        absent = [image_id for image_id in ids if image_id not in found]
        if absent and missing == "raise":
            raise LibraryError(
                f"images {absent[:5]} have no stored vectors in library {self.location}; "
                "delete vectors.faiss.json in the library folder so the index is rebuilt"
            )
        present = [image_id for image_id in ids if image_id in found]
        vectors = blobs_to_vectors([found[image_id] for image_id in present], shape, f"vectors of images {ids[:5]}")
        if not absent:
            return vectors
        out = np.full((len(ids), *shape), np.nan, dtype=np.float32)
        out[[i for i, image_id in enumerate(ids) if image_id in found]] = vectors
        return out

    @contextmanager
    def live_vectors(self, chunk_size: int = 1024) -> Iterator[LiveVectors]:
        """A snapshot of all indexed images' vectors, read in chunks (for a FAISS rebuild)."""
        with self._read() as connection:
            yield LiveVectors(connection, read_embedder(connection), chunk_size)

    @contextmanager
    def vector_changes(self, since: int, chunk_size: int = 1024) -> Iterator[ChangedVectors]:
        """A snapshot of what the live vectors became since generation ``since`` (to bring a vector index saved
        then up to date), read in chunks."""
        with self._read() as connection:
            yield ChangedVectors(connection, read_embedder(connection), since, min(chunk_size, CHUNK))

    def forget_vector_changes(self, through: int) -> None:
        """Drop the change journal up to generation ``through``: call it once a vector index saved at that
        generation is on disk (the journal then brings that file up to date), as an index run does after each
        save. It writes only when there is something to drop."""
        with self._read() as connection:
            since = read_info(connection).get(INFO_CHANGES_SINCE)
        if since is not None and int(since) > through:
            return
        with self._write() as connection:
            updates.forget_vector_changes(connection, through)

    def iter_caption_vectors(
        self, chunk_size: int = 4096, *, keep: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids [n] int64, vectors [n, D] float32)`` for indexed images with caption vectors; ``keep``:
        only those whose caption text it passes."""
        with self._read() as connection:
            yield from iter_caption_vectors(connection, read_embedder(connection), chunk_size, keep)
