"""Tests of the metadata store: schema, migrations, pipeline writes, caption search, errors, snapshots.

Tests taking ``store`` or ``metadata_location`` run on SQLite and, when BLIP2_SEARCH_TEST_POSTGRES_URL
names a PostgreSQL server (see the README's Tests), on PostgreSQL too.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from blip2_search.errors import InvalidInputError, LibraryError, ModelMismatchError
from blip2_search.store import (
    CaptionUpdate,
    EmbedderInfo,
    FailedFile,
    IndexedImage,
    ModelRef,
    StatusCounts,
    open_metadata,
)
from blip2_search.store import engine as engine_module
from blip2_search.store import metadata as metadata_module
from blip2_search.store.captions import fts5_query
from blip2_search.store.codec import decode_path, encode_path
from blip2_search.store.engine import create_library_engine
from blip2_search.store.migrations import LATEST_VERSION, MIGRATIONS, Migration, current_version, migrate
from blip2_search.store.schema import metadata as schema_metadata

Q, D = 4, 8
EMBEDDER = EmbedderInfo(ModelRef("test/embedder", "rev1"), Q, D)
REPO_ROOT = Path(__file__).resolve().parents[1]


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture()
def store(metadata_location):
    s = open_metadata(metadata_location, create=True, embedder=EMBEDDER)
    yield s
    s.close()


@pytest.fixture()
def sqlite_store(tmp_path):
    s = open_metadata(tmp_path / "lib" / "metadata.sqlite", create=True, embedder=EMBEDDER)
    yield s
    s.close()


def image(path: Path | str, digest: str, vectors=None, **kw) -> IndexedImage:
    return IndexedImage(
        path=str(path),
        size=kw.pop("size", 10),
        mtime_ns=kw.pop("mtime_ns", 1),
        content_hash=digest,
        vectors=vectors,
        **kw,
    )


# -- schema and migrations ---------------------------------------------------------------------


def test_create_makes_schema_pragmas_and_info(tmp_path):
    path = tmp_path / "new" / "metadata.sqlite"
    with open_metadata(path, create=True, embedder=EMBEDDER) as s:
        info = s.info()
        assert info.schema_version == LATEST_VERSION
        assert info.embedder == EMBEDDER and info.vectors_generation == 0 and info.captioner is None
        s.set_captioner(ModelRef("cap/model", None))
        assert s.info().captioner == ModelRef("cap/model", None)
        with s._engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            tables = set(inspect(c).get_table_names())
        assert {"library_info", "images", "embeddings", "images_fts"} <= tables
        index_names = {ix["name"] for ix in inspect(s._engine).get_indexes("images")}
        assert {"ix_images_content_hash", "ix_images_status", "ix_images_taken_at"} <= index_names
    # a library folder (existing, or any path without a SQLite suffix) means its metadata.sqlite
    with open_metadata(path.parent, create=False) as s:
        assert s.path == path
    with open_metadata(tmp_path / "indexes" / "default", create=True) as s:
        assert s.path == tmp_path / "indexes" / "default" / "metadata.sqlite" and s.path.exists()


def test_schema_compiles_for_postgresql():
    dialect = postgresql.dialect()
    ddl = "\n".join(str(CreateTable(t).compile(dialect=dialect)) for t in schema_metadata.sorted_tables)
    ddl += "\n".join(
        str(CreateIndex(ix).compile(dialect=dialect))
        for t in schema_metadata.sorted_tables
        for ix in t.indexes
    )
    assert "BIGSERIAL" in ddl and "BYTEA" in ddl and "ix_images_taken_at" in ddl


def test_migration_runner_runs_new_steps_once_and_rolls_back_failures(tmp_path):
    engine = create_library_engine(create_engine(f"sqlite:///{tmp_path / 'm.sqlite'}").url, busy_timeout_s=1)
    calls = []
    extra, broken = LATEST_VERSION + 1, LATEST_VERSION + 2

    def add_extra(connection):
        calls.append(extra)
        connection.exec_driver_sql("CREATE TABLE extra (x INTEGER)")

    def step_broken(connection):
        connection.exec_driver_sql("CREATE TABLE extra3 (x INTEGER)")
        raise RuntimeError("step 3 failed")

    steps = (*MIGRATIONS, Migration(extra, "add extra", add_extra))
    assert migrate(engine, "m", create=True, migrations=steps) == extra
    assert migrate(engine, "m", create=True, migrations=steps) == extra
    assert calls == [extra]
    with pytest.raises(RuntimeError, match="step 3"):
        migrate(engine, "m", create=True, migrations=(*steps, Migration(broken, "broken", step_broken)))
    with engine.connect() as c:
        assert current_version(c) == extra
        assert not inspect(c).has_table("extra3")  # the failed step's DDL was rolled back
    with pytest.raises(ValueError, match="in order"):
        migrate(engine, "m", create=True, migrations=(Migration(2, "x", add_extra),))
    engine.dispose()


def test_a_v1_library_moves_its_caption_vectors_to_their_own_table(metadata_location, rng):
    """Schema v1 kept caption vectors inside the 32 KB embeddings rows; v2 moves them out."""
    from sqlalchemy.engine import make_url

    from blip2_search.store.engine import resolve_location

    url, path = resolve_location(metadata_location)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_library_engine(make_url(url), busy_timeout_s=1)
    assert migrate(engine, "v1", create=True, migrations=MIGRATIONS[:1]) == 1
    vectors, caption = unit(rng, Q, D), unit(rng, D)
    with engine.begin() as c:
        if path is None:  # PostgreSQL databases made before the caption word index existed lack it
            c.exec_driver_sql("DROP INDEX ix_images_caption_words")
        for key, value in (("embedder_model", "test/embedder"), ("embedder_revision", "rev1"),
                           ("num_query_tokens", str(Q)), ("dim", str(D))):
            c.execute(text("INSERT INTO library_info (key, value) VALUES (:k, :v)"), {"k": key, "v": value})
        c.execute(
            text("INSERT INTO embeddings (content_hash, image_vectors, caption_vector, created_at) "
                 "VALUES ('h1', :v, :c, :t), ('h2', :v, NULL, :t)"),
            {"v": vectors.astype("<f4").tobytes(), "c": caption.astype("<f4").tobytes(), "t": datetime(2026, 1, 1)},
        )
        c.execute(
            text("INSERT INTO images (path, content_hash, status, caption) VALUES "
                 "('/p/a.jpg', 'h1', 'indexed', 'a dog'), ('/p/b.jpg', 'h2', 'indexed', NULL)")
        )
    engine.dispose()
    with open_metadata(metadata_location, create=False, embedder=EMBEDDER) as s:
        assert s.info().schema_version == LATEST_VERSION >= 2
        if path is None:
            assert "ix_images_caption_words" in {ix["name"] for ix in inspect(s._engine).get_indexes("images")}
        (ids, got), = list(s.iter_caption_vectors())
        assert ids.tolist() == [s.known_files()["/p/a.jpg"].id]
        np.testing.assert_array_equal(got[0], caption)
        stored = s.get_embeddings(["h1", "h2"])
        np.testing.assert_array_equal(stored["h1"].caption_vector, caption)
        assert stored["h2"].caption_vector is None
        np.testing.assert_array_equal(stored["h2"].image_vectors, vectors)
        b_id = s.known_files()["/p/b.jpg"].id
        s.set_captions([CaptionUpdate(b_id, "a cat", "m", caption_vector=caption)])
        assert len(list(s.iter_caption_vectors())[0][0]) == 2
        s.mark_deleted([b_id])
        assert s.forget_deleted() == (1, 1)
        assert s.get_embeddings(["h2"]) == {}


def test_an_older_schema_on_read_only_media_says_where_to_upgrade_it(tmp_path, monkeypatch):
    """A v1 library on a DVD or read-only share failed every command with SQLite's "attempt to write a readonly
    database" and "make the library folder writable", which read-only media cannot be."""
    path = tmp_path / "lib" / "metadata.sqlite"
    path.parent.mkdir()
    engine = create_library_engine(engine_module.resolve_location(path)[0], busy_timeout_s=1)
    assert migrate(engine, "v1", create=True, migrations=MIGRATIONS[:1]) == 1
    engine.dispose()
    real_access = os.access
    monkeypatch.setattr(metadata_module, "on_read_only_media", lambda folder: Path(folder) == path.parent)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path.parent and mode == os.W_OK else real_access(p, mode, **kw))
    with pytest.raises(LibraryError) as info:
        open_metadata(path.parent, create=False)
    message = str(info.value)
    assert f"library {path} has schema version 1, older than this blip2-search's {LATEST_VERSION}" in message, message
    assert "read-only media" in message and "open the library once where it is writable" in message and "\n" not in message
    assert sorted(p.name for p in path.parent.iterdir()) == ["metadata.sqlite"]  # nothing written


