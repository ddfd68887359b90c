"""Schema migrations: an ordered list of steps, run on open, recorded as ``schema_version``.

Version 0 means an empty database. Each step brings the schema from ``version - 1`` to
``version``; all pending steps run in ONE write transaction (SQLite and PostgreSQL both have
transactional DDL), so a failed step leaves the library at its old version. Add a step by
appending a ``Migration`` to ``MIGRATIONS``; never edit a released step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    insert,
    inspect,
    select,
    update,
)

from blip2_search.errors import OPEN_FOLDER, LibraryError
from blip2_search.store.engine import StoredValueError, read_transaction, write_transaction
from blip2_search.store.schema import (
    INFO_CHANGES_SINCE,
    INFO_CREATED_AT,
    INFO_SCHEMA_VERSION,
    INFO_VECTORS_GENERATION,
    POSTGRES_CAPTION_DDL,
    SQLITE_FTS_DDL,
    UtcDateTime,
    caption_vectors,
    images,
    library_info,
    metadata,
    vector_changes,
)


@dataclass(frozen=True)
class Migration:
    """One schema step: ``apply`` runs inside the open write transaction."""

    version: int
    description: str
    apply: Callable[[Connection], None]
    reads_without: bool = False
    """Whether a library not yet brought to this step is still read as it is (a read-only opening skips it)."""


_V1 = MetaData()
_V1_EMBEDDINGS = Table(  # as released in schema v1: later steps change it, so v1 keeps its own copy
    "embeddings",
    _V1,
    Column("content_hash", String(128), primary_key=True),
    Column("image_vectors", LargeBinary, nullable=False),
    Column("caption_vector", LargeBinary),
    Column("created_at", UtcDateTime, nullable=False),
)


def _create_v1(connection: Connection) -> None:
    """Create library_info, images, embeddings, and the caption word index of SQLite or PostgreSQL."""
    metadata.create_all(connection, tables=[library_info, images])
    _V1.create_all(connection)
    caption_ddl = {"sqlite": SQLITE_FTS_DDL, "postgresql": POSTGRES_CAPTION_DDL}
    for statement in caption_ddl.get(connection.dialect.name, ()):
        connection.exec_driver_sql(statement)
    connection.execute(
        insert(library_info),
        [
            {"key": INFO_CREATED_AT, "value": datetime.now(timezone.utc).isoformat()},
            {"key": INFO_VECTORS_GENERATION, "value": "0"},
        ],
    )


def _caption_vectors_apart(connection: Connection) -> None:
    """Move caption vectors out of the embeddings rows into their own table (left in place there); on
    PostgreSQL also make the caption word index, which databases made before it was added lack."""
    metadata.create_all(connection, tables=[caption_vectors])
    if connection.dialect.name == "postgresql":
        for statement in POSTGRES_CAPTION_DDL:
            connection.exec_driver_sql(statement)
    connection.execute(
        insert(caption_vectors).from_select(
            ["content_hash", "vector"],
            select(_V1_EMBEDDINGS.c.content_hash, _V1_EMBEDDINGS.c.caption_vector).where(
                _V1_EMBEDDINGS.c.caption_vector.is_not(None)
            ),
        )
    )


def _vector_changes(connection: Connection) -> None:
    """Create the change journal of the live vectors; it holds the changes from the next generation on (a vector
    index saved before is rebuilt when behind, as before)."""
    metadata.create_all(connection, tables=[vector_changes])
    current = connection.scalar(select(library_info.c.value).where(library_info.c.key == INFO_VECTORS_GENERATION))
    connection.execute(insert(library_info).values(key=INFO_CHANGES_SINCE, value=str(int(current or 0) + 1)))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create library_info, images, embeddings and the caption word index", _create_v1),
    Migration(2, "caption vectors in their own table", _caption_vectors_apart),
    Migration(3, "a journal of the images whose vectors each generation changed", _vector_changes, reads_without=True),
)
LATEST_VERSION = MIGRATIONS[-1].version
"""The schema version this code writes."""


def current_version(connection: Connection) -> int:
    """The schema version stored in the database (0 for an empty database)."""
    if not inspect(connection).has_table(library_info.name):
        return 0
    value = connection.scalar(select(library_info.c.value).where(library_info.c.key == INFO_SCHEMA_VERSION))
    if value is None or not (value.isascii() and value.isdigit()):  # the first migration writes both in one transaction: a damaged file
        raise StoredValueError(f"library_info {'has no' if value is None else 'holds no number for'} {INFO_SCHEMA_VERSION}")
    return int(value)


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [step.version for step in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, 3, ... in order; got {versions}")


def _check_openable(version: int, latest: int, location: str, create: bool) -> None:
    if version > latest:
        raise LibraryError(
            f"library {location} has schema version {version} but this blip2-search supports "
            f"up to {latest}; upgrade blip2-search (pip install -U blip2-search)"
        )
    if version == 0 and not create:
        raise LibraryError("library {location} is empty or not a blip2-search library; index photos into it first or name the right "
                           "library folder ({open})", location=location, open=OPEN_FOLDER)


def migrate(
    engine: Engine,
    location: str,
    *,
    create: bool,
    migrations: Sequence[Migration] = MIGRATIONS,
    read_only: bool = False,
) -> int:
    """Bring the database to the newest version in ``migrations``; return that version.

    Raises LibraryError when the stored schema is newer than ``migrations`` knows (naming both
    versions and the fix), when the database is empty and ``create`` is False, or when an older
    schema is opened ``read_only`` (read-only media, where it cannot be upgraded) and lacks a step
    readers need; one lacking only steps they do not (``reads_without``) is returned at its version.
    """
    _check_sequence(migrations)
    latest = migrations[-1].version
    with read_transaction(engine) as connection:
        version = current_version(connection)
    _check_openable(version, latest, location, create)
    if version == latest:
        return version
    if read_only and all(step.reads_without for step in migrations if step.version > version):
        return version  # nothing a reader needs is missing: searched as it is (never written there)
    if read_only:
        raise LibraryError(
            f"library {location} has schema version {version}, older than this blip2-search's {latest}, and is on "
            "read-only media, where it cannot be upgraded; open the library once where it is writable (e.g. "
            "`blip2-search status`), then copy it again"
        )
    with write_transaction(engine) as connection:
        version = current_version(connection)
        _check_openable(version, latest, location, create)
        for step in migrations:
            if step.version > version:
                step.apply(connection)
        _set_version(connection, version, latest)
    return latest


def _set_version(connection: Connection, old: int, new: int) -> None:
    if old == 0:
        connection.execute(insert(library_info).values(key=INFO_SCHEMA_VERSION, value=str(new)))
    else:
        connection.execute(
            update(library_info).where(library_info.c.key == INFO_SCHEMA_VERSION).values(value=str(new))
        )
