"""Database engine for a library: URL resolution, SQLite settings, transactions, error translation.

SQLite files get WAL journaling (readers never wait for the writer), ``synchronous=NORMAL``
(durable at each checkpoint, safe against corruption), foreign keys on, ``secure_delete=FAST``
(deleting rows writes no freed page), and a busy timeout.
SQLAlchemy emits BEGIN itself (the sqlite3 driver would skip it before SELECT), so a read
transaction is a consistent snapshot, and write transactions start with BEGIN IMMEDIATE so that
a busy library waits for the lock instead of failing half-way.

PostgreSQL (a ``postgresql+psycopg://`` URL) keeps the same two promises its own way: reads run
at REPEATABLE READ (one snapshot per transaction, as WAL gives SQLite), and every write
transaction first takes a transaction-scoped advisory lock, so writers run one at a time exactly
as under SQLite's BEGIN IMMEDIATE, each seeing the previous writer's commit (READ COMMITTED), and
give up after the same busy timeout with a "locked" error.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError

from blip2_search.errors import Blip2SearchError, DamagedDatabaseError, LibraryError

METADATA_FILENAME = "metadata.sqlite"
"""Name of the SQLite file inside a library folder."""
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
"""A path with one of these suffixes names the SQLite file itself; any other path, a library folder."""

_BEGIN_OPTION = "blip2_search_begin"
_CHECKPOINT_TRIES = 10
_BUSY_TIMEOUT_OPTION = "blip2_search_busy_timeout_s"
_WRITER_LOCK_KEY = 0x6232_7365_6172_6368  # 'b2search': one writer lock per database
_POSTGRES_LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', :timeout, true)")
_POSTGRES_WRITER_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_BEGIN_STATEMENTS = {"deferred": "BEGIN", "immediate": "BEGIN IMMEDIATE"}
_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    # Builds that default to secure_delete=ON zero every freed page through the WAL: forgetting photos then wrote
    # their 32 KB of vectors each again, and `prune` needed as much free disk as it was to free. FAST zeroes only
    # within pages written anyway (a later VACUUM drops the free pages).
    "PRAGMA secure_delete=FAST",
)


def resolve_location(url_or_path: str | os.PathLike[str]) -> tuple[URL, Path | None]:
    """Turn a database URL, a SQLite file path or a library folder into (URL, SQLite file or None).

    A string containing ``://`` is a SQLAlchemy URL; a path ending in one of ``SQLITE_SUFFIXES``
    (and not an existing directory) is the SQLite file; any other path is a library folder and
    means the ``METADATA_FILENAME`` inside it.
    """
    text = os.fspath(url_or_path)
    if "://" in text:
        url = make_url(text)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            database = url.database
            if database.startswith("file:"):
                database = database[len("file:") :].split("?", 1)[0]
            return url, Path(database)
        return url, None
    path = Path(text)
    if path.is_dir() or path.suffix.lower() not in SQLITE_SUFFIXES:
        path = path / METADATA_FILENAME
    return URL.create("sqlite", database=str(path)), path


def describe_url(url: URL) -> str:
    """A URL for messages, without its password."""
    return url.render_as_string(hide_password=True)


def create_library_engine(url: URL, *, busy_timeout_s: float) -> Engine:
    """Create the engine; for SQLite, install pragmas and explicit BEGIN handling."""
    if url.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True)
        engine.update_execution_options(**{_BUSY_TIMEOUT_OPTION: busy_timeout_s})
        return engine
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in _SQLITE_PRAGMAS:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":  # e.g. VACUUM, which no transaction may wrap
            return
        connection.exec_driver_sql(_BEGIN_STATEMENTS[options.get(_BEGIN_OPTION, "deferred")])

    return engine


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside a read transaction (a consistent snapshot on SQLite WAL)."""
    with engine.connect() as raw:
        connection = raw
        if raw.dialect.name == "postgresql":
            connection = raw.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            yield connection


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside a write transaction, committed on success, rolled back on error."""
    with engine.connect() as raw:
        connection = raw.execution_options(**{_BEGIN_OPTION: "immediate"})
        with connection.begin():
            if connection.dialect.name == "postgresql":
                timeout_ms = int(connection.get_execution_options()[_BUSY_TIMEOUT_OPTION] * 1000)
                connection.execute(_POSTGRES_LOCK_TIMEOUT, {"timeout": f"{timeout_ms}ms"})
                connection.execute(_POSTGRES_WRITER_LOCK, {"key": _WRITER_LOCK_KEY})
            yield connection


VACUUM_MIN_FREE_SHARE = 0.10
"""SQLite's VACUUM runs only when at least this share of the file is free pages (see ``worth_compacting``)."""


def worth_compacting(pages: int, free_pages: int, min_free_share: float = VACUUM_MIN_FREE_SHARE) -> bool:
    """Whether a SQLite file of ``pages`` pages, ``free_pages`` of them free, is worth a VACUUM.

    VACUUM rewrites the whole file to return the free pages, whatever their number: at 100k photos
    (3.5 GB) it took 63 s, and needs room for a second copy meanwhile. Free pages are not lost (the
    next inserts reuse them), so the rewrite is only worth it once they are a fair share of the file:
    at 10%, each byte returned costs at most ten rewritten. The share counts the free pages of earlier
    prunes too, so small prunes add up until one of them compacts.
    """
    return pages > 0 and free_pages >= min_free_share * pages