def test_newer_schema_is_refused_with_versions_and_fix(tmp_path):
    path = tmp_path / "metadata.sqlite"
    open_metadata(path, create=True).close()
    with sqlite3.connect(path) as raw:
        raw.execute(
            "UPDATE library_info SET value = ? WHERE key = 'schema_version'", (str(LATEST_VERSION + 5),)
        )
    with pytest.raises(LibraryError) as info:
        open_metadata(path, create=False)
    message = str(info.value)
    assert str(LATEST_VERSION + 5) in message and str(LATEST_VERSION) in message
    assert "upgrade blip2-search" in message and str(path) in message and "\n" not in message


# -- opening errors ------------------------------------------------------------------------------


def test_missing_empty_and_corrupt_libraries(tmp_path):
    missing = tmp_path / "nope" / "metadata.sqlite"
    with pytest.raises(LibraryError, match=r"no library at .*nope.*name the right library folder \(Library\.open\(FOLDER\)\)"):
        open_metadata(missing, create=False)
    assert not missing.parent.exists()
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    with pytest.raises(LibraryError, match="not a blip2-search library"):
        open_metadata(empty, create=False)
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database at all " * 200)
    with pytest.raises(LibraryError) as info:
        open_metadata(corrupt, create=False)
    assert str(corrupt) in str(info.value) and "restore it from a backup" in str(info.value)


def test_read_only_folder_is_reported_simulated(tmp_path, monkeypatch):
    # The test machine runs as root, which chmod cannot stop; simulate the permission check.
    monkeypatch.setattr(metadata_module.os, "access", lambda path, mode: False)
    with pytest.raises(LibraryError, match="read-only .*make it writable"):
        open_metadata(tmp_path / "metadata.sqlite", create=True)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores chmod; see the simulated test"
)
def test_read_only_folder_is_reported_for_real(tmp_path):
    path = tmp_path / "lib" / "metadata.sqlite"
    open_metadata(path, create=True).close()
    path.parent.chmod(0o555)
    try:
        with pytest.raises(LibraryError, match="read-only"):
            open_metadata(path, create=False)
    finally:
        path.parent.chmod(0o755)


