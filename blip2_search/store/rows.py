"""Reading rows into records and arrays, shared by the metadata store's reads and writes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Connection, Select, func, select

from blip2_search.errors import LibraryError
from blip2_search.store.codec import blobs_to_vectors, bytes_to_vectors
from blip2_search.store.engine import StoredValueError
from blip2_search.store.records import (
    STATUS_INDEXED,
    EmbedderInfo,
    EmbeddingRecord,
    ImageRecord,
    LibraryInfo,
    ModelRef,
    VectorChunk,
)
from blip2_search.store.schema import (
    INFO_CAPTIONER_MODEL,
    INFO_CAPTIONER_REVISION,
    INFO_CREATED_AT,
    INFO_DIM,
    INFO_EMBEDDER_MODEL,
    INFO_EMBEDDER_REVISION,
    INFO_NUM_QUERY_TOKENS,
    INFO_CHANGES_SINCE,
    INFO_CAPTIONS_GENERATION,
    INFO_EMBEDDER_SINCE,
    INFO_SCHEMA_VERSION,
    INFO_VECTORS_GENERATION,
    caption_vectors,
    embeddings,
    images,
    library_info,
    vector_changes,
)

CHUNK = 500
"""Values per ``IN (...)`` list: far below SQLite's and PostgreSQL's bound-parameter limits."""

T = TypeVar("T")


def chunks(values: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``values`` of at most ``size`` items."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def read_info(connection: Connection) -> dict[str, str]:
    """All ``library_info`` keys and values; StoredValueError when they are not what this program writes."""
    info = dict(connection.execute(select(library_info.c.key, library_info.c.value)).all())
    check_info(info)
    return info


_REQUIRED = (INFO_SCHEMA_VERSION, INFO_CREATED_AT, INFO_VECTORS_GENERATION)  # written by the first migration
_WHOLE_NUMBERS = (INFO_SCHEMA_VERSION, INFO_VECTORS_GENERATION, INFO_NUM_QUERY_TOKENS, INFO_DIM, INFO_CAPTIONS_GENERATION,
                  INFO_EMBEDDER_SINCE, INFO_CHANGES_SINCE)


def check_info(info: dict[str, str]) -> None:
    """StoredValueError when ``library_info`` lacks a key every library has (or one of the embedder's, which are
    written together), or holds a number that is none: a damaged file, whose values a read would take for others."""
    embedder = (INFO_NUM_QUERY_TOKENS, INFO_DIM) if INFO_EMBEDDER_MODEL in info else ()
    missing = [key for key in (*_REQUIRED, *embedder) if key not in info]
    if missing:
        raise StoredValueError(f"library_info has no {missing[0]}")
    wrong = [key for key in _WHOLE_NUMBERS if key in info and not (info[key].isascii() and info[key].removeprefix("-").isdigit())]
    try:
        datetime.fromisoformat(info[INFO_CREATED_AT])
    except ValueError:
        wrong.append(INFO_CREATED_AT)
    if wrong:
        raise StoredValueError(f"library_info {wrong[0]} is not a {'date' if wrong[0] == INFO_CREATED_AT else 'number'}")


def read_embedder(connection: Connection) -> EmbedderInfo | None:
    """The recorded embedder, or None when none is recorded yet."""
    return embedder_from_info(read_info(connection))


def embedder_from_info(info: dict[str, str]) -> EmbedderInfo | None:
    """Build the embedder record from ``library_info`` values."""
    if INFO_EMBEDDER_MODEL not in info:
        return None
    return EmbedderInfo(
        model=ModelRef(info[INFO_EMBEDDER_MODEL], info.get(INFO_EMBEDDER_REVISION) or None),
        num_query_tokens=int(info[INFO_NUM_QUERY_TOKENS]),
        dim=int(info[INFO_DIM]),
    )


def library_info_record(connection: Connection) -> LibraryInfo:
    """The ``library_info`` table as a ``LibraryInfo`` record."""
    info = read_info(connection)
    captioner = None
    if INFO_CAPTIONER_MODEL in info:
        captioner = ModelRef(info[INFO_CAPTIONER_MODEL], info.get(INFO_CAPTIONER_REVISION) or None)
    return LibraryInfo(
        schema_version=int(info[INFO_SCHEMA_VERSION]),
        created_at=datetime.fromisoformat(info[INFO_CREATED_AT]),
        embedder=embedder_from_info(info),
        captioner=captioner,
        vectors_generation=int(info[INFO_VECTORS_GENERATION]),
    )


def require_embedder(connection: Connection, location: str) -> EmbedderInfo:
    """The recorded embedder; LibraryError when vectors are written before one is recorded."""
    embedder = read_embedder(connection)
    if embedder is None:
        raise LibraryError(
            f"library {location} has no embedder recorded; open it with the embedder "
            "(open_metadata(..., embedder=...)) before storing vectors"
        )
    return embedder


def to_image_record(row: Any) -> ImageRecord:
    """An ``images`` row as an ``ImageRecord``."""
    return ImageRecord(
        id=row.id,
        path=row.path,
        size=row.size,
        mtime_ns=row.mtime_ns,
        content_hash=row.content_hash,
        width=row.width,
        height=row.height,
        taken_at=row.taken_at,
        camera_make=row.camera_make,
        camera_model=row.camera_model,
        status=row.status,
        error=row.error,
        caption=row.caption,
        caption_model=row.caption_model,
        indexed_at=row.indexed_at,
        updated_at=row.updated_at,
    )


EMBEDDING_ROWS = select(
    embeddings.c.content_hash, embeddings.c.image_vectors, caption_vectors.c.vector.label("caption_vector")
).outerjoin(caption_vectors, embeddings.c.content_hash == caption_vectors.c.content_hash)
"""Embedding rows with their caption vector (or None), for ``to_embedding_record``."""


def to_embedding_record(row: Any, embedder: EmbedderInfo | None) -> EmbeddingRecord:
    """An ``EMBEDDING_ROWS`` row as an ``EmbeddingRecord``, shapes checked against ``embedder``."""
    q, d = (embedder.num_query_tokens, embedder.dim) if embedder else (0, 0)
    what = f"embedding {row.content_hash}"
    caption = row.caption_vector
    return EmbeddingRecord(
        content_hash=row.content_hash,
        image_vectors=bytes_to_vectors(row.image_vectors, (q, d), f"image vectors of {what}"),
        caption_vector=None
        if caption is None
        else bytes_to_vectors(caption, (d,), f"caption vector of {what}"),
    )


def iter_caption_vectors(
    connection: Connection, embedder: EmbedderInfo | None, chunk_size: int, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(ids [n] int64, vectors [n, D] float32)`` for indexed images with caption vectors; ``keep``: only
    those whose caption text it passes (the text is read too then)."""
    dim = embedder.dim if embedder else 0
    last_id = -1
    columns = [images.c.id, caption_vectors.c.vector] + ([images.c.caption] if keep is not None else [])
    while True:
        rows = connection.execute(
            select(*columns)
            .join(caption_vectors, images.c.content_hash == caption_vectors.c.content_hash)
            .where(images.c.status == STATUS_INDEXED, images.c.id > last_id)
            .order_by(images.c.id)
            .limit(chunk_size)
        ).all()
        if not rows:
            return
        last_id = int(rows[-1].id)
        if keep is not None:
            rows = [row for row in rows if keep(row.caption or "")]
            if not rows:
                continue
        ids = np.array([row.id for row in rows], dtype=np.int64)
        blobs = [row.vector for row in rows]
        yield ids, blobs_to_vectors(blobs, (dim,), lambda i: f"caption vector of image {rows[i].id}")


