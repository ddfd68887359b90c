"""The library's relational schema (SQLAlchemy Core), portable between SQLite and PostgreSQL.

Tables:
- ``library_info``: key/value text (see ``INFO_*`` keys);
- ``images``: one row per file path ever seen; ``id`` is stable across renames and moves;
- ``embeddings``: image vectors keyed by content hash, shared by duplicate files;
- ``caption_vectors``: the caption's text embedding per content hash (schema v2);
- ``vector_changes``: which images' vectors each generation changed (schema v3), so a saved vector index
  behind the database is brought up to date rather than rebuilt.
SQLite also gets ``images_fts`` (FTS5 over ``images.caption``, kept in sync by triggers); see
``SQLITE_FTS_DDL``. PostgreSQL gets a GIN word index over the captions instead
(``POSTGRES_CAPTION_DDL``). Migrations in ``migrations.py`` create all of it.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

from blip2_search.store.codec import decode_path, encode_path

INFO_SCHEMA_VERSION = "schema_version"
INFO_CREATED_AT = "created_at"
INFO_EMBEDDER_MODEL = "embedder_model"
INFO_EMBEDDER_REVISION = "embedder_revision"
INFO_NUM_QUERY_TOKENS = "num_query_tokens"
INFO_DIM = "dim"
INFO_CAPTIONER_MODEL = "captioner_model"
INFO_CAPTIONER_REVISION = "captioner_revision"
INFO_VECTORS_GENERATION = "vectors_generation"
INFO_CAPTIONS_GENERATION = "captions_generation"  # bumped after a run writes captions to indexed images (servers reload)
INFO_EMBEDDER_SINCE = "embedder_since"  # the vectors generation from which every saved index holds the recorded embedder's vectors
INFO_VECTOR_INDEX = "vector_index"  # exact | compact | auto, as asked by `index --vector-index`
INFO_CHANGES_SINCE = "changes_since"  # vector_changes holds every change of this vectors generation and later ones

# SQLite's INTEGER PRIMARY KEY is the rowid; BIGINT would not auto-increment there.
_ID = BigInteger().with_variant(Integer(), "sqlite")


class FsPath(TypeDecorator[str]):
    """A filesystem path stored losslessly as text (see ``codec.encode_path``)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: object) -> str | None:
        """Encode a path for storage."""
        return None if value is None else encode_path(value)

    def process_result_value(self, value: str | None, dialect: object) -> str | None:
        """Decode a stored path."""
        return None if value is None else decode_path(value)


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime, stored naive-UTC so SQLite and PostgreSQL agree."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        """Convert an aware datetime to naive UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UtcDateTime needs an aware datetime")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        """Attach UTC to a stored naive datetime."""
        return None if value is None else value.replace(tzinfo=timezone.utc)


metadata = MetaData()

library_info = Table(
    "library_info",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("path", FsPath, nullable=False, unique=True),
    Column("size", BigInteger),
    Column("mtime_ns", BigInteger),
    Column("content_hash", String(128)),
    Column("width", Integer),
    Column("height", Integer),
    Column("taken_at", DateTime),
    Column("camera_make", Text),
    Column("camera_model", Text),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("caption", Text),
    Column("caption_model", Text),
    Column("indexed_at", UtcDateTime),
    Column("updated_at", UtcDateTime),
    CheckConstraint("status IN ('indexed', 'pending', 'failed', 'deleted')", name="ck_images_status"),
    Index("ix_images_content_hash", "content_hash"),
    Index("ix_images_status", "status"),
    Index("ix_images_taken_at", "taken_at"),
    # AUTOINCREMENT: ids of hard-deleted rows are never reused, so a stale index cannot alias them.
    sqlite_autoincrement=True,
)

embeddings = Table(
    "embeddings",
    metadata,
    Column("content_hash", String(128), primary_key=True),
    Column("image_vectors", LargeBinary, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    # Schema v1 also has ``caption_vector BLOB`` here, no longer used (see ``caption_vectors``):
    # dropping it would rewrite every row of a large library at its first open.
)

# The caption's text embedding per content, apart from the 32 KB image vectors: reading every
# caption vector (fusion's first search) then reads ~1 KB a row instead of walking each row's
# overflow pages past the image vectors (schema v2).
caption_vectors = Table(
    "caption_vectors",
    metadata,
    Column(
        "content_hash", String(128), ForeignKey("embeddings.content_hash", ondelete="CASCADE"), primary_key=True
    ),
    Column("vector", LargeBinary, nullable=False),
)

# The change journal of the live vectors (schema v3): each bump of ``vectors_generation`` records the images whose
# vectors it may have changed (added, replaced or dropped); ``image_id`` NULL: any image (a re-embed, another index
# kind). A vector index saved at generation G is brought to the database's by re-reading the images of the rows
# past G (``MetadataStore.vector_changes``), when the journal still holds them all (``INFO_CHANGES_SINCE``); rows
# up to the generation of the file saved last are dropped after each save.
vector_changes = Table(
    "vector_changes",
    metadata,
    Column("generation", BigInteger, nullable=False),
    Column("image_id", BigInteger),
    Index("ix_vector_changes_generation", "generation"),
)

# External-content FTS5 index over images.caption; rowid = images.id. Constant DDL, no user input.
SQLITE_FTS_DDL = (
    "CREATE VIRTUAL TABLE images_fts USING fts5("
    "caption, content='images', content_rowid='id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER images_fts_ai AFTER INSERT ON images BEGIN "
    "INSERT INTO images_fts(rowid, caption) VALUES (new.id, new.caption); END",
    "CREATE TRIGGER images_fts_ad AFTER DELETE ON images BEGIN "
    "INSERT INTO images_fts(images_fts, rowid, caption) VALUES ('delete', old.id, old.caption); END",
    "CREATE TRIGGER images_fts_au AFTER UPDATE OF caption ON images BEGIN "
    "INSERT INTO images_fts(images_fts, rowid, caption) VALUES ('delete', old.id, old.caption); "
    "INSERT INTO images_fts(rowid, caption) VALUES (new.id, new.caption); END",
)

# PostgreSQL's caption index: a GIN index over the words of each caption ('simple' configuration:
# lower-cased words, no stemming or stop words, as FTS5's unicode61; diacritics are kept).
# captions.py queries this same expression, so the index serves them. Constant DDL.
POSTGRES_CAPTION_DDL = (
    "CREATE INDEX IF NOT EXISTS ix_images_caption_words ON images "
    "USING gin (to_tsvector('simple'::regconfig, coalesce(caption, '')))",
)