def test_read_only_database_write_is_a_library_error(tmp_path, rng):
    path = tmp_path / "metadata.sqlite"
    with open_metadata(path, create=True, embedder=EMBEDDER) as s:
        s.upsert_indexed([image(tmp_path / "a.jpg", "h1", unit(rng, Q, D))])
    with open_metadata(f"sqlite:///file:{path}?mode=ro&uri=true", create=False) as ro:
        assert ro.counts().indexed == 1
        with pytest.raises(LibraryError) as info:
            ro.mark_deleted([1])
    assert "read-only" in str(info.value) and str(path) in str(info.value)
    # the folder may well be writable: a metadata.sqlite left read-only (chmod, a copy from read-only media) is as likely
    assert "make the library folder and the files in it writable" in str(info.value)


def test_disk_full_is_a_library_error(sqlite_store, tmp_path, rng):
    store = sqlite_store
    @event.listens_for(store._engine, "connect")
    def _cap(dbapi_connection, _record):
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute("PRAGMA max_page_count = " + str(int(pages)))

    store._engine.dispose()
    batch = [image(tmp_path / f"{i}.jpg", f"h{i}", unit(rng, Q, D)) for i in range(2000)]
    with pytest.raises(LibraryError) as info:
        store.upsert_indexed(batch)
    assert "disk is full" in str(info.value) and "free disk space" in str(info.value)


def test_forgetting_photos_writes_little_more_than_their_index_pages(tmp_path, rng):
    """Where SQLite defaults to secure_delete=ON, every freed page was zeroed through the WAL: forgetting photos wrote
    all their vectors again, so `prune` on a nearly full disk failed ("database or disk is full") though it frees space."""
    path = tmp_path / "lib" / "metadata.sqlite"
    wal = path.with_name("metadata.sqlite-wal")
    with open_metadata(path, create=True, embedder=EmbedderInfo(ModelRef("t/e", "r"), 32, 256)) as s:
        ids = s.upsert_indexed([image(tmp_path / f"{i}.jpg", f"h{i}", unit(rng, 32, 256)) for i in range(60)])  # 32 KB each
        s.mark_deleted(ids)
        s.vacuum()  # the WAL folded in and truncated
        assert wal.stat().st_size == 0
        assert s.forget_deleted() == (60, 60)
        freed = 60 * 32 * 256 * 4
        assert wal.stat().st_size < freed // 4, (wal.stat().st_size, freed)  # ~0.1 MB here, ~2.3 MB with secure_delete


def test_disk_io_error_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch):
    """With no byte free SQLite cannot create its -shm file and reports only 'disk I/O error'."""
    import shutil as shutil_module
    import sqlite3
    from collections import namedtuple

    from blip2_search.store.engine import library_error

    error = sqlite3.OperationalError("disk I/O error")
    location = str(tmp_path / "metadata.sqlite")
    assert "check the library location" in str(library_error(location, error))  # this disk has room
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    assert "disk I/O error; the disk is full; free disk space" in str(library_error(location, error))


def test_locked_library_is_a_library_error_and_readers_still_read(tmp_path, rng):
    path = tmp_path / "metadata.sqlite"
    s = open_metadata(path, create=True, embedder=EMBEDDER, busy_timeout_s=0.2)
    s.upsert_indexed([image(tmp_path / "a.jpg", "h1", unit(rng, Q, D))])
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert s.counts().indexed == 1  # WAL: reading while another connection holds the write lock
        with pytest.raises(LibraryError, match="locked.*wait for it to finish"):
            s.mark_deleted([1])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert s.mark_deleted([1]) == 1
    s.close()


def test_locked_postgres_library_is_a_library_error_and_readers_still_read(postgres_url, rng):
    s = open_metadata(postgres_url, create=True, embedder=EMBEDDER, busy_timeout_s=0.2)
    s.upsert_indexed([image("/p/a.jpg", "h1", unit(rng, Q, D))])
    holder = create_engine(postgres_url)
    try:
        with holder.connect() as c, c.begin():
            c.exec_driver_sql(f"SELECT pg_advisory_xact_lock({engine_module._WRITER_LOCK_KEY})")
            assert s.counts().indexed == 1
            start = time.monotonic()
            with pytest.raises(LibraryError, match="lock timeout.*wait for it to finish"):
                s.mark_deleted([1])
            assert time.monotonic() - start < 5
        assert s.mark_deleted([1]) == 1
    finally:
        holder.dispose()
        s.close()


def test_model_mismatch_and_reset_for_reembedding(metadata_location, tmp_path, rng):
    path = metadata_location
    with open_metadata(path, create=True, embedder=EMBEDDER) as s:
        s.upsert_indexed(
            [
                image(tmp_path / "a.jpg", "h1", unit(rng, Q, D), caption="a cat", caption_model="c"),
                image(tmp_path / "b.jpg", "h2", unit(rng, Q, D)),
            ]
        )
    other = EmbedderInfo(ModelRef("other/model", "rev9"), Q, D)
    with pytest.raises(ModelMismatchError) as info:
        open_metadata(path, create=False, embedder=other)
    message = str(info.value)
    assert "test/embedder@rev1" in message and "other/model@rev9" in message and "reembed=True" in message and "--" not in message
    with open_metadata(path, create=False) as s:
        generation = s.vectors_generation()
        assert s.reset_embedder(other) == 2
        counts = s.counts()
        assert (counts.indexed, counts.pending, counts.embeddings) == (0, 2, 0)
        assert s.vectors_generation() == generation + 1
        assert s.known_files()[str(tmp_path / "a.jpg")].status == "pending"
        assert s.get_by_paths([str(tmp_path / "a.jpg")])[str(tmp_path / "a.jpg")].caption == "a cat"
    with open_metadata(path, create=False, embedder=other) as s:
        s.upsert_indexed([image(tmp_path / "a.jpg", "h1", unit(rng, Q, D))])
        assert s.counts().indexed == 1


