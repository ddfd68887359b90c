"""Typed records crossing the metadata store's boundary (frozen dataclasses, never ORM rows).

Arrays carried by records:
- image vectors: ``[Q, D] float32`` (Q = num_query_tokens, D = dim; BLIP-2 ITM: 32 x 256),
  one L2-normalised vector per Q-Former query;
- caption vector: ``[D] float32``, the L2-normalised [CLS] text embedding of the caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

STATUS_INDEXED = "indexed"
"""The image has vectors and appears in search."""
STATUS_PENDING = "pending"
"""The file is known but its vectors must be (re)computed, e.g. after ``reset_embedder``."""
STATUS_FAILED = "failed"
"""The file could not be decoded or embedded; ``error`` says why."""
STATUS_DELETED = "deleted"
"""The file is gone; the row keeps its id (and its vectors until purged) but leaves search."""

STATUSES = (STATUS_INDEXED, STATUS_PENDING, STATUS_FAILED, STATUS_DELETED)


@dataclass(frozen=True)
class ModelRef:
    """A model as recorded in a library: hub id or local directory, and revision (None if unknown)."""

    model_id: str
    revision: str | None = None

    def describe(self) -> str:
        """Human-readable ``id@revision`` form used in messages."""
        return self.model_id if self.revision is None else f"{self.model_id}@{self.revision}"


@dataclass(frozen=True)
class EmbedderInfo:
    """The embedder that produced a library's vectors, and the vector shape it produces."""

    model: ModelRef
    num_query_tokens: int
    dim: int

    def describe(self) -> str:
        """Human-readable form used in messages, e.g. ``Salesforce/blip2-itm-vit-g@main (32x256)``."""
        return f"{self.model.describe()} ({self.num_query_tokens}x{self.dim})"


@dataclass(frozen=True)
class LibraryInfo:
    """The ``library_info`` table as a record."""

    schema_version: int
    created_at: datetime
    embedder: EmbedderInfo | None
    captioner: ModelRef | None
    vectors_generation: int


@dataclass(frozen=True)
class ImageRecord:
    """One row of ``images``. ``path`` is absolute; times are UTC except ``taken_at`` (camera local)."""

    id: int
    path: str
    size: int | None
    mtime_ns: int | None
    content_hash: str | None
    width: int | None
    height: int | None
    taken_at: datetime | None
    camera_make: str | None
    camera_model: str | None
    status: str
    error: str | None
    caption: str | None
    caption_model: str | None
    indexed_at: datetime | None
    updated_at: datetime | None


@dataclass(frozen=True)
class KnownFile:
    """What change detection needs to know about a file already in the library."""

    id: int
    size: int | None
    mtime_ns: int | None
    content_hash: str | None
    status: str


@dataclass(frozen=True, eq=False)
class IndexedImage:
    """An image to upsert as indexed.

    ``vectors``: ``[Q, D] float32`` L2-normalised per query, or None to reuse the embedding row
    already stored for ``content_hash`` (after a move, rename or for a duplicate file).
    ``caption_vector``: ``[D] float32`` or None. A caption left None keeps the row's caption when
    the content is unchanged, and is inherited from a same-content image otherwise.
    """

    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int | None = None
    height: int | None = None
    taken_at: datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    vectors: np.ndarray | None = None
    caption: str | None = None
    caption_model: str | None = None
    caption_vector: np.ndarray | None = None


@dataclass(frozen=True)
class FailedFile:
    """A file that could not be indexed; ``error`` is reduced to one line when stored."""

    path: str
    error: str
    size: int | None = None
    mtime_ns: int | None = None
    content_hash: str | None = None


@dataclass(frozen=True)
class Failure:
    """A failed image as listed for the user."""

    image_id: int
    path: str
    error: str
    updated_at: datetime | None


@dataclass(frozen=True, eq=False)
class EmbeddingRecord:
    """One ``embeddings`` row: ``image_vectors`` ``[Q, D] float32``, ``caption_vector`` ``[D]`` or None."""

    content_hash: str
    image_vectors: np.ndarray
    caption_vector: np.ndarray | None


@dataclass(frozen=True, eq=False)
class CaptionUpdate:
    """A caption for an image; it also applies to every image with the same content hash.

    ``caption_vector``: ``[D] float32`` L2-normalised text embedding of the caption, or None.
    """

    image_id: int
    caption: str
    caption_model: str
    caption_vector: np.ndarray | None = None


@dataclass(frozen=True)
class StatusCounts:
    """Counts for ``status``: ``present`` is every image not deleted."""

    present: int
    indexed: int
    pending: int
    captioned: int
    failed: int
    deleted: int
    embeddings: int


@dataclass(frozen=True, eq=False)
class VectorChunk:
    """A chunk of live image vectors: ``ids`` ``[n] int64`` ascending, ``vectors`` ``[n, Q, D] float32``."""

    ids: np.ndarray
    vectors: np.ndarray