def vacuum(engine: Engine) -> bool:
    """Give free space back to the disk; return whether the database was compacted.

    SQLite: VACUUM (a rewrite of the file, outside any transaction) when ``worth_compacting``; the WAL
    is checkpointed and truncated either way. PostgreSQL: a plain VACUUM every time, which makes the
    dead rows' space reusable in place (no rewrite, no lock on readers or writers).
    """
    with engine.connect() as raw:
        connection = raw.execution_options(isolation_level="AUTOCOMMIT")
        if raw.dialect.name != "sqlite":
            connection.exec_driver_sql("VACUUM")
            return True
        pages = connection.exec_driver_sql("PRAGMA page_count").scalar() or 0
        free_pages = connection.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
        compact = worth_compacting(pages, free_pages)
        if compact:
            connection.exec_driver_sql("VACUUM")
        # The WAL holds the writes just made (all of VACUUM's new file, or the deletions): move them
        # into the file now. A reader in a transaction (a search of a running server) blocks that;
        # searches are short, so try again for a few seconds, then leave it to SQLite's own
        # checkpoints (the data is complete either way).
        for _ in range(_CHECKPOINT_TRIES):
            busy = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()[0]
            if not busy:
                break
            time.sleep(0.5)
        return compact


def library_error(location: str, error: BaseException) -> LibraryError:
    """Map a database error to a one-line LibraryError naming the library, the reason and the fix."""
    detail = str(getattr(error, "orig", None) or error).splitlines()[0] if str(error) else repr(error)
    lowered = detail.lower()
    if "database or disk is full" in lowered or "no space left" in lowered:
        fix = "the disk is full; free disk space and run the command again"
    elif "locked" in lowered or "busy" in lowered or "lock timeout" in lowered:
        fix = "another process is writing to it; wait for it to finish or stop it, then retry"
    elif _DAMAGE.search(lowered) and "://" not in location:
        return damaged_database_error(location, _damage_reason(detail))
    elif "readonly" in lowered or "read-only" in lowered or "permission denied" in lowered:
        fix = "it is read-only; make the library folder and the files in it writable, or choose another library folder"
    elif "unable to open" in lowered:
        fix = "the file cannot be opened; check that the library folder exists and is writable"
    elif "disk i/o error" in lowered and _disk_full(location):  # SQLite could not create its -shm file
        fix = "the disk is full; free disk space and run the command again"
    else:
        fix = "check the library location and run the command again"
    return LibraryError(f"library {location}: {detail}; {fix}")


class StoredValueError(ValueError):
    """A value read from the database that this program never writes (a key missing from ``library_info``, a
    number that is not one): the file is damaged. ``translate_errors`` turns it into a DamagedDatabaseError."""


# SQLite's words for a damaged file: pages (malformed, not a database, corruption), a text value whose bytes are
# not UTF-8 (the driver's decode), the caption index's shadow tables unreadable (vtable constructor)
_DAMAGE = re.compile(r"not a database|malformed|corrupt|could not decode to utf-8|vtable constructor failed")


def _damage_reason(detail: str) -> str:
    """What SQLite said of the damage, without the damaged bytes it may quote (the driver's decode error does)."""
    lowered = detail.lower()
    if "could not decode to utf-8" in lowered:
        column = re.search(r"column '([^']*)'", detail)
        return f"a stored text{f' of column {column.group(1)}' if column else ''} is not valid UTF-8"
    if "vtable constructor failed" in lowered:
        return "its caption search index cannot be read"
    return "SQLite: " + detail


def damaged_database_error(location: str, reason: str) -> DamagedDatabaseError:
    """The one-line error of a damaged SQLite file ``location``: the file, the reason, and the ways back."""
    # not `sqlite3 FILE .recover`: SQLite 3.40's fails on a library's file ("SQL logic error"), damaged or not
    return DamagedDatabaseError(
        f"library database {location} is damaged ({reason}); restore it from a backup, or move it aside and run `index` "
        "on the photo folders again with the same model (every photo is embedded again; the photos themselves are untouched)"
    )


def _raised_by_sqlalchemy(error: BaseException) -> bool:
    """Whether ``error`` was raised inside SQLAlchemy itself: converting a value read from the database (a stored
    date that is no date), as our own code (a bad argument, a bug) raises it from this package's frames."""
    tb = error.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and f"{os.sep}sqlalchemy{os.sep}" in last.tb_frame.f_code.co_filename


def _disk_full(location: str) -> bool:
    """Whether the disk holding `location` (a database file or URL) has no room left; False when unknown."""
    folder = os.path.dirname(location) if "://" not in location else ""
    try:
        return bool(folder) and shutil.disk_usage(folder).free < 64 * 1024
    except OSError:
        return False


@contextmanager
def translate_errors(location: str) -> Iterator[None]:
    """Re-raise database errors as LibraryError (see ``library_error``); a value read from a SQLite file that this
    program never writes (``StoredValueError``, or one SQLAlchemy cannot convert) as DamagedDatabaseError."""
    try:
        yield
    except DBAPIError as error:
        raise library_error(location, error) from error
    except StoredValueError as error:
        raise damaged_database_error(location, str(error)) from error
    except ValueError as error:
        if isinstance(error, Blip2SearchError) or "://" in location or not _raised_by_sqlalchemy(error):
            raise
        raise damaged_database_error(location, "a stored value is not of its column's kind") from error