# -- pipeline writes -------------------------------------------------------------------------------


def test_upsert_lookup_duplicates_and_generation(store, tmp_path, rng):
    v1, v2 = unit(rng, Q, D), unit(rng, Q, D)
    a, b, c = (str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg"))
    ids = store.upsert_indexed(
        [
            image(a, "h1", v1, width=640, height=480),
            image(b, "h2", v2),
            image(c, "h1", None, camera_make="Canon"),
        ]
    )
    assert len(set(ids)) == 3 and store.vectors_generation() == 1
    known = store.known_files()
    assert known[a].id == ids[0] and known[a].content_hash == "h1" and known[a].status == "indexed"
    assert store.counts().embeddings == 2  # a and c share one row
    np.testing.assert_array_equal(store.get_embeddings(["h1"])["h1"].image_vectors, v1)
    assert {r.id for r in store.images_by_hash(["h1"])["h1"]} == {ids[0], ids[2]}
    records = store.get_records([ids[2], 999, ids[0]])
    assert [r.id for r in records] == [ids[2], ids[0]]
    assert records[0].camera_make == "Canon" and records[1].width == 640 and records[1].indexed_at is not None
    # re-upserting an existing path keeps its id; a new batch bumps the generation once
    again = store.upsert_indexed([image(a, "h1", v1, size=11)])
    assert again == [ids[0]] and store.vectors_generation() == 2
    with store.live_vectors(chunk_size=2) as live:
        assert live.generation == 2 and live.count == 3
        chunks = list(live.chunks())
    assert [len(chunk.ids) for chunk in chunks] == [2, 1]
    got = dict(
        zip(
            np.concatenate([c.ids for c in chunks]).tolist(),
            np.concatenate([c.vectors for c in chunks]),
            strict=True,
        )
    )
    np.testing.assert_array_equal(got[ids[0]], v1)
    np.testing.assert_array_equal(got[ids[1]], v2)
    np.testing.assert_array_equal(got[ids[2]], v1)


def test_upsert_validates_and_is_all_or_nothing(store, tmp_path, rng):
    good = image(tmp_path / "a.jpg", "h1", unit(rng, Q, D))
    bad_batches = [
        [good, image(tmp_path / "b.jpg", "h2", unit(rng, Q + 1, D))],
        [good, image(tmp_path / "b.jpg", "h-unknown", None)],
        [good, image("relative.jpg", "h2", unit(rng, Q, D))],
        [good, image(tmp_path / "a.jpg", "h2", unit(rng, Q, D))],
        [good, image(tmp_path / "b.jpg", "h2", np.full((Q, D), np.nan, dtype=np.float32))],
        [good, image(tmp_path / "b.jpg", "", unit(rng, Q, D))],
    ]
    for batch in bad_batches:
        with pytest.raises(InvalidInputError):
            store.upsert_indexed(batch)
    assert store.counts().present == 0 and store.counts().embeddings == 0 and store.vectors_generation() == 0


def test_caption_kept_cleared_or_inherited(store, tmp_path, rng):
    a, b = str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")
    (ida,) = store.upsert_indexed([image(a, "h1", unit(rng, Q, D))])
    store.set_captions([CaptionUpdate(ida, "a red bicycle", "cap", unit(rng, D))])
    store.upsert_indexed([image(a, "h1", None, mtime_ns=5)])  # same content: caption kept
    assert store.get_records([ida])[0].caption == "a red bicycle"
    (idb,) = store.upsert_indexed([image(b, "h1", None)])  # duplicate content: caption inherited
    assert store.get_records([idb])[0].caption == "a red bicycle"
    store.upsert_indexed([image(a, "h2", unit(rng, Q, D))])  # content changed: caption cleared
    assert store.get_records([ida])[0].caption is None
    assert [r.id for r in store.uncaptioned()] == [ida]


def test_set_captions_applies_to_duplicates_and_stores_vectors(store, tmp_path, rng):
    ids = store.upsert_indexed(
        [
            image(tmp_path / "a.jpg", "h1", unit(rng, Q, D)),
            image(tmp_path / "b.jpg", "h1", None),
            image(tmp_path / "c.jpg", "h2", unit(rng, Q, D)),
        ]
    )
    cv = unit(rng, D)
    assert [r.id for r in store.uncaptioned(after=ids[0])] == ids[1:] and store.captions_generation() == 0
    store.set_captions([CaptionUpdate(ids[0], "two dogs", "cap", cv)])
    assert store.captions_generation() == 0 and store.captions_changed() == 1 == store.captions_generation()
    assert [r.caption for r in store.get_records(ids)] == ["two dogs", "two dogs", None]
    assert store.counts().captioned == 2
    got = list(store.iter_caption_vectors(chunk_size=1))
    assert [int(i[0]) for i, _ in got] == ids[:2]
    np.testing.assert_array_equal(got[1][1][0], cv)
    with pytest.raises(InvalidInputError, match="no such image"):
        store.set_captions([CaptionUpdate(12345, "x", "cap")])


def test_rename_keeps_id_and_caption_and_replaces_target(store, tmp_path, rng):
    a, b, c, d = (str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"))
    ida, idb, idc = store.upsert_indexed(
        [
            image(a, "h1", unit(rng, Q, D), caption="a boat", caption_model="m"),
            image(b, "h2", unit(rng, Q, D)),
            image(c, "h3", unit(rng, Q, D)),
        ]
    )
    generation = store.vectors_generation()
    store.rename([(ida, d)])
    record = store.get_by_paths([d])[d]
    assert record.id == ida and record.caption == "a boat" and a not in store.known_files()
    assert store.vectors_generation() == generation  # ids and vectors unchanged
    store.rename([(idb, c), (idc, b)])  # a swap never trips the unique constraint
    assert store.known_files()[c].id == idb and store.known_files()[b].id == idc
    store.rename([(ida, c)])  # c's file was replaced by the moved one: its row goes
    assert store.known_files()[c].id == ida and idb not in {r.id for r in store.get_records([idb])}
    assert store.vectors_generation() == generation + 1
    with pytest.raises(InvalidInputError, match="no such image"):
        store.rename([(999, d)])


def test_failed_file_then_indexed(store, tmp_path, rng):
    p = str(tmp_path / "broken.jpg")
    (fid,) = store.mark_failed([FailedFile(p, "cannot decode\n  truncated JPEG\tdata", size=5, mtime_ns=9)])
    failures = store.failures()
    assert [(f.image_id, f.path, f.error) for f in failures] == [
        (fid, p, "cannot decode truncated JPEG data")
    ]
    assert store.known_files()[p].status == "failed" and store.counts().failed == 1
    (again,) = store.upsert_indexed([image(p, "h9", unit(rng, Q, D))])
    record = store.get_records([fid])[0]
    assert again == fid and record.status == "indexed" and record.error is None
    assert store.failures() == [] and store.counts().indexed == 1
    generation = store.vectors_generation()
    store.mark_failed([FailedFile(p, "x" * 2000)])  # an indexed image that now fails leaves search
    assert store.vectors_generation() == generation + 1 and len(store.failures()[0].error) == 500
    # its record keeps the content it held (its details and caption are that content's): a restore takes them back
    store.mark_failed([FailedFile(p, "truncated", content_hash="h10")])
    assert store.known_files()[p].content_hash == "h9"
    # gone: the photo whose re-index failed is a deleted photo (kept with its vectors); a never-indexed failure is dropped
    (never,) = store.mark_failed([FailedFile(str(tmp_path / "never.jpg"), "cannot decode")])
    assert store.mark_deleted([fid, never]) == 1
    assert [(r.id, r.status, r.content_hash) for r in store.get_records([fid, never])] == [(fid, "deleted", "h9")]
    assert store.get_embeddings(["h9"]) and store.counts().deleted == 1


def test_mark_deleted_leaves_search_and_purge(store, tmp_path, rng):
    ids = store.upsert_indexed(
        [
            image(tmp_path / "a.jpg", "h1", unit(rng, Q, D), caption="a cat", caption_model="c"),
            image(tmp_path / "b.jpg", "h2", unit(rng, Q, D), caption="a cat", caption_model="c"),
        ]
    )
    generation = store.vectors_generation()
    assert store.mark_deleted([ids[0]]) == 1 and store.mark_deleted([ids[0]]) == 0
    assert store.vectors_generation() == generation + 1
    counts = store.counts()
    assert (counts.present, counts.indexed, counts.deleted, counts.captioned) == (1, 1, 1, 1)
    assert [i for i, _ in store.search_captions("cat", 10)] == [ids[1]]
    with store.live_vectors() as live:
        assert [c.ids.tolist() for c in live.chunks()] == [[ids[1]]]
    assert store.known_files()[str(tmp_path / "a.jpg")].status == "deleted"
    assert store.live_paths() == [(ids[1], str(tmp_path / "b.jpg"))]
    assert store.forget_deleted() == (1, 1)
    assert store.counts().embeddings == 1 and store.known_files().keys() == {str(tmp_path / "b.jpg")}
    # a failure record is no photo: removed, not counted among the deleted
    (failed,) = store.mark_failed([FailedFile(str(tmp_path / "broken.jpg"), "truncated")])
    assert store.mark_deleted([failed]) == 0 and store.failures() == [] and store.counts().deleted == 0
    assert store.known_files().keys() == {str(tmp_path / "b.jpg")}
    store.mark_deleted([ids[1]])
    time.sleep(0.02)
    between = datetime.now(timezone.utc)
    time.sleep(0.02)
    store.set_captions([CaptionUpdate(ids[1], "a cat again", "c")])  # captioning keeps the deletion time
    with pytest.raises(InvalidInputError, match="time zone"):
        store.forget_deleted(datetime(2030, 1, 1))
    assert store.forget_deleted(datetime.now(timezone.utc) - timedelta(hours=1)) == (0, 0)  # too recent
    assert store.forget_deleted(between) == (1, 1)
    assert store.counts() == StatusCounts(0, 0, 0, 0, 0, 0, 0)
    store.vacuum()


def test_worth_compacting_asks_for_a_tenth_of_the_file_free():
    assert not engine_module.worth_compacting(0, 0)
    assert not engine_module.worth_compacting(1000, 99)
    assert engine_module.worth_compacting(1000, 100)
    assert engine_module.worth_compacting(1000, 10, min_free_share=0.01)


def test_vacuum_rewrites_the_file_only_when_a_tenth_of_it_is_free(tmp_path, rng):
    """VACUUM rewrites the whole file (a minute at 100k photos) whatever it frees: removing a few
    photos leaves their pages free for the next inserts; removing enough compacts."""
    q, d = 32, 256  # ViT-g's vectors: 32 KB a photo, in overflow pages that a deletion frees
    path = tmp_path / "lib" / "metadata.sqlite"
    with open_metadata(path, create=True, embedder=EmbedderInfo(ModelRef("test/embedder", "rev1"), q, d)) as s:
        ids = s.upsert_indexed([image(tmp_path / f"{i}.jpg", f"h{i}", unit(rng, q, d)) for i in range(40)])

        def pages() -> tuple[int, int]:
            with s._engine.connect() as c:
                return c.exec_driver_sql("PRAGMA page_count").scalar(), c.exec_driver_sql("PRAGMA freelist_count").scalar()

        s.mark_deleted(ids[:2])
        assert s.forget_deleted() == (2, 2)
        total, free = pages()
        assert 0 < free < 0.1 * total
        assert s.vacuum() is False
        assert pages() == (total, free)  # not rewritten: the free pages wait for the next inserts
        assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0  # the WAL was checkpointed
        s.mark_deleted(ids[2:6])
        assert s.forget_deleted() == (4, 4)  # with the 2 before, 6 of 40 photos' pages are free
        assert s.vacuum() is True
        assert pages()[1] == 0 and pages()[0] < total - free
        assert len(s.known_files()) == 34


def test_vacuum_on_postgresql_runs_every_time(postgres_url, tmp_path, rng):
    """PostgreSQL's plain VACUUM rewrites nothing (it marks dead rows' space reusable), so it always runs."""
    with open_metadata(postgres_url, create=True, embedder=EMBEDDER) as s:
        ids = s.upsert_indexed([image(tmp_path / f"{i}.jpg", f"h{i}", unit(rng, Q, D)) for i in range(3)])
        s.mark_deleted(ids[:1])
        assert s.forget_deleted() == (1, 1)
        assert s.vacuum() is True and s.vacuum() is True
        assert len(s.known_files()) == 2


def test_corrupt_vector_row_is_detected(store, tmp_path, rng):
    store.upsert_indexed([image(tmp_path / "a.jpg", "h1", unit(rng, Q, D))])
    with store._engine.begin() as c:
        c.execute(text("UPDATE embeddings SET image_vectors = :b"), {"b": b"\x00" * 12})
    with pytest.raises(LibraryError, match="the library database is damaged; restore it from a backup, or move it aside and index the photo folders again"):
        with store.live_vectors() as live:
            list(live.chunks())


# -- paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"/photos/caf\xe9.jpg",
        b"/p/\xff\xfe\\x41\\\\.jpg",
        b"/p/plain \xc3\xa9.jpg",
        b"/p/back\\slash.jpg",
        b"/fsbytes:/x.jpg",
    ],
)
def test_path_codec_is_lossless(raw):
    path = os.fsdecode(raw)
    stored = encode_path(path)
    stored.encode("utf-8")  # always storable as text
    assert os.fsencode(decode_path(stored)) == raw