class LiveVectors:
    """A consistent snapshot of the live (indexed) image vectors, valid inside ``live_vectors``.

    ``generation`` is the ``vectors_generation`` of the snapshot, ``count`` the number of images.
    """

    def __init__(self, connection: Connection, embedder: EmbedderInfo | None, chunk_size: int) -> None:
        self._connection = connection
        self._chunk_size = chunk_size
        self._info = read_info(connection)
        self.generation = int(self._info[INFO_VECTORS_GENERATION])
        self.num_query_tokens = embedder.num_query_tokens if embedder else 0
        self.dim = embedder.dim if embedder else 0
        self.count = int(
            connection.scalar(
                select(func.count())
                .select_from(images.join(embeddings, images.c.content_hash == embeddings.c.content_hash))
                .where(images.c.status == STATUS_INDEXED)
            )
        )

    def chunks(self) -> Iterator[VectorChunk]:
        """Yield chunks in ascending image id: ``ids [n] int64``, ``vectors [n, Q, D] float32``."""
        last_id = -1
        while True:
            rows = self._connection.execute(
                self._rows()
                .where(images.c.status == STATUS_INDEXED, images.c.id > last_id)
                .order_by(images.c.id)
                .limit(self._chunk_size)
            ).all()
            if not rows:
                return
            chunk = self._chunk_of(rows)
            yield chunk
            last_id = int(chunk.ids[-1])

    def _rows(self) -> Select:
        """Image ids with their vectors (to filter and order)."""
        return select(images.c.id, embeddings.c.image_vectors).join(embeddings, images.c.content_hash == embeddings.c.content_hash)

    def _chunk_of(self, rows: Sequence[Any]) -> VectorChunk:
        """Rows of ``_rows`` as one chunk of decoded vectors."""
        ids = np.array([row.id for row in rows], dtype=np.int64)
        shape = (self.num_query_tokens, self.dim)
        vectors = blobs_to_vectors([row.image_vectors for row in rows], shape, lambda i: f"vectors of image {rows[i].id}")
        return VectorChunk(ids=ids, vectors=vectors)