def test_non_utf8_filename_round_trip(store, tmp_path, rng):
    raw = os.fsencode(tmp_path) + b"/caf\xe9 \\x41.jpg"
    name = os.fsdecode(raw)
    try:
        Path(name).write_bytes(b"x")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this filesystem refuses non-UTF-8 names")
    (image_id,) = store.upsert_indexed([image(name, "h1", unit(rng, Q, D))])
    twin = os.fsdecode(
        os.fsencode(tmp_path) + b"/caf\xc3\xa9 \\x41.jpg"
    )  # the UTF-8 spelling is another file
    store.upsert_indexed([image(twin, "h1", None)])
    assert store.known_files()[name].id == image_id
    record = store.get_records([image_id])[0]
    assert record.path == name and os.path.exists(record.path) and os.fsencode(record.path) == raw
    assert store.get_by_paths([name])[name].id == image_id and len(store.known_files()) == 2


# -- captions full-text search -------------------------------------------------------------------------

CAPTIONS = [
    "a dog running on the beach",
    "two cats sleeping on a sofa",
    "a dog and a cat",
    "sunset over the beach",
    "Crème brûlée on a plate",
    "NOT a dog: an AND gate",
]
NASTY = [
    '"',
    '""',
    "'",
    'dog"',
    '"dog',
    "dog AND",
    "OR",
    "NOT dog",
    "dog NEAR(cat)",
    "dog*",
    "^dog",
    "caption:dog",
    "(dog",
    "dog)",
    "-dog",
    "dog + cat",
    "{dog}",
    "d'og",
    "",
    "   ",
    "***",
    "\\",
    "%_",
    "dog; DROP TABLE images; --",
    "\x00dog",
    "😀 dog",
]


def _expected(query: str) -> set[int]:
    words = [w.lower() for w in re.findall(r"[^\W_]+", query)]
    found = set()
    for i, caption in enumerate(CAPTIONS):
        tokens = {t.lower() for t in re.findall(r"[^\W_]+", caption)}
        if words and all(w in tokens for w in words):
            found.add(i)
    return found


@pytest.fixture()
def captioned(store, tmp_path, rng):
    items = [
        image(tmp_path / f"{i}.jpg", f"h{i}", unit(rng, Q, D), caption=c, caption_model="m")
        for i, c in enumerate(CAPTIONS)
    ]
    ids = store.upsert_indexed(items)
    return store, ids


@pytest.mark.parametrize("query", ["dog", "beach", "DOG beach", "cat", "not", "and", *NASTY])
def test_search_captions_matches_words_and_never_raises(captioned, query):
    store, ids = captioned
    hits = store.search_captions(query, 10)
    assert {ids.index(i) for i, _ in hits} == _expected(query)
    ranks = [r for _, r in hits]
    assert ranks == sorted(ranks)


def test_search_captions_ranking_any_mode_diacritics_and_sync(captioned):
    store, ids = captioned
    sqlite = store.path is not None
    assert [ids.index(i) for i, _ in store.search_captions("crème BRÛLÉE", 5)] == [4]
    # FTS5 folds diacritics; PostgreSQL's 'simple' words keep them (documented)
    assert [ids.index(i) for i, _ in store.search_captions("creme brulee", 5)] == ([4] if sqlite else [])
    ranked = store.search_captions("beach sunset", 5, require_all=False)  # the caption with both words first
    assert [ids.index(i) for i, _ in ranked] == [3, 0]
    assert {ids.index(i) for i, _ in store.search_captions("sunset sofa", 10, require_all=False)} == {1, 3}
    assert len(store.search_captions("dog", 1)) == 1 and store.search_captions("dog", 0) == []
    store.set_captions([CaptionUpdate(ids[0], "a horse in a field", "m")])
    assert ids[0] not in {i for i, _ in store.search_captions("dog", 10)}
    assert [i for i, _ in store.search_captions("horse", 10)] == [ids[0]]
    store.rename([(ids[1], str(Path(store.get_records([ids[2]])[0].path)))])  # hard-deletes row ids[2]
    assert store.search_captions("cat", 10) == []  # ids[2] ("a dog and a cat") was replaced
    assert [ids.index(i) for i, _ in store.search_captions("cats", 10)] == [1]
    if sqlite:
        with store._engine.begin() as c:
            c.exec_driver_sql("INSERT INTO images_fts(images_fts, rank) VALUES ('integrity-check', 1)")
    assert fts5_query('a "b" OR c') == '"a" "b" "OR" "c"'