class ChangedVectors(LiveVectors):
    """A consistent snapshot of what the live vectors became since generation ``since``, valid inside
    ``MetadataStore.vector_changes``: a vector index saved at ``since`` is brought to ``generation`` by removing
    ``changed`` and adding the vectors ``chunks`` yields (the live images among them, as they are now).

    ``covered`` is False when the journal cannot say (its rows from ``since + 1`` on were dropped, or a change of
    any image: a re-embed, another index kind): the index is rebuilt instead. ``count`` is the number of live
    images of the snapshot (the store holds as many once brought up to date).
    """

    def __init__(self, connection: Connection, embedder: EmbedderInfo | None, since: int, chunk_size: int) -> None:
        super().__init__(connection, embedder, chunk_size)
        info = self._info  # the same snapshot's
        if INFO_CHANGES_SINCE not in info:  # a library of schema v2 opened read-only: it has no journal to read
            self.covered, self.changed = False, np.zeros(0, dtype=np.int64)
            return
        journal_from = int(info[INFO_CHANGES_SINCE])
        rows = connection.execute(select(vector_changes.c.generation, vector_changes.c.image_id).where(vector_changes.c.generation > since)).all()
        ids = [row.image_id for row in rows]
        # every generation since journals at least one row: one that did not was written by a process that keeps no
        # journal (an older blip2-search still running when this one migrated the library)
        every_generation = len({row.generation for row in rows}) == self.generation - since
        self.covered = journal_from <= since + 1 and since <= self.generation and every_generation and None not in ids
        self.changed = np.unique(np.array([i for i in ids if i is not None], dtype=np.int64))

    def chunks(self) -> Iterator[VectorChunk]:
        """Yield the live images among ``changed``, ascending: ``ids [n] int64``, ``vectors [n, Q, D] float32``."""
        for start in range(0, len(self.changed), self._chunk_size):
            part = self.changed[start : start + self._chunk_size].tolist()
            rows = self._connection.execute(self._rows().where(images.c.status == STATUS_INDEXED, images.c.id.in_(part)).order_by(images.c.id)).all()
            if rows:
                yield self._chunk_of(rows)