# -- WAL: a second process ----------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, sys.argv[1])
    from blip2_search.store import open_metadata, IndexedImage, EmbedderInfo, ModelRef
    embedder = EmbedderInfo(ModelRef("test/embedder", "rev1"), 4, 8)
    s = open_metadata(sys.argv[2], create=False, embedder=embedder)
    rng = np.random.default_rng(1)
    print("ready", flush=True)
    name, pause = sys.argv[4], float(sys.argv[5])
    for i in range(int(sys.argv[3])):
        v = rng.standard_normal((4, 8)).astype(np.float32)
        s.upsert_indexed([IndexedImage(f"/{name}/{i}.jpg", 1, 1, f"{name}{i}", vectors=v)])
        time.sleep(pause)
    s.close()
""")


def test_second_process_reads_consistent_snapshots_while_one_writes(metadata_location, store):
    n = 40
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(REPO_ROOT), metadata_location, str(n), "w", "0.005"],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen = set()
    try:
        assert writer.stdout.readline().strip() == "ready"  # wait (idle) while the child imports
        while writer.poll() is None or not seen:
            with store.live_vectors(chunk_size=7) as live:
                rows = sum(len(c.ids) for c in live.chunks())
                assert rows == live.count == live.generation  # each batch adds one image, bumps once
                seen.add(live.generation)
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert store.vectors_generation() == n and store.counts().indexed == n
    assert len(seen) > 2  # the reader ran while the writer was writing


def test_writers_in_two_processes_take_turns(metadata_location, store):
    n = 100
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(REPO_ROOT), metadata_location, str(n), name, "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    for writer in writers:
        writer.wait(timeout=120)
        assert writer.returncode == 0
    # every batch bumped the generation once: a lost update (two writers reading the same
    # counter) or a lost row would show here
    assert store.vectors_generation() == 2 * n and store.counts().indexed == 2 * n


def test_reader_is_not_blocked_by_an_open_write_transaction(tmp_path, sqlite_store, rng):
    store = sqlite_store
    store.upsert_indexed([image(tmp_path / "a.jpg", "h1", unit(rng, Q, D))])
    holder = textwrap.dedent("""
        import sqlite3, sys, time
        c = sqlite3.connect(sys.argv[1], isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE images SET status = 'deleted'")
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
        c.execute("COMMIT")
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(store.path), "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        start = time.monotonic()
        assert store.counts().indexed == 1  # the uncommitted change is invisible, and we did not wait
        assert time.monotonic() - start < 1.0
    finally:
        process.wait(timeout=30)
    assert store.counts().deleted == 1


def test_postgres_caption_search_uses_the_word_index(postgres_url, rng):
    statements = []
    with open_metadata(postgres_url, create=True, embedder=EMBEDDER) as s:
        words = ["cat", "car", "tree", "beach", "house", "road", "sky", "boat"]
        s.upsert_indexed(
            [
                image(f"/p/{i}.jpg", f"h{i}", unit(rng, Q, D), caption=f"a {words[i % 8]} {i}", caption_model="m")
                for i in range(3000)
            ]
            + [image("/p/dog.jpg", "dog", unit(rng, Q, D), caption="a dog", caption_model="m")]
        )
        with s._engine.begin() as c:
            c.exec_driver_sql("ANALYZE images")

        @event.listens_for(s._engine, "before_cursor_execute")
        def _keep(conn, cursor, statement, parameters, context, executemany):
            if "plainto_tsquery" in statement:
                statements.append((statement, parameters))

        assert len(s.search_captions("dog", 5)) == 1
        (statement, parameters), = statements
        with s._engine.connect() as c:
            plan = "\n".join(row[0] for row in c.exec_driver_sql("EXPLAIN " + statement, parameters))
    assert "ix_images_caption_words" in plan, plan


def test_filter_ids_by_path_glob_and_dates(store, rng):
    raw = os.fsdecode(b"/p/2023/caf\xe9.jpg")  # not UTF-8: stored escaped, matched as the real name
    paths = ["/p/2023/a.jpg", "/p/2023/b.png", "/p/2024/a.jpg", raw, "/p/[x]/c.jpg"]
    days = [datetime(2023, 1, 5), None, datetime(2024, 2, 1), datetime(2023, 6, 1), None]
    ids = store.upsert_indexed(
        [image(p, f"h{i}", unit(rng, Q, D), taken_at=t) for i, (p, t) in enumerate(zip(paths, days))]
    )
    store.mark_deleted([ids[1]])

    def got(**kw):
        return [ids.index(i) for i in store.filter_ids(**kw)]

    assert got() == [0, 2, 3, 4]
    assert got(path_glob="*/2023/*") == [0, 3]
    assert got(path_glob="*.jpg") == [0, 2, 3, 4]
    assert got(path_glob=os.fsdecode(b"*caf\xe9*")) == [3] and got(path_glob="*caf*") == [3]
    assert got(path_glob="/p/[!2]*") == [4] and got(path_glob="/p/[[]x]/*") == [4]
    assert got(path_glob="/P/*") == []  # case-sensitive
    assert got(after=datetime(2023, 3, 1)) == [2, 3] and got(before=datetime(2023, 12, 31)) == [0, 3]
    assert got(after=datetime(2023, 1, 1), path_glob="*a.jpg") == [0, 2]


def _library_file(tmp_path: Path, rng) -> Path:
    """A library file of 120 photos (several pages of them), closed."""
    path = tmp_path / "lib" / "metadata.sqlite"
    with open_metadata(path, create=True, embedder=EMBEDDER) as s:
        s.upsert_indexed([image(tmp_path / f"p{i:03d}.jpg", f"h{i}", unit(rng, Q, D), caption=f"photo number {i} of a zebra",
                                caption_model="c", taken_at=datetime(1999, 12, 31, 23, 59, i % 60)) for i in range(120)])
    return path


def _overwrite(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) >= 1
    path.write_bytes(data.replace(old, new))  # in the table and in any index that holds the value


@pytest.mark.parametrize("damage", ["page", "date", "text", "info", "number", "signs"])
def test_a_damaged_library_file_is_one_error_naming_it_and_the_way_back_and_is_never_written(tmp_path, rng, damage):
    """Damaged pages of metadata.sqlite surfaced as "database disk image is malformed; ... delete the library folder",
    as a stored date or text SQLite cannot tell is wrong as a raw ValueError traceback, and as a damaged library_info
    as a KeyError. Each is one DamagedDatabaseError (exit 2) naming the file, that it is damaged and the way back;
    nothing is written to the file."""
    from blip2_search.cli import main
    from blip2_search.errors import DamagedDatabaseError
    from click.testing import CliRunner

    path = _library_file(tmp_path, rng)
    if damage == "page":  # the middle of the last page of photos, past its header
        with sqlite3.connect(path) as c:
            page = c.execute("SELECT max(pageno) FROM dbstat WHERE name = 'images'").fetchone()[0]
            size = c.execute("PRAGMA page_size").fetchone()[0]
        with open(path, "r+b") as f:
            f.seek((page - 1) * size + 8)
            f.write(bytes((i * 37 + 11) % 256 for i in range(size - 100)))
    elif damage == "date":
        _overwrite(path, b"1999-12-31 23:59:07", b"1999-1X-31 23:59:07")
    elif damage == "text":
        _overwrite(path, b"photo number 7 of", b"\xff\xfeoto number 7 of")
    elif damage == "info":
        _overwrite(path, b"num_query_tokens", b"num_query_tokenZ")
    else:  # a digit Python's isdigit takes and int() refuses; a number with two minus signs, which lstrip("-") took
        c = sqlite3.connect(path)
        keys, value = (("schema_version", "num_query_tokens"), "\u00b2") if damage == "number" else (("num_query_tokens",), "--32")
        c.execute(f"UPDATE library_info SET value = ? WHERE key IN ({', '.join('?' * len(keys))})", (value, *keys))
        c.commit()
        c.close()  # its WAL written back into the file
    before = path.read_bytes()
    with pytest.raises(DamagedDatabaseError) as error:
        with open_metadata(path, create=False) as s:
            s.info()
            s.get_records(range(1, 121))
            s.counts()
    message = str(error.value)
    assert "\n" not in message and f"library database {path} is damaged (" in message
    assert "restore it from a backup" in message and "run `index` on the photo folders again" in message
    assert message.isprintable()  # no damaged bytes quoted
    if damage == "info":
        result = CliRunner().invoke(main, ["status", "--library", str(path.parent)])
        assert result.exit_code == 2 and "Traceback" not in result.output and f"{path} is damaged" in result.output, result.output
    assert path.read_bytes() == before
    assert not path.with_name(path.name + "-wal").exists() or path.with_name(path.name + "-wal").stat().st_size == 0
