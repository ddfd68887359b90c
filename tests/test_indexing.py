"""Indexing a photo library: incremental runs, moves/renames/duplicates/deletes, bad files, kill -9."""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from blip2_search.cli import main
from blip2_search.errors import IndexInterrupted, InvalidInputError, LibraryError, ModelMismatchError
from blip2_search.indexing.scan import FoundFile, Known, plan_changes
from blip2_search.images import open_image
from blip2_search.library import Library
from blip2_search.store import CaptionUpdate, ModelRef, open_metadata


def _photo(path: Path, seed: int, size=(64, 48), fmt=None):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    return path


@pytest.fixture()
def photos(tmp_path):
    d = tmp_path / "photos"
    for i in range(6):
        _photo(d / f"p{i}.jpg", i)
    _photo(d / "sub dir" / "nested é.png", 99)
    return d


def _open(lib_dir, model_dir, **kw):
    return Library.open(lib_dir, model=str(model_dir), captioner=False, create=True, batch_size=3, workers=2, **kw)


def _interrupted(lib, dirs):
    """The report of an index run stopped by Ctrl-C: Library.index raises IndexInterrupted (a KeyboardInterrupt)."""
    with pytest.raises(IndexInterrupted) as stop:
        lib.index(dirs)
    assert isinstance(stop.value, KeyboardInterrupt)
    return stop.value.report


def _check_consistent(lib_dir: Path):
    """FAISS (as a fresh load would see it) holds exactly the indexed images' ids, once each."""
    with Library.open(lib_dir) as lib:
        indexed = {k.id for k in lib.metadata.known_files().values() if k.status == "indexed"}
        ids = lib.vectors.image_ids().tolist()
        assert len(ids) == len(set(ids))
        assert set(ids) == indexed
        paths = [p for p in lib.metadata.known_files()]
        assert len(paths) == len(set(paths))


# ------------------------------------------------------------------ pure change detection
def test_plan_changes_is_pure_and_exact():
    known = {
        "/r/same.jpg": Known(1, 10, 100, "h1", "indexed"),
        "/r/changed.jpg": Known(2, 10, 100, "h2", "indexed"),
        "/r/gone.jpg": Known(3, 10, 100, "h3", "indexed"),
        "/r/failed.jpg": Known(4, 10, 100, None, "failed"),
        "/r/old-deleted.jpg": Known(5, 10, 100, "h5", "deleted"),
        "/other/x.jpg": Known(6, 10, 100, "h6", "indexed"),
    }
    found = [FoundFile("/r/same.jpg", 10, 100), FoundFile("/r/changed.jpg", 11, 100), FoundFile("/r/failed.jpg", 10, 100),
             FoundFile("/r/new.jpg", 5, 5), FoundFile("/r/link.jpg", 0, 0, "broken symlink")]
    plan = plan_changes(found, known, ["/r"])
    assert plan.unchanged == ("/r/same.jpg",)
    assert [f.path for f in plan.work] == ["/r/changed.jpg", "/r/failed.jpg", "/r/new.jpg"]
    assert [f.path for f in plan.unreadable] == ["/r/link.jpg"]
    assert plan.gone == ("/r/gone.jpg",)  # /other is not a scanned root; deleted stays deleted


# ------------------------------------------------------------------ incremental cycles
def test_index_then_rerun_skips_everything(tiny_itm_dir, photos, tmp_path):
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        r1 = lib.index([photos])
        assert (r1.scanned, r1.indexed, r1.failed, r1.reused) == (7, 7, 0, 0)
    with Library.open(lib_dir) as lib:  # model taken from the library
        r2 = lib.index([photos])
        assert (r2.scanned, r2.indexed, r2.unchanged, r2.reused, r2.deleted) == (7, 0, 7, 0, 0)
        st = lib.status()
        assert (st.images, st.indexed, st.failed, st.vectors) == (7, 7, 0, 7 * 32)
    _check_consistent(lib_dir)


def test_a_run_that_changes_nothing_neither_reads_nor_writes_the_vector_index(tiny_itm_dir, photos, tmp_path, monkeypatch):
    import blip2_search.library.vector_index as library_module

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    index_file = lib_dir / "vectors.faiss.json"  # the vector index's sidecar, rewritten by every save
    before = index_file.stat()
    opened = []
    real_open = library_module.open_vectors
    monkeypatch.setattr(library_module, "open_vectors", lambda *a, **kw: opened.append(1) or real_open(*a, **kw))
    from blip2_search.models.checkpoint import Checkpoint

    with monkeypatch.context() as patched:  # nor loads a model's processor (its import alone costs seconds)
        patched.setattr(Checkpoint, "image_processor", property(lambda self: pytest.fail("processor loaded by a run with nothing to read")))
        with Library.open(lib_dir) as lib:
            assert lib.index([photos]).unchanged == 7
    after = index_file.stat()
    assert opened == [] and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    (photos / "p0.jpg").unlink()
    with Library.open(lib_dir) as lib:  # a change opens it before the database changes, and saves it
        assert lib.index([photos]).deleted == 1
    assert opened == [1] and index_file.stat().st_mtime_ns != before.st_mtime_ns
    index_file.unlink()
    with Library.open(lib_dir) as lib:  # nothing changed, but the file is missing: made again
        lib.index([photos])
    assert index_file.exists()
    _check_consistent(lib_dir)


@pytest.mark.parametrize("kind", ["exact", "auto"])  # auto: the compact store holds exact vectors below its threshold
def test_an_index_run_that_changes_a_few_photos_appends_to_the_vector_index_without_reading_it(tiny_itm_dir, photos, tmp_path, monkeypatch, kind):
    """At 100k photos a nightly run read, grew and rewrote the whole 3.3 GB index (61 s, 7.1 GB of RAM): now it
    marks removed rows and appends new ones to the same data file, and never reads the vectors."""
    from blip2_search.store import vectors as vectors_module
    from blip2_search.store.index_files import read_sidecar

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index=kind) as lib:
        lib.index([photos])
        want = {h.id for h in lib.search("a red circle", 7, rerank=False, fusion=False).hits}
    first = read_sidecar(lib_dir / "vectors.faiss").params
    data = lib_dir / first["data"]
    size = data.stat().st_size
    (photos / "p0.jpg").unlink()
    _photo(photos / "new.jpg", 42)
    with monkeypatch.context() as patched:
        patched.setattr(vectors_module, "read_vectors", lambda *a: pytest.fail("an index run read the vectors"))
        with Library.open(lib_dir) as lib:
            report = lib.index([photos])
            assert (report.deleted, report.indexed) == (1, 1)
    second = read_sidecar(lib_dir / "vectors.faiss").params
    assert second["data"] == first["data"] and second["rows"] == first["rows"] + 1
    assert data.stat().st_size == size + size // first["rows"]
    with Library.open(lib_dir) as lib:
        hits = lib.search("a red circle", 10, rerank=False, fusion=False).hits
        assert len(hits) == 7 and len({h.id for h in hits} - want) == 1 and all(h.path != str(photos / "p0.jpg") for h in hits)
    _check_consistent(lib_dir)


def test_touched_and_moved_photos_keep_their_vectors_in_the_index(tiny_itm_dir, photos, tmp_path, monkeypatch):
    from blip2_search.store import FaissVectorStore

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        before = {h.path: h.itc for h in lib.search("a photo", k=10, rerank=False, fusion=False).hits}
    for path in photos.rglob("*.*"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched: same bytes
    shutil.move(photos / "p2.jpg", photos / "p2-renamed.jpg")
    added = []
    real_add = FaissVectorStore.add
    monkeypatch.setattr(FaissVectorStore, "add", lambda self, ids, v: added.extend(ids.tolist()) or real_add(self, ids, v))
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert (r.reused, r.indexed, r.deleted) == (7, 0, 0)
        assert added == []  # their vectors are in the index already: no re-add (a compaction per batch)
        after = {h.path: h.itc for h in lib.search("a photo", k=10, rerank=False, fusion=False).hits}
    before[str(photos / "p2-renamed.jpg")] = before.pop(str(photos / "p2.jpg"))
    assert after == before
    _check_consistent(lib_dir)


def test_an_indexed_photo_that_became_unreadable_leaves_the_vector_index(tiny_itm_dir, photos, tmp_path):
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    (photos / "p0.jpg").unlink()
    (photos / "p0.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a broken link: the scan itself reports it
    with Library.open(lib_dir) as lib:
        assert lib.index([photos]).failed == 1
        assert lib.status().indexed == 6
        assert str(photos / "p0.jpg") not in [h.path for h in lib.search("a photo", k=10, rerank=False).hits]
    _check_consistent(lib_dir)


def test_move_rename_duplicate_delete_modify(tiny_itm_dir, photos, tmp_path):
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        before = {p: k for p, k in lib.metadata.known_files().items()}
    (photos / "moved").mkdir()
    os.rename(photos / "p0.jpg", photos / "moved" / "renamed p0.jpg")  # move + rename
    shutil.copy(photos / "p1.jpg", photos / "copy of p1.jpg")  # duplicate
    os.remove(photos / "p2.jpg")  # delete
    _photo(photos / "p3.jpg", 1234)  # modify in place
    os.utime(photos / "p3.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert (r.indexed, r.reused, r.deleted, r.unchanged) == (1, 2, 1, 4)
        known = lib.metadata.known_files()
        moved = known[str(photos / "moved" / "renamed p0.jpg")]
        assert moved.id == before[str(photos / "p0.jpg")].id  # same record, path updated
        assert str(photos / "p0.jpg") not in known
        assert known[str(photos / "p2.jpg")].status == "deleted"
        assert known[str(photos / "p3.jpg")].id == before[str(photos / "p3.jpg")].id
        assert known[str(photos / "p3.jpg")].content_hash != before[str(photos / "p3.jpg")].content_hash
        dup = known[str(photos / "copy of p1.jpg")]
        assert dup.content_hash == known[str(photos / "p1.jpg")].content_hash and dup.id != known[str(photos / "p1.jpg")].id
        # the deleted image leaves search; the modified one is found by its new content
        q = lib.encoder.embed_images([Image.open(photos / "p3.jpg")]).max(axis=1)[0:1]
        ids, _ = lib.vectors.search(q / np.linalg.norm(q), k=100)
        assert known[str(photos / "p2.jpg")].id not in ids[0]
        assert lib.status().deleted == 1
    _check_consistent(lib_dir)


def test_a_moved_photo_and_a_copy_keep_its_date_size_and_camera(tiny_itm_dir, tmp_path):
    from datetime import datetime

    photos = tmp_path / "photos"
    photos.mkdir()
    exif = Image.Exif()
    exif[0x0132], exif[0x010F], exif[0x0110] = "2022:08:15 10:11:12", "Canon", "EOS R5"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(photos / "a.jpg", exif=exif.tobytes())
    _photo(photos / "b.jpg", 4)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    expected = (72, 40, datetime(2022, 8, 15, 10, 11, 12), "Canon", "EOS R5")
    (photos / "later").mkdir()
    os.rename(photos / "a.jpg", photos / "later" / "renamed.jpg")
    with Library.open(lib_dir) as lib:
        assert lib.index([photos]).reused == 1
        assert lib.metadata.get_by_paths([str(photos / "later" / "renamed.jpg")])[str(photos / "later" / "renamed.jpg")].taken_at == expected[2]
    shutil.copy(photos / "later" / "renamed.jpg", photos / "copy.jpg")
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert (r.reused, r.indexed) == (1, 0)
        got = lib.metadata.get_by_paths([str(photos / "later" / "renamed.jpg"), str(photos / "copy.jpg")])
        for rec in got.values():
            assert (rec.width, rec.height, rec.taken_at, rec.camera_make, rec.camera_model) == expected, rec.path
        after = lib.search("anything", k=10, after=datetime(2020, 1, 1), rerank=False)
        assert {h.path for h in after.hits} == set(got)
    _check_consistent(lib_dir)


def test_an_unreadable_folder_keeps_its_photos(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """A folder that cannot be listed (permissions, a drive gone for a moment) is a failure with a reason;
    the photos indexed under it are not marked deleted (they would leave search and be re-embedded)."""
    from blip2_search.indexing import scan as scan_module

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    blocked = str(photos / "sub dir")
    real_scandir = os.scandir

    def scandir(path):
        if os.path.normpath(path) == blocked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(scan_module.os, "scandir", scandir)
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert (r.deleted, r.failed, r.unchanged) == (0, 1, 6)
        assert [(f.path, "Permission denied" in f.error) for f in lib.failures()] == [(blocked, True)]
        assert r.notes == (f"folder {blocked!r} cannot be read (Permission denied); the photos indexed under it are kept as "
                           "they were; fix its permissions (or reconnect the drive) and index again",)  # as docs/cli.md says
        assert lib.status().indexed == 7
    monkeypatch.setattr(scan_module.os, "scandir", real_scandir)
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        # nothing re-embedded; the folder's failure record is retired, and no photo was deleted
        assert (r.indexed, r.unchanged, r.deleted) == (0, 7, 0) and lib.failures() == []
        assert (lib.status().deleted, lib.status().failed) == (0, 0) and blocked not in lib.metadata.known_files()
    _check_consistent(lib_dir)


def test_failure_records_of_files_gone_are_dropped_not_counted_as_deleted_photos(tiny_itm_dir, photos, tmp_path):
    """Removing two broken files gave "deleted 2", status.deleted 2 and later "forgot 2 deleted photos": a failure
    record is no photo. It is dropped when its file goes (by an index run or by prune --missing), uncounted."""
    (photos / "broken 1.jpg").write_bytes(b"not a jpeg")
    (photos / "broken 2.jpg").write_bytes(b"nor this")
    other = tmp_path / "other"
    other.mkdir()
    (other / "bad.jpg").write_bytes(b"nor that")
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        assert (lib.index([photos]).failed, lib.index([other]).failed) == (2, 1)
        for gone in (photos / "broken 1.jpg", photos / "broken 2.jpg", photos / "p0.jpg"):
            gone.unlink()
        r = lib.index([photos])
        assert (r.deleted, r.failed) == (1, 0)  # the photo
        assert [os.path.basename(f.path) for f in lib.failures()] == ["bad.jpg"]
        assert (lib.status().deleted, lib.status().failed) == (1, 1)
        assert not {str(photos / "broken 1.jpg"), str(photos / "broken 2.jpg")} & set(lib.metadata.known_files())
        (other / "bad.jpg").unlink()
        (photos / "p1.jpg").unlink()  # a photo gone since its folder's last run
        pruned = lib.prune(missing=True)
        assert (pruned.missing, pruned.images, pruned.embeddings) == (1, 2, 2)  # p1 found missing; p0 and p1 forgotten
        assert lib.failures() == [] and (lib.status().deleted, lib.status().failed, lib.status().indexed) == (0, 0, 5)
    _check_consistent(lib_dir)


def test_a_photo_whose_reindex_failed_then_deleted_is_kept_as_a_deleted_photo(tiny_itm_dir, photos, tmp_path):
    """A photo indexed once, then cut short on disk (its re-index a failure), then deleted: its record was dropped
    with its vectors, as if it had never been a photo. It is a deleted photo like any other: kept (vectors too) until
    `prune`, and the original bytes coming back reuse its vectors and record."""
    photo = photos / "p0.jpg"
    original = photo.read_bytes()
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        before = lib.metadata.get_by_paths([str(photo)])[str(photo)]
        photo.write_bytes(original[: len(original) // 2])
        assert lib.index([photos]).failed == 1
        photo.unlink()
        r = lib.index([photos])
        assert (r.deleted, r.failed) == (1, 0)
        after = lib.metadata.get_by_paths([str(photo)])[str(photo)]
        assert (after.id, after.status, after.content_hash) == (before.id, "deleted", before.content_hash)
        assert (lib.status().deleted, lib.status().failed, lib.failures()) == (1, 0, [])
        photo.write_bytes(original)
        r = lib.index([photos])
        assert (r.reused, r.indexed) == (1, 0)  # its vectors were kept
        assert lib.metadata.get_by_paths([str(photo)])[str(photo)].id == before.id
        photo.unlink()
        lib.index([photos])
        assert (lib.prune().images, lib.status().deleted) == (1, 0)
    _check_consistent(lib_dir)


def test_renaming_the_indexed_folder_moves_its_records(tiny_itm_dir, photos, tmp_path):
    """Indexing a renamed top folder: each photo keeps its record under the new path (no second copy of
    every photo pointing at files that no longer exist)."""
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        before = {Path(p).relative_to(photos): k.id for p, k in lib.metadata.known_files().items()}
    renamed = photos.with_name("photos renamed")
    os.rename(photos, renamed)
    with Library.open(lib_dir) as lib:
        r = lib.index([renamed])
        assert (r.reused, r.indexed) == (7, 0)
        live = {p: k for p, k in lib.metadata.known_files().items() if k.status == "indexed"}
        assert {Path(p).relative_to(renamed): k.id for p, k in live.items()} == before
        assert lib.status().indexed == 7 and len(lib.search("red", 20, rerank=False).hits) == 7
    _check_consistent(lib_dir)


def test_a_restored_photo_reuses_its_vectors_and_details(tiny_itm_dir, photos, tmp_path):
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        before = lib.metadata.get_by_paths([str(photos / "p0.jpg")])[str(photos / "p0.jpg")]
    shutil.move(photos / "p0.jpg", tmp_path / "p0.jpg")
    with Library.open(lib_dir) as lib:
        assert lib.index([photos]).deleted == 1
    shutil.move(tmp_path / "p0.jpg", photos / "p0.jpg")
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert (r.reused, r.indexed) == (1, 0)  # its vectors were still stored: no second embedding
        after = lib.metadata.get_by_paths([str(photos / "p0.jpg")])[str(photos / "p0.jpg")]
        assert (after.id, after.status, after.width, after.height) == (before.id, "indexed", before.width, before.height)
        assert lib.status().indexed == 7
    _check_consistent(lib_dir)


def _exif_photo(path: Path, seed: int = 3) -> Path:
    """A JPEG with a date and a camera in its EXIF."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS R5"
    exif.get_ifd(0x8769)[0x9003] = "2022:08:15 10:11:12"  # DateTimeOriginal, in the Exif IFD
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("how", ["unreadable", "truncated", "appended"])
def test_a_photo_restored_after_a_failure_or_other_bytes_keeps_its_details_and_caption(tiny_itm_dir, tiny_captioner_dir, tmp_path, monkeypatch, how):
    """A photo unreadable for a while (permissions), or whose file was replaced by a cut copy or by other bytes,
    then restored: its content's vectors are reused, and its record got NULL size, date, camera and caption
    (user review: data loss that --rehash did not repair). Its own record (unreadable, truncated) or its header
    (appended: no record holds that content any more) gives the details; the caption is kept, or written again."""
    from blip2_search.indexing import read

    photo = _exif_photo(tmp_path / "photos" / "a.jpg")
    _photo(tmp_path / "photos" / "b.jpg", 4)
    original = photo.read_bytes()
    lib_dir = tmp_path / "lib"

    def record(lib):
        return lib.metadata.get_by_paths([str(photo)])[str(photo)]

    def details(rec):
        return rec.width, rec.height, rec.taken_at, rec.camera_make, rec.camera_model

    with Library.open(lib_dir, model=str(tiny_itm_dir), captioner=str(tiny_captioner_dir), create=True, batch_size=3, workers=2) as lib:
        lib.index([tmp_path / "photos"])
        before = record(lib)
    assert details(before)[2:] == (datetime(2022, 8, 15, 10, 11, 12), "Canon", "EOS R5") and before.caption is not None
    with monkeypatch.context() as patched, Library.open(lib_dir) as lib:
        if how == "unreadable":  # root reads chmod-000 files, so refuse the read as the OS would
            os.utime(photo, ns=(time.time_ns(), photo.stat().st_mtime_ns + 10**9))  # and a touch, so that the run reads it
            real_open = open
            patched.setattr(read, "open", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path)))
                            if str(path) == str(photo) else real_open(path, *a, **k), raising=False)
        elif how == "truncated":
            photo.write_bytes(original[: len(original) // 2])
        else:
            photo.write_bytes(original + b"\0")  # still a good JPEG: embedded as new content
        r = lib.index([tmp_path / "photos"])
        assert (r.failed, r.indexed) == ((0, 1) if how == "appended" else (1, 0))
    photo.write_bytes(original)
    with Library.open(lib_dir) as lib:
        r = lib.index([tmp_path / "photos"])
        assert (r.reused, r.indexed, r.failed) == (1, 0, 0)
        after = record(lib)
        assert (after.id, after.status, after.content_hash) == (before.id, "indexed", before.content_hash)
        assert details(after) == details(before)
        assert (after.caption, after.caption_model) == (before.caption, before.caption_model)
        # a caption for this content was still known (the record's own) except after other bytes replaced it there
        assert ("captioned 1 photo indexed without captions" in r.notes) == (how == "appended"), r.notes
        assert lib.status().captioned == 2
    _check_consistent(lib_dir)


def test_rehash_repairs_a_record_left_without_its_details(tiny_itm_dir, tmp_path):
    """Records that an earlier version left without size, date and camera (a photo restored after a failure)
    get them back from the file's header on a --rehash run."""
    from sqlalchemy import update

    from blip2_search.store.schema import images

    photo = _exif_photo(tmp_path / "photos" / "a.jpg")
    shutil.copy(photo, tmp_path / "photos" / "copy.jpg")
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([tmp_path / "photos"])
        want = lib.metadata.get_by_paths([str(photo)])[str(photo)]
        with lib.metadata._engine.begin() as connection:
            connection.execute(update(images).values(width=None, height=None, taken_at=None, camera_make=None, camera_model=None))
        assert lib.index([tmp_path / "photos"], rehash=True).reused == 2
        for rec in lib.metadata.get_by_paths([str(photo), str(tmp_path / "photos" / "copy.jpg")]).values():
            assert (rec.width, rec.height, rec.taken_at, rec.camera_make, rec.camera_model) == (
                want.width, want.height, want.taken_at, want.camera_make, want.camera_model) == (72, 40, datetime(2022, 8, 15, 10, 11, 12), "Canon", "EOS R5")
    _check_consistent(lib_dir)


def test_failures_follow_a_folder_indexed_under_another_name(tiny_itm_dir, photos, tmp_path):
    """A failed file seen through a symlinked alias (and back) is one failure, not one per name, and a fix
    seen under either name clears it."""
    lib_dir = tmp_path / "lib"
    alias = tmp_path / "alias"
    alias.symlink_to(photos, target_is_directory=True)
    (photos / "sub dir" / "empty.png").write_bytes(b"")
    elsewhere = tmp_path / "other"  # a failure outside the alias's folder is left alone
    elsewhere.mkdir()
    (elsewhere / "bad.jpg").write_bytes(b"not a jpeg")
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos, elsewhere])
        assert [Path(f.path).name for f in lib.failures()] == ["bad.jpg", "empty.png"]
        lib.index([alias])
        failures = lib.failures()
        assert sorted(f.path for f in failures) == sorted([str(elsewhere / "bad.jpg"), str(alias / "sub dir" / "empty.png")])
        assert lib.status().failed == 2
        _photo(photos / "sub dir" / "empty.png", 5)  # fixed; then indexed under the folder's real name
        r = lib.index([photos])
        assert [f.path for f in lib.failures()] == [str(elsewhere / "bad.jpg")] and r.deleted == 0
        assert lib.status().indexed == 8 and lib.status().failed == 1
        album = tmp_path / "album"  # a link in an album to the broken photo elsewhere is a copy of it
        album.mkdir()
        (album / "bad.jpg").symlink_to(elsewhere / "bad.jpg")
        for _ in range(2):  # and stays so, run after run, whichever folder is indexed
            lib.index([album])
            lib.index([elsewhere])
            assert sorted(f.path for f in lib.failures()) == sorted([str(elsewhere / "bad.jpg"), str(album / "bad.jpg")])
    _check_consistent(lib_dir)


def test_a_photo_unreadable_under_an_alias_then_read_under_the_real_name_keeps_its_record(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """Its failure record (which keeps its content) is the photo moved to the real name, not a failure to retire."""
    from blip2_search.indexing import read

    lib_dir, alias = tmp_path / "lib", tmp_path / "alias"
    alias.symlink_to(photos, target_is_directory=True)
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([alias])
        before = lib.metadata.get_by_paths([str(alias / "p0.jpg")])[str(alias / "p0.jpg")]
        os.utime(photos / "p0.jpg", ns=(time.time_ns(), (photos / "p0.jpg").stat().st_mtime_ns + 10**9))
        real_open = open
        with monkeypatch.context() as patched:
            patched.setattr(read, "open", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path)))
                            if os.path.basename(str(path)) == "p0.jpg" else real_open(path, *a, **k), raising=False)
            assert lib.index([alias]).failed == 1
        r = lib.index([photos])
        assert (r.reused, r.indexed, r.deleted, r.failed) == (7, 0, 0, 0)
        after = lib.metadata.get_by_paths([str(photos / "p0.jpg")])[str(photos / "p0.jpg")]
        assert (after.id, after.status, after.width) == (before.id, "indexed", before.width)
        assert lib.status().indexed == 7 and lib.failures() == []
    _check_consistent(lib_dir)


def test_a_folder_indexed_under_another_name_moves_its_records(tiny_itm_dir, photos, tmp_path):
    lib_dir = tmp_path / "lib"
    alias = tmp_path / "alias"
    alias.symlink_to(photos, target_is_directory=True)
    (photos / "link.jpg").symlink_to(photos / "p1.jpg")  # a file symlink inside: its own record, every run
    with _open(lib_dir, tiny_itm_dir) as lib:
        r = lib.index([photos])
        assert (r.indexed, r.reused) == (7, 1)  # the link is a copy of p1.jpg, found in the same run
        ids = {Path(p).name: k.id for p, k in lib.metadata.known_files().items()}
    with Library.open(lib_dir) as lib:
        r = lib.index([alias])  # the same files through a symlinked alias: moves, not copies
        assert (r.scanned, r.indexed, r.reused, r.deleted) == (8, 0, 8, 0)
        known = lib.metadata.known_files()
        assert all(p.startswith(str(alias) + os.sep) for p in known) and len(known) == 8
        assert {Path(p).name: k.id for p, k in known.items()} == ids
        assert lib.status().indexed == 8
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert (r.indexed, r.reused, r.deleted) == (0, 8, 0)
        r = lib.index([photos])
        assert (r.unchanged, r.reused) == (8, 0)
    _check_consistent(lib_dir)


def test_an_album_of_symlinks_to_photos_indexed_elsewhere_keeps_the_originals(tiny_itm_dir, tmp_path):
    originals, albums = tmp_path / "originals", tmp_path / "albums"
    for i in range(3):
        _photo(originals / "2023" / f"o{i}.jpg", 40 + i)
    _photo(originals / "other.jpg", 50)
    albums.mkdir()
    (albums / "best-of-2023").symlink_to(originals / "2023", target_is_directory=True)
    (albums / "fav.jpg").symlink_to(originals / "other.jpg")
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([originals])
        r = lib.index([albums])  # copies of photos that are still where they were: both kept
        assert (r.reused, r.deleted) == (4, 0)
        known = lib.metadata.known_files()
        assert len(known) == 8 and all(k.status == "indexed" for k in known.values())
        assert len(lib.search("a photo", k=20, rerank=False, path=str(originals / "*")).hits) == 4
        r = lib.index([originals])  # stable: nothing moves back and forth
        assert (r.unchanged, r.reused, r.deleted) == (4, 0, 0)
    _check_consistent(lib_dir)


def test_a_long_lived_library_indexes_after_another_process_did(tiny_itm_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(2):
        _photo(a / f"a{i}.jpg", 60 + i)
        _photo(b / f"b{i}.jpg", 70 + i)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as kept:
        kept.index([a])
        assert len(kept.search("a photo", k=10, rerank=False).hits) == 2  # its vectors are loaded
        with Library.open(lib_dir) as other:  # another process adds b
            other.index([b])
        for path in b.iterdir():  # touched: same bytes, so not embedded again
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        kept.index([a, b])
        assert len(kept.search("a photo", k=10, rerank=False).hits) == 4
    _check_consistent(lib_dir)


def test_prune_forgets_deleted_photos_and_shrinks_the_library(tiny_itm_dir, photos, tmp_path):
    lib_dir = tmp_path / "lib"
    shutil.copy(photos / "p1.jpg", photos / "dup.jpg")
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        assert lib.metadata.counts().embeddings == 7  # 8 files, one content twice
    shutil.move(photos / "p0.jpg", tmp_path / "p0.jpg")
    (photos / "dup.jpg").unlink()
    with Library.open(lib_dir) as lib:
        assert lib.index([photos]).deleted == 2
        q = lib.encoder.num_query_tokens
        recent = lib.prune(older_than_days=1)
        assert (recent.images, recent.embeddings) == (0, 0)
        with pytest.raises(InvalidInputError, match="negative"):
            lib.prune(older_than_days=-1)
    result = CliRunner().invoke(main, ["prune", "--library", str(lib_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    # both records go; p0's vectors go, dup's stay (the live p1 shares them); `vectors` in status's unit
    assert (report["images"], report["embeddings"], report["vectors"], report["vit_files"]) == (2, 1, q, 0)
    assert report["bytes_after"] < report["bytes_before"] and report["compacted"]  # 1 of 7 vectors' pages: over 10%
    with Library.open(lib_dir) as lib:
        counts = lib.metadata.counts()
        assert (counts.deleted, counts.indexed, counts.embeddings) == (0, 6, 6)
        with lib.metadata._engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA freelist_count").scalar() == 0
    shutil.move(tmp_path / "p0.jpg", photos / "p0.jpg")
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert (r.indexed, r.reused) == (1, 0)  # forgotten: embedded again
    _check_consistent(lib_dir)
    result = CliRunner().invoke(main, ["prune", "--library", str(lib_dir)])
    assert result.exit_code == 0 and result.output.startswith("forgot 0 deleted photos, 0 embeddings (0 vectors) and 0 ViT"), result.output
    assert "(not compacted: too little of it is free; indexing reuses that space)" in result.output
    with _open(tmp_path / "never-indexed", tiny_itm_dir) as empty:  # nothing embedded, nothing to prune
        assert empty.prune().images == 0


def test_prune_missing_forgets_photos_of_a_drive_gone_for_good(tiny_itm_dir, photos, tmp_path):
    """Photos under a folder that no longer exists cannot be marked deleted by an index run (the folder
    is refused): `prune --missing` forgets them, and searches stop returning them."""
    drive = tmp_path / "usb"
    for i in range(3):
        _photo(drive / f"u{i}.jpg", 80 + i)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos, drive])
        assert len(lib.search("a photo", 20, rerank=False).hits) == 10
    server = Library.open(lib_dir)  # a server with the index loaded
    try:
        assert len(server.search("a photo", 20, rerank=False).hits) == 10
        shutil.rmtree(drive)
        result = CliRunner().invoke(main, ["prune", "--library", str(lib_dir), "--missing", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert (report["missing"], report["images"], report["embeddings"]) == (3, 3, 3)
        hits = server.search("a photo", 20, rerank=False).hits  # it reloads the saved index
        assert len(hits) == 7 and not any("usb" in h.path for h in hits)
    finally:
        server.close()
    with Library.open(lib_dir) as lib:
        assert lib.metadata.counts().indexed == 7 and lib.prune(missing=True).missing == 0
        assert lib.index([photos]).unchanged == 7
    _check_consistent(lib_dir)


def _library_with_drives(tmp_path: Path, model_dir, photos: Path, *names: str, seed: int) -> tuple[Path, list[Path]]:
    """A library (`tmp_path/lib`) of `photos` and of three photos in each folder `names` under `tmp_path` (drives)."""
    drives = [tmp_path / name for name in names]
    for n, drive in enumerate(drives):
        for i in range(3):
            _photo(drive / f"{drive.name[0]}{i}.jpg", seed + 10 * n + i)
    with _open(tmp_path / "lib", model_dir) as lib:
        lib.index([photos, *drives])
    return tmp_path / "lib", drives


def test_prune_missing_under_a_folder_keeps_the_photos_of_other_unplugged_drives(tiny_itm_dir, photos, tmp_path):
    """A dead drive's photos are forgotten; those of another drive that is only unplugged stay."""
    lib_dir, (dead, unplugged) = _library_with_drives(tmp_path, tiny_itm_dir, photos, "dead", "unplugged", seed=60)
    shutil.rmtree(dead)
    unplugged.rename(tmp_path / "in-a-drawer")
    res = CliRunner().invoke(main, ["index", str(dead), "--library", str(lib_dir)])  # the message names the precise fix
    assert res.exit_code == 2 and f"forget them with `prune --missing-under {dead}`" in res.output, res.output
    res = CliRunner().invoke(main, ["prune", "--library", str(lib_dir), "--missing-under", str(dead), "--json"])
    assert res.exit_code == 0 and (json.loads(res.stdout)["missing"], json.loads(res.stdout)["images"]) == (3, 3), res.output
    with Library.open(lib_dir) as lib:
        assert lib.metadata.photos_under(str(unplugged)) == 3 and lib.metadata.photos_under(str(dead)) == 0
        with pytest.raises(InvalidInputError, match="missing=5 is not True or a folder"):
            lib.prune(missing=5)
    res = CliRunner().invoke(main, ["prune", "--library", str(lib_dir), "--missing", "--missing-under", str(dead)])
    assert res.exit_code == 2 and "contradict" in res.output
    # a mistyped folder matched nothing: it said only "marked 0 photos deleted", as if no photo there were missing
    typo = tmp_path / "unpluged"
    res = CliRunner().invoke(main, ["prune", "--library", str(lib_dir), "--missing-under", str(typo), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["notes"] == [
        f"the library has no photos recorded under {typo}; check the folder (a relative one is taken from the current folder)"], res.output
    _check_consistent(lib_dir)


def test_rehash_finds_content_replaced_under_the_same_size_and_time(tiny_itm_dir, photos, tmp_path):
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    target = photos / "p3.jpg"
    st = target.stat()
    other = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(other, "JPEG")
    data = other.getvalue()
    assert len(data) < st.st_size
    target.write_bytes(data + b"\0" * (st.st_size - len(data)))  # same size; JPEG readers stop at the end marker
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with Library.open(lib_dir) as lib:
        assert lib.index([photos]).unchanged == 7  # the documented (size, mtime) rule cannot see it
        r = lib.index([photos], rehash=True)
        assert (r.indexed, r.reused, r.unchanged) == (1, 6, 0)
        digest = lib.metadata.get_by_paths([str(target)])[str(target)].content_hash
        assert digest == hashlib.blake2b(target.read_bytes(), digest_size=20).hexdigest()
    _check_consistent(lib_dir)


def test_a_server_beside_a_running_prune_returns_k_indexed_photos(tiny_itm_dir, photos, tmp_path):
    """While another process's run holds the library and has not saved the vector index, a server keeps its loaded
    index: photos that run forgot were dropped from the results without refilling them (3 asked, 1 returned; an
    empty answer said the library had nothing searchable), and photos it marked deleted were still returned."""
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
    server = Library.open(lib_dir)
    other = Library.open(lib_dir)
    try:
        top = [h.id for h in server.search("a red circle", 3, rerank=False, fusion=False).hits]
        query_image = photos / "p5.jpg"
        with other._lock():  # a prune or index run in another process, mid-way
            other.metadata.mark_deleted(top[:1])
            deleted_only = [h.id for h in server.search("a red circle", 3, rerank=False, fusion=False).hits]
            assert len(deleted_only) == 3 and top[0] not in deleted_only
            other.metadata.mark_deleted(top[1:2])
            other.metadata.forget_deleted()
            for result in (server.search("a red circle", 3, rerank=False, fusion=False), server.search("a red circle", 3, rerank=False),
                           server.similar(query_image, 3)):
                ids = [h.id for h in result.hits]
                assert len(ids) == 3 and not set(ids) & set(top[:2]), ids
            assert len(server.search("a red circle", 5, rerank=False, fusion=False).hits) == 5  # 7 photos, 2 gone
    finally:
        server.close()
        other.close()


def test_prune_rewrites_the_vector_index_without_the_rows_of_removed_photos(tiny_itm_dir, photos, tmp_path):
    """Index runs leave a removed photo's row in the data file (up to a quarter of it); prune, which is run to free
    space, rewrites the file without them, and does nothing to a file that has none."""
    from blip2_search.store.index_files import read_sidecar

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
    (photos / "p0.jpg").unlink()
    with Library.open(lib_dir) as lib:
        assert lib.index([photos]).deleted == 1
    params = read_sidecar(lib_dir / "vectors.faiss").params
    assert params["rows"] == 7 and int((np.fromfile(lib_dir / params["ids"], dtype=np.int64) < 0).sum()) == 1
    with Library.open(lib_dir) as lib:
        lib.prune()
    after = read_sidecar(lib_dir / "vectors.faiss").params
    assert after["rows"] == 6 and after["data"] != params["data"] and (lib_dir / after["data"]).stat().st_size == 6 * 32 * 256 * 4
    with Library.open(lib_dir) as lib:
        lib.prune()
    assert read_sidecar(lib_dir / "vectors.faiss").params == after  # nothing to rewrite: not even saved
    _check_consistent(lib_dir)


def test_a_server_beside_a_running_index_scores_a_changed_photo_by_its_new_content(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """A photo whose file a running `index` changed (same path and id) kept its old content's score and rank until
    that run saved the vector index (stress test: itc -0.079 returned where the database's vectors give 0.485)."""
    from blip2_search.search import engine as engine_module
    from blip2_search.store import CaptionUpdate, IndexedImage
    from blip2_search.store.scoring import mean_max

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
    server, other = Library.open(lib_dir), Library.open(lib_dir)
    try:
        top = server.search("a red circle", 7, rerank=False, fusion=False).hits[0]
        with other._lock():  # the run embedded the photo's new content and committed it; its index save is to come
            with Image.open(photos / "p5.jpg") as repainted:
                new_vectors = other.encoder.embed_images([repainted.convert("RGB")])[0]
            other.metadata.upsert_indexed([IndexedImage(top.path, 1, 1, "repainted", vectors=new_vectors)])
            emb = server.encoder.embed_texts(["a red circle"])[0]
            got = server.search("a red circle", 7, rerank=False, fusion=False).hits
            fresh = server.metadata.vectors_for([h.id for h in got])
            np.testing.assert_allclose([h.itc for h in got], (fresh @ emb).max(axis=1), atol=1e-5)
            assert [h.itc for h in got] == sorted((h.itc for h in got), reverse=True) and len(got) == 7
            assert next(h.itc for h in got if h.id == top.id) < top.itc - 1e-3  # scored by its new content
            with Image.open(photos / "p1.jpg") as query_image:
                query = server.encoder.embed_images([query_image.convert("RGB")])[0]
            similar = server.similar(photos / "p1.jpg", 7).hits
            fresh = server.metadata.vectors_for([h.id for h in similar])
            np.testing.assert_allclose([h.score for h in similar], mean_max(query, fresh), atol=1e-5)
            # rerank by id, and a photo found through its caption only, are scored from the database too (review:
            # both took the loaded index's vectors, the old content's)
            database_itc = float((server.metadata.vectors_for([top.id])[0] @ emb).max())
            assert server.rerank("a red circle", [top.id]).hits[0].itc == pytest.approx(database_itc, abs=1e-5)
            text = next(t for t in ("a zebra", "a green tree", "two boats", "a cat", "a red car", "snow", "a dog", "night", "a house")
                        if top.id not in {h.id for h in server.search(t, 1, rerank=False, fusion=False).hits})  # caption only
            caption = server.encoder.embed_texts([text])[0]
            other.metadata.set_captions([CaptionUpdate(top.id, text, "test", caption)])
            monkeypatch.setattr(engine_module, "FUSION_DEPTH", 2)
            monkeypatch.setattr(engine_module, "CAPTION_WEIGHT", 2.0)  # its two caption lists outrank the first stage's one
            server._engine = None  # its captions reload (a captioning run tells servers so)
            found = server.search(text, 1, rerank=False).hits[0]
            assert found.id == top.id  # through its caption only
            assert found.itc == pytest.approx(float((server.metadata.vectors_for([top.id])[0] @ caption).max()), abs=1e-5)
    finally:
        server.close()
        other.close()


def test_a_server_serving_a_save_too_far_behind_to_bring_up_to_date_waits_for_the_next_save(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """Beside a running `index` that changed more photos since its last save than it pays to read (a GPU run), a
    server serves that save as it is: it reopens it once the run saves again or ends, not at every follow (each
    reopen read the same file again: ~5 s at 100k photos); once the run has ended it is brought up to date."""
    import blip2_search.library.vector_index as library_module
    from blip2_search.store import IndexedImage

    rebuild_module = importlib.import_module("blip2_search.store.rebuild")
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
    monkeypatch.setattr(library_module, "FOLLOW_S", 0.0)
    monkeypatch.setattr(rebuild_module, "BESIDE_CATCH_UP_MIN", 0)
    opened = []
    real_open = Library._open_vectors
    monkeypatch.setattr(Library, "_open_vectors", lambda self, **kw: opened.append(kw) or real_open(self, **kw))
    rng = np.random.default_rng(8)
    writer = os.open(lib_dir / "index.lock", os.O_RDWR)
    fcntl.flock(writer, fcntl.LOCK_EX)  # a run goes on, committing without saving yet
    try:
        with Library.open(lib_dir) as server:
            server.search("a red circle", 3, rerank=False, fusion=False)
            saved = server._vectors_generation
            for i in range(3):
                server.metadata.upsert_indexed([IndexedImage(str(tmp_path / f"new{i}.jpg"), 1, 1, f"new{i}", vectors=_unit_vectors(rng))])
                found = {h.id for h in server.search("a red circle", 20, rerank=False, fusion=False).hits}
            assert len(opened) == 1 and server._vectors_generation == saved < server.metadata.vectors_generation()
            os.close(writer)  # the run ends (killed before saving): brought up to date from the journal
            writer = None
            found = {h.id for h in server.search("a red circle", 20, rerank=False, fusion=False).hits}
            assert len(opened) == 2 and server._vectors_generation == server.metadata.vectors_generation()
            assert len(found) == 7 + 3
    finally:
        if writer is not None:
            os.close(writer)


def _unit_vectors(rng) -> np.ndarray:
    x = rng.standard_normal((32, 256)).astype(np.float32)  # the tiny embedder's shape
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _indexed_and_more(model_dir, photos, tmp_path, n, seed):
    """A library of `photos` (exact index) and a folder of `n` more photos to index next: `(library, folder)`."""
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, model_dir, vector_index="exact") as lib:
        lib.index([photos])
    more = tmp_path / "more"
    for i in range(n):
        _photo(more / f"m{i}.jpg", seed + i)
    return lib_dir, more


def test_a_search_in_another_thread_never_reads_the_vector_index_while_the_run_changes_it(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """One Library may serve searches beside its own `index` run in another thread (README): FAISS's storage moves
    under a reader as vectors are added (the search's view of it pointed at freed memory), so the two take turns."""
    import threading

    from blip2_search.store import FaissVectorStore

    lib_dir, more = _indexed_and_more(tiny_itm_dir, photos, tmp_path, 12, 400)
    changing, overlaps = threading.Event(), []
    real_add, real_stored = FaissVectorStore.add, FaissVectorStore._stored

    def slow_add(self, ids, vectors):
        changing.set()
        time.sleep(0.05)
        try:
            return real_add(self, ids, vectors)
        finally:
            changing.clear()

    def watched_stored(self):
        overlaps.append(changing.is_set())
        return real_stored(self)

    monkeypatch.setattr(FaissVectorStore, "add", slow_add)
    monkeypatch.setattr(FaissVectorStore, "_stored", watched_stored)
    with Library.open(lib_dir, batch_size=2, workers=1) as lib:
        lib.search("a red circle", 3, rerank=False, fusion=False)  # the vectors loaded: the run changes that store
        run = threading.Thread(target=lambda: lib.index([more]))
        run.start()
        while run.is_alive():
            hits = lib.search("a red circle", 20, rerank=False, fusion=False).hits
            assert len(hits) >= 7
        run.join()
        assert len(overlaps) > 5 and not any(overlaps), overlaps
    _check_consistent(lib_dir)


def test_duplicates_beside_a_running_index_come_from_the_database(tiny_itm_dir, tmp_path):
    """A reader beside a running `index` uses that run's last save, which may hold photos since deleted or repainted:
    `duplicates` listed a deleted copy, and a repainted one as an exact duplicate of its old twin (review)."""
    photos = tmp_path / "photos"
    for i in range(6):
        _photo(photos / f"p{i}.jpg", i)
    shutil.copy(photos / "p0.jpg", photos / "d0.jpg")
    shutil.copy(photos / "p1.jpg", photos / "d1.jpg")
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
    saved = {f.name: f.read_bytes() for f in lib_dir.iterdir() if f.name.startswith("vectors.")}
    (photos / "d0.jpg").unlink()
    _photo(photos / "d1.jpg", 77)  # repainted in place
    with Library.open(lib_dir) as lib:
        lib.index([photos])
        expected = [[(p.path, round(p.score, 5)) for p in group] for group in lib.duplicates(0.9999)]
    for f in lib_dir.iterdir():
        if f.name.startswith("vectors."):
            f.unlink()
    for name, data in saved.items():  # the running run's last save, from before those changes
        (lib_dir / name).write_bytes(data)
    writer = os.open(lib_dir / "index.lock", os.O_RDWR)
    fcntl.flock(writer, fcntl.LOCK_EX)  # the run goes on
    try:
        with Library.open(lib_dir) as reader:
            groups = reader.duplicates(0.9999)
            assert reader._vectors_generation < reader.metadata.vectors_generation()  # it did load the save behind
            assert [[(p.path, round(p.score, 5)) for p in group] for group in groups] == expected
            assert not any(p.path.endswith(("d0.jpg", "d1.jpg")) for group in groups for p in group)
    finally:
        os.close(writer)


def test_a_long_index_run_saves_the_vector_index_as_it_goes_and_readers_beside_it_follow(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """An index run saved the vector index only at its end: a server beside a long run (hours for a large library)
    found none of its photos until then, and each process started meanwhile rebuilt the index from the database
    (37 s at 100k photos). The run now saves as it goes (every CHECKPOINT_S, here every batch); a server reopens it
    (at most every FOLLOW_S), a process started meanwhile opens it, both brought up to date from the change journal."""
    import blip2_search.library.vector_index as library_module
    rebuild_module = importlib.import_module("blip2_search.store.rebuild")  # the package exports its function
    from blip2_search.indexing import pipeline
    from blip2_search.store.index_files import saved_generation

    lib_dir, more = _indexed_and_more(tiny_itm_dir, photos, tmp_path, 9, 200)
    monkeypatch.setattr(pipeline, "CHECKPOINT_S", 0.0)
    monkeypatch.setattr(library_module, "FOLLOW_S", 0.0)
    server = Library.open(lib_dir)
    writer = Library.open(lib_dir, batch_size=3, workers=2)
    seen = []

    def look(progress):
        current = server.metadata.vectors_generation()
        hits = {h.id for h in server.search("a red circle", 20, rerank=False, fusion=False).hits}
        with Library.open(lib_dir) as fresh, monkeypatch.context() as no_rebuild:
            no_rebuild.setattr(rebuild_module, "rebuild", lambda *a, **k: pytest.fail("rebuilt from the database"))
            fresh_hits = {h.id for h in fresh.search("a red circle", 20, rerank=False, fusion=False).hits}
            fresh_generation = fresh._vectors_generation
        indexed = {k.id for k in server.metadata.known_files().values() if k.status == "indexed"}
        seen.append((current, saved_generation(lib_dir / "vectors.faiss"), hits, indexed, fresh_hits, fresh_generation))

    try:
        before = {h.id for h in server.search("a red circle", 20, rerank=False, fusion=False).hits}
        assert len(before) == 7
        assert writer.index([more], progress=look).indexed == 9
        for current, saved, hits, indexed, fresh_hits, fresh_generation in seen:
            assert hits <= indexed and fresh_hits <= indexed and before <= hits
            assert saved <= current == fresh_generation  # the run's last save, brought up to date: not rebuilt
        partly = [hits - before for _, _, hits, indexed, _, _ in seen if len(indexed) < 16]
        assert any(0 < len(new) < 9 for new in partly), seen  # the run's photos while it went on
        assert any(fresh_hits - before for _, _, _, indexed, fresh_hits, _ in seen if len(indexed) < 16)
    finally:
        server.close()
        writer.close()
    _check_consistent(lib_dir)


def test_a_checkpoint_that_found_damaged_rows_leaves_the_saving_to_the_end_of_the_run(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """A save that reads damaged rows back makes the library drop its store (the file is rebuilt later). A later
    checkpoint then opened a store again, rebuilt from the database, which the run's later batches never reached,
    and saved it at the database's generation: photos missing from a file that passes as current."""
    from blip2_search.errors import CorruptIndexError
    from blip2_search.indexing import pipeline
    from blip2_search.store.vectors import FaissVectorStore

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
    for i in range(9):
        _photo(tmp_path / "more" / f"m{i}.jpg", 300 + i)
    monkeypatch.setattr(pipeline, "CHECKPOINT_S", 0.0)
    real_save, saves = FaissVectorStore.save, []

    def damaged_once(self, *args, **kwargs):
        saves.append(1)
        if len(saves) == 1:
            raise CorruptIndexError("vector index rows are damaged")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(FaissVectorStore, "save", damaged_once)
    with Library.open(lib_dir, batch_size=3, workers=2) as lib:
        assert lib.index([tmp_path / "more"]).indexed == 9
    _check_consistent(lib_dir)


def _library_of_the_older_fingerprint(model_dir, photos, tmp_path):
    """A library indexed with a copy of `model_dir`, its embedder recorded under the older fingerprint (as libraries
    indexed before the new one were): (model copy, library folder, embedder as now recorded, as then recorded)."""
    from blip2_search.models.loading import legacy_fingerprint
    from blip2_search.store import EmbedderInfo, updates

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, model) as lib:
        lib.index([photos])
        new = lib.metadata.info().embedder
        old = EmbedderInfo(ModelRef(new.model.model_id, legacy_fingerprint(model)), new.num_query_tokens, new.dim)
        with lib.metadata._write() as connection:
            updates.write_embedder(connection, old)
    return model, lib_dir, new, old


def test_a_library_of_the_older_fingerprint_adopts_the_new_one_and_still_sees_changed_weights(tiny_itm_dir, photos, tmp_path):
    """Libraries recorded a local model's revision with the older fingerprint: the same files carry on (the library
    records the new fingerprint), other files are refused as before."""
    from safetensors.torch import load_file, save_file

    from blip2_search.store import updates

    model, lib_dir, new, old = _library_of_the_older_fingerprint(tiny_itm_dir, photos, tmp_path)
    with Library.open(lib_dir) as lib:
        assert len(lib.search("a red circle", 3, rerank=False).hits) == 3
        assert lib.metadata.info().embedder == new  # adopted
    with Library.open(lib_dir) as lib:  # an older library again, whose weights are then changed
        with lib.metadata._write() as connection:
            updates.write_embedder(connection, old)
    (weights,) = model.glob("*.safetensors")
    tensors = load_file(weights)
    tensors = {name: (-t if "projection" in name else t) for name, t in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelMismatchError, match=re.escape("re-embed every image (Library.open(FOLDER, reembed=True).index(PHOTO_DIRS)), "
                                                           "or restore the original model files")):
        with Library.open(lib_dir) as lib:
            lib.search("a red circle", 3, rerank=False)


def test_model_mismatch_is_a_clear_error_and_reembed_fixes_it(tiny_itm_dir, photos, tmp_path):
    from tiny_models import make_tiny_itm

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    other = make_tiny_itm(tmp_path / "other", seed=5)
    with pytest.raises(ModelMismatchError, match="; omit model to use the library's, or pass reembed=True to re-embed every image"):
        Library.open(lib_dir, model=str(other))
    server = Library.open(lib_dir)  # long-lived processes, one searching before another one re-embeds, one not
    assert len(server.search("a red circle", 3, rerank=False).hits) == 3
    idle = Library.open(lib_dir)
    _ = idle.encoder
    with Library.open(lib_dir, model=Path(tiny_itm_dir), captioner=Path("none")) as same:  # Paths name models as str do
        assert same.model_name == str(tiny_itm_dir) and same.captioner_name is None and same._forget_captioner
    with Library.open(lib_dir, model=str(other), reembed=True, captioner=False) as lib:
        with pytest.raises(ModelMismatchError, match=rf"vectors come from {re.escape(str(tiny_itm_dir))}.*, not '{re.escape(str(other))}'; run "
                           r"`Library\.index\(PHOTO_DIRS\)` to re-embed them before searching, or open the library without model to"):
            lib.search("a red circle", 3)  # before the index run that re-embeds: says so (not "the files changed revision")
        r = lib.index([photos])
        assert r.indexed == 7 and lib.status().model == str(other) and r.notes == ()
        assert len(lib.search("a red circle", 3).hits) == 3
    for process in (server, idle):
        with pytest.raises(LibraryError, match=rf"library {re.escape(str(lib_dir))} is being re-embedded with {re.escape(str(other))}.* by another "
                           rf"process \(or was\), so its vectors no longer match this process's model '{re.escape(str(tiny_itm_dir))}'; restart"):
            process.search("a red circle", 3, rerank=False)
        process.close()
    res = CliRunner().invoke(main, ["index", str(photos), "--library", str(lib_dir), "--model", str(other), "--reembed"])
    assert res.exit_code == 0 and "unchanged 7" in res.stdout and "nothing to redo" in res.stderr, res.output
    _check_consistent(lib_dir)


def test_resuming_a_stopped_reembed_does_not_say_it_had_nothing_to_redo(tiny_itm_dir, photos, tmp_path):
    """The same `index --reembed` command run again after Ctrl-C or a kill re-embedded the waiting photos, yet noted
    "--reembed had nothing to redo"."""
    from tiny_models import make_tiny_itm

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    other = make_tiny_itm(tmp_path / "other", seed=5)
    with Library.open(lib_dir, model=str(other), reembed=True, captioner=False) as lib:
        lib.metadata.reset_embedder(lib._embedder_info())  # where a stopped run leaves it: every photo pending
    res = CliRunner().invoke(main, ["index", str(photos), "--library", str(lib_dir), "--model", str(other), "--reembed", "--json"])
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and report["indexed"] == 7, res.output
    assert report["notes"] == [f"the library is being re-embedded with {str(other)!r} already: this run resumes it (7 photos were waiting)"]
    _check_consistent(lib_dir)


@pytest.mark.parametrize("kwargs, message", [
    ({"captioner": True}, r"captioner True is not a checkpoint name; pass a hub id, a local folder or 'demo'$"),
    ({"captioner": 5}, "captioner 5 is not a checkpoint name"),
    ({"captioner": ""}, "captioner '' is not a checkpoint name"),
    ({"model": 5}, r"model 5 is not a checkpoint name; pass a hub id, a local folder or 'demo'$"),
    ({"device": "gpu"}, "gpu"),
])
def test_open_refuses_model_captioner_and_device_values_it_cannot_use(tiny_itm_dir, photos, tmp_path, kwargs, message):
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        lib.index([photos])
    with pytest.raises(InvalidInputError, match=message) as caught:
        Library.open(tmp_path / "lib", **kwargs)
    assert "\n" not in str(caught.value)


def test_reembed_covers_every_folder_of_the_library(tiny_itm_dir, photos, tmp_path):
    """`--reembed` on one folder re-embeds the library's other folders too (else they drop out of search);
    photos whose files are missing wait, and the run says so."""
    from tiny_models import make_tiny_itm

    lib_dir, (second, third) = _library_with_drives(tmp_path, tiny_itm_dir, photos, "second", "third", seed=40)
    shutil.move(third, tmp_path / "unplugged")  # a drive that is not connected during the re-embed
    other = make_tiny_itm(tmp_path / "other", seed=5)
    with Library.open(lib_dir, model=str(other), reembed=True, captioner=False) as lib:
        r = lib.index([photos])
        assert r.indexed == 7 + 3 and r.deleted == 0
        assert len(r.notes) == 1 and "3 photos still wait to be embedded" in r.notes[0] and "reconnect" in r.notes[0]
        counts = lib.metadata.counts()
        assert (counts.indexed, counts.pending, lib.status().pending) == (10, 3, 3)
        searched = lib.search("a photo", 20, rerank=False, fusion=False)
        hits = searched.hits
        assert {Path(h.path).parent.name for h in hits} == {"photos", "sub dir", "second"}
        assert searched.notes == ("3 photos of the library wait to be embedded with its model and cannot be found yet (a "
                                  "re-embedding run is going on, was stopped, or did not find their files); run index on their folders",)
        outside = [h for h in hits if Path(h.path).parent == second]
        fresh = lib.encoder.embed_images([open_image(h.path) for h in outside])  # the new model's vectors
        np.testing.assert_allclose(lib.metadata.vectors_for([h.id for h in outside]), fresh, atol=1e-4)
    shutil.move(tmp_path / "unplugged", third)
    with Library.open(lib_dir) as lib:  # any later run picks up what waits
        r = lib.index([photos])
        assert (r.indexed, r.unchanged, r.notes) == (3, 7, ())
        assert lib.metadata.counts().pending == 0 and lib.search("a photo", 3, rerank=False).notes == ()
    _check_consistent(lib_dir)


@pytest.mark.parametrize("how", ["alias", "renamed"])
def test_reembed_under_another_name_keeps_one_record_a_photo(tiny_itm_dir, photos, tmp_path, how):
    """A library indexed through a symlinked alias (or before its folder was renamed), re-embedded under
    the folder's other name: each photo keeps its record (id, caption), none waits forever."""
    from tiny_models import make_tiny_itm

    lib_dir = tmp_path / "lib"
    first = tmp_path / "alias"
    if how == "alias":
        first.symlink_to(photos, target_is_directory=True)
        later = photos
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([first if how == "alias" else photos])
        before = {Path(p).name: k.id for p, k in lib.metadata.known_files().items()}
    if how == "renamed":
        later = tmp_path / "renamed"
        photos.rename(later)
    other = make_tiny_itm(tmp_path / "other", seed=5)
    with Library.open(lib_dir, model=str(other), reembed=True, captioner=False) as lib:
        r = lib.index([later])
        assert r.notes == () and (r.indexed, r.deleted) == (7, 0)
        known = lib.metadata.known_files()
        assert len(known) == 7 and all(p.startswith(str(later) + os.sep) and k.status == "indexed" for p, k in known.items())
        assert {Path(p).name: k.id for p, k in known.items()} == before
        assert lib.status().pending == 0
    _check_consistent(lib_dir)


def test_missing_photo_dir_and_missing_library(tmp_path, tiny_itm_dir):
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        with pytest.raises(InvalidInputError, match="does not exist; pass an existing folder"):
            lib.index([tmp_path / "nope"])
        _photo(tmp_path / "drive" / "a.jpg", 1)
        _photo(tmp_path / "drive" / "b.jpg", 2)
        lib.index([tmp_path / "drive"])
        (tmp_path / "drive").rename(tmp_path / "unplugged")  # a folder with photos of the library is gone: say how to forget them
        with pytest.raises(InvalidInputError, match=r"does not exist, but the library has 2 photos recorded under .*drive; .*`Library\.prune\(missing=\["):
            lib.index([tmp_path / "drive"])
        _photo(tmp_path / "drive-2" / "c.jpg", 3)  # a folder whose name starts with the missing one's holds none of its photos
        lib.index([tmp_path / "drive-2"])
        assert lib.metadata.photos_under(str(tmp_path / "drive")) == 2 and lib.metadata.photos_under(str(tmp_path / "DRIVE")) == 0
    res = CliRunner().invoke(main, ["index", str(tmp_path / "drive"), "--library", str(tmp_path / "lib")])
    assert res.exit_code == 2 and "the library has 2 photos recorded under" in res.output and "--missing-under" in res.output, res.output
    with pytest.raises(LibraryError, match=r"name the right library folder \(Library\.open\(FOLDER\)\)"):
        Library.open(tmp_path / "no-library")


# ------------------------------------------------------------------ bad files
def _bad_files(d: Path) -> dict[str, str]:
    """Make one file of each bad kind; returns path -> a word its error must contain."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    (d / "zero.jpg").write_bytes(b"")
    out["zero.jpg"] = "empty"
    good = _photo(d / "_src.jpg", 1, size=(200, 150))
    data = good.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    out["truncated.jpg"] = "truncated"
    (d / "text.jpg").write_text("hello, I am not a picture")
    out["text.jpg"] = "not an image file (content not recognised despite its '.jpg' extension)"
    (d / "icon.png").write_bytes(b"\x00\x00\x01\x00" + b"\x00" * 40)  # an .ico header named .png
    out["icon.png"] = ""
    import struct
    import zlib

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    (d / "bomb.png").write_bytes(bomb)
    out["bomb.png"] = "pixels"
    os.symlink(d / "nowhere.jpg", d / "broken link.jpg")
    out["broken link.jpg"] = "broken symlink"
    os.symlink(d / "loop.jpg", d / "loop.jpg")
    out["loop.jpg"] = "loop"
    (d / "emoji 📷 name\nnewline.jpg").write_bytes(data)
    os.remove(good)
    return out


def test_every_bad_file_is_recorded_and_the_run_goes_on(tiny_itm_dir, photos, tmp_path):
    expected = _bad_files(photos / "bad")
    lib_dir = tmp_path / "lib"
    res = CliRunner().invoke(main, ["index", str(photos), "--library", str(lib_dir), "--model", str(tiny_itm_dir), "--no-captions", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["failed"] == len(expected) and report["indexed"] == 8  # 7 photos + the odd-named one
    assert list(report) == ["scanned", "indexed", "unchanged", "reused", "failed", "deleted", "seconds", "interrupted", "notes"]
    assert report["interrupted"] is False and report["notes"] == []
    res = CliRunner().invoke(main, ["failures", "--library", str(lib_dir), "--json"])
    rows = {Path(r["path"]).name: r["error"] for r in json.loads(res.stdout)}
    assert set(rows) == set(expected)
    for name, word in expected.items():
        assert "\n" not in rows[name] and rows[name]
        assert word in rows[name].lower(), (name, rows[name])
        assert not rows[name].startswith(("cannot decode", "cannot read image")), rows[name]  # the row already names the file
    res = CliRunner().invoke(main, ["status", "--library", str(lib_dir), "--json"])
    st = json.loads(res.stdout)
    assert st["indexed"] == 8 and st["failed"] == len(expected) and st["vectors"] == 8 * 32 and st["images"] == 8 + len(expected)


def test_a_named_folder_without_image_files_gets_a_note(tiny_itm_dir, tmp_path):
    """Not a silent "scanned 0": the folder named, with the extensions that are indexed; not said of a folder with a photo."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    _photo(tmp_path / "notes" / ".hidden.jpg", 1)
    _photo(tmp_path / "photos" / "p.jpg", 2)
    res = CliRunner().invoke(main, ["index", str(tmp_path / "notes"), str(tmp_path / "photos"), "--library", str(tmp_path / "lib"),
                                    "--model", str(tiny_itm_dir), "--no-captions", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["indexed"] == 1 and len(report["notes"]) == 1, report
    assert report["notes"][0].startswith(f"no image files found under {str(tmp_path / 'notes')!r} (supported: .avif, .bmp,")
    assert ".jpg, .png" in report["notes"][0] and f"note: {report['notes'][0]}" in res.stderr
    (tmp_path / "alias").symlink_to(tmp_path / "photos")  # scanned once, under its first name: the alias is not empty
    res = CliRunner().invoke(main, ["index", str(tmp_path / "photos"), str(tmp_path / "alias"), str(tmp_path / "photos" / "."),
                                    "--library", str(tmp_path / "lib"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["notes"] == [], res.output


def test_cli_index_missing_dir_exits_2(tiny_itm_dir, tmp_path):
    res = CliRunner().invoke(main, ["index", str(tmp_path / "nope"), "--library", str(tmp_path / "lib"), "--model", str(tiny_itm_dir)])
    assert res.exit_code == 2 and "does not exist" in res.output


# ------------------------------------------------------------------ kill -9 and resume
KILL_SCRIPT = r"""
import sys, os
sys.path.insert(0, {tests!r})
from blip2_search.library import Library
with Library.open({lib!r}, model={model!r}, captioner=False, create=True, batch_size=2, workers=1) as lib:
    print("start", flush=True)
    lib.index([{photos!r}])
print("done", flush=True)
"""


def _indexed_count(lib_dir: Path) -> int:
    if not (lib_dir / "metadata.sqlite").exists():
        return 0
    try:
        with open_metadata(lib_dir, create=False) as meta:
            return meta.counts().indexed
    except LibraryError:
        return 0


def test_kill_9_at_random_points_then_resume(tiny_itm_dir, tmp_path):
    photos = tmp_path / "photos"
    n = 40
    for i in range(n):
        _photo(photos / f"k{i:02d}.png", 1000 + i, size=(900, 700))  # big enough that a run takes seconds
    lib_dir = tmp_path / "lib"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), lib=str(lib_dir), model=str(tiny_itm_dir), photos=str(photos))
    rng = np.random.default_rng(0)
    partial = []
    for target in sorted(rng.integers(2, n - 8, size=3).tolist()):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "start"
        deadline = time.time() + 90
        while _indexed_count(lib_dir) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # kill as soon as this run has committed up to a random point
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial.append(_indexed_count(lib_dir))
    assert any(0 < c < n for c in partial), partial  # the kills did land mid-run
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert r.indexed + r.unchanged == n and r.failed == 0 and r.reused == 0
        st = lib.status()
        assert (st.indexed, st.images) == (n, n)
    _check_consistent(lib_dir)
    with Library.open(lib_dir) as lib:
        assert lib.index([photos]).unchanged == n


def test_the_next_process_after_a_run_killed_before_its_save_brings_the_index_up_to_date(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """A run killed outright (SIGKILL, power loss) after committing photos but before saving the index left a file
    behind the database, which the next process rebuilt from the database whole (37 s at 100k photos, minutes for a
    compact index it retrains): it now loads that file and reads only the photos the journal says changed since."""
    rebuild_module = importlib.import_module("blip2_search.store.rebuild")
    from blip2_search.store.index_files import saved_generation

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
    saved = saved_generation(lib_dir / "vectors.faiss")
    more = tmp_path / "more"
    for i in range(5):
        _photo(more / f"m{i}.jpg", 300 + i)
    (photos / "p0.jpg").unlink()
    with monkeypatch.context() as killed:  # every save of the run is lost, as if it was killed before its first one
        killed.setattr(Library, "_save_vectors", lambda self, **kw: None)
        with Library.open(lib_dir) as lib:
            lib.index([photos, more])
    assert saved_generation(lib_dir / "vectors.faiss") == saved
    with Library.open(lib_dir) as lib, monkeypatch.context() as no_rebuild:
        no_rebuild.setattr(rebuild_module, "rebuild", lambda *a, **k: pytest.fail("rebuilt from the database"))
        current = lib.metadata.vectors_generation()
        got = lib.search("a red circle", 50, rerank=False, fusion=False).hits
        live = {k.id for k in lib.metadata.known_files().values() if k.status == "indexed"}
        assert {h.id for h in got} == live and len(live) == 7 - 1 + 5
        emb = lib.encoder.embed_texts(["a red circle"])[0]
        np.testing.assert_allclose([h.itc for h in got], (lib.metadata.vectors_for([h.id for h in got]) @ emb).max(axis=1), atol=1e-5)
        assert saved_generation(lib_dir / "vectors.faiss") == current > saved  # saved: the next process loads it as it is
    _check_consistent(lib_dir)
    with sqlite3.connect(lib_dir / "metadata.sqlite") as raw:
        assert raw.execute("SELECT count(*) FROM vector_changes").fetchone()[0] > 0
    with Library.open(lib_dir) as lib:  # the next run's save drops the journal up to it: it stays small
        _photo(more / "m9.jpg", 309)
        lib.index([photos, more])
    with sqlite3.connect(lib_dir / "metadata.sqlite") as raw:
        assert raw.execute("SELECT count(*) FROM vector_changes").fetchone()[0] == 0


def _queue_ahead(monkeypatch, ahead: bool) -> None:
    """Make the indexer keep one batch queued (as on a GPU) on this CPU, or not."""
    from blip2_search.indexing import pipeline

    monkeypatch.setattr(pipeline, "decode_during_forward", lambda devices: ahead)


@pytest.mark.parametrize("ahead", [False, True], ids=["cpu", "queued"])
def test_interrupt_commits_nothing_partial(tiny_itm_dir, photos, tmp_path, monkeypatch, ahead):
    from blip2_search.indexing import pipeline

    _queue_ahead(monkeypatch, ahead)

    calls = {"n": 0}
    real = pipeline.embed_batch

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "embed_batch", flaky)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        r = _interrupted(lib, [photos])
    assert r.interrupted and r.indexed == 3
    monkeypatch.setattr(pipeline, "embed_batch", real)
    with Library.open(lib_dir) as lib:
        r2 = lib.index([photos])
        assert (r2.indexed, r2.unchanged) == (4, 3)
    _check_consistent(lib_dir)


@pytest.mark.parametrize("where", ["upsert_indexed", "mark_failed", "mark_deleted"])
def test_a_ctrl_c_just_after_a_commit_is_counted_and_indexed(tiny_itm_dir, photos, tmp_path, monkeypatch, where, request):
    """SIGINT landing right after a batch's commit (inside the database call, as the OS delivers it) used to
    leave the report one batch short of the database and the vector index without that batch."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job (`cmd &`) ignores SIGINT
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    from blip2_search.store import MetadataStore

    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    lib_dir = tmp_path / "lib"
    if where == "mark_deleted":  # a run that finds photos gone
        with _open(lib_dir, tiny_itm_dir) as lib:
            lib.index([photos])
        (photos / "p0.jpg").unlink()
    real = getattr(MetadataStore, where)

    def commit_then_signal(self, *a, **kw):
        out = real(self, *a, **kw)
        signal.raise_signal(signal.SIGINT)  # delivered now, before the indexer's next line
        return out

    monkeypatch.setattr(MetadataStore, where, commit_then_signal)
    with Library.open(lib_dir, model=str(tiny_itm_dir), captioner=False, create=True, batch_size=3, workers=1) as lib:
        r = _interrupted(lib, [photos])
        assert r.interrupted
        from blip2_search.store.index_files import saved_generation
        assert saved_generation(lib_dir / "vectors.faiss") == lib.metadata.vectors_generation()  # saved: servers follow it
        counts = lib.metadata.counts()
        if where == "mark_deleted":
            assert r.deleted == counts.deleted == 1
        else:
            assert (r.indexed, r.failed) == (counts.indexed, counts.failed) and r.indexed + r.failed > 0
        assert sorted(lib.vectors.image_ids().tolist()) == sorted(k.id for k in lib.metadata.known_files().values() if k.status == "indexed")
    monkeypatch.setattr(MetadataStore, where, real)
    with Library.open(lib_dir) as lib:
        r2 = lib.index([photos])
        assert not r2.interrupted and lib.metadata.counts().indexed == 6 + (where != "mark_deleted")
    _check_consistent(lib_dir)


@pytest.mark.parametrize("ahead", [False, True], ids=["cpu", "queued"])
def test_interrupt_while_decoding_commits_the_batch_already_embedded(tiny_itm_dir, photos, tmp_path, monkeypatch, ahead):
    """On a GPU the indexer keeps one embedded batch queued while the previous one is written; Ctrl-C
    anywhere, here in a decode, still commits it."""
    from blip2_search.indexing import pipeline

    _queue_ahead(monkeypatch, ahead)

    real = pipeline.read_and_decode
    seen = []

    def flaky(file, *a, **kw):
        seen.append(file.path)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return real(file, *a, **kw)

    monkeypatch.setattr(pipeline, "read_and_decode", flaky)
    lib_dir = tmp_path / "lib"
    with Library.open(lib_dir, model=str(tiny_itm_dir), captioner=False, create=True, batch_size=3, workers=1) as lib:
        r = _interrupted(lib, [photos])
    assert r.interrupted and r.indexed == 3
    monkeypatch.setattr(pipeline, "read_and_decode", real)
    with Library.open(lib_dir) as lib:
        assert lib.status().indexed == 3
        r2 = lib.index([photos])
        assert (r2.indexed, r2.unchanged) == (4, 3)
    _check_consistent(lib_dir)


@pytest.mark.parametrize("ahead", [False, True], ids=["cpu", "queued"])
def test_each_batch_is_written_after_the_next_one_is_queued(tiny_itm_dir, photos, tmp_path, monkeypatch, ahead):
    """Queued (a GPU): batch i is written after batch i+1 is queued. On the CPU each is written at once."""
    from blip2_search.indexing import pipeline

    _queue_ahead(monkeypatch, ahead)

    events = []
    real_embed, real_store = pipeline.embed_batch, pipeline.Indexer._store_batch

    def embed(encoder, captioner, pixels, **kw):
        events.append(("queue", len(next(iter(pixels.values())))))
        return real_embed(encoder, captioner, pixels, **kw)

    def store(self, results, *a):
        events.append(("write", len(results)))
        return real_store(self, results, *a)

    monkeypatch.setattr(pipeline, "embed_batch", embed)
    monkeypatch.setattr(pipeline.Indexer, "_store_batch", store)
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        assert lib.index([photos]).indexed == 7
    if ahead:
        assert events == [("queue", 3), ("queue", 3), ("write", 3), ("queue", 1), ("write", 3), ("write", 1)]
    else:
        assert events == [("queue", 3), ("write", 3), ("queue", 3), ("write", 3), ("queue", 1), ("write", 1)]


@pytest.mark.parametrize("ahead", [False, True], ids=["cpu", "queued"])
def test_copies_found_in_the_same_run_are_reused_not_embedded_again(tiny_itm_dir, tiny_captioner_dir, tmp_path, monkeypatch, ahead):
    """20 photos and a copy of each ("p0 (1).jpg", read just before its original), all new: each copy decoded
    while its original waited in the batch or on the model was embedded and captioned again (user review:
    "indexed 40, reused 0", twice the model time). Now it waits for its original's commit and reuses it."""
    from blip2_search.indexing import pipeline

    _queue_ahead(monkeypatch, ahead)
    real_embed, embedded = pipeline.embed_batch, []

    def embed(encoder, captioner, pixels, **kw):
        embedded.append(len(next(iter(pixels.values()))))
        return real_embed(encoder, captioner, pixels, **kw)

    monkeypatch.setattr(pipeline, "embed_batch", embed)
    photos = tmp_path / "photos"
    for i in range(20):
        shutil.copy(_photo(photos / f"p{i}.jpg", i), photos / f"p{i} (1).jpg")
    lib_dir = tmp_path / "lib"
    with Library.open(lib_dir, model=str(tiny_itm_dir), captioner=str(tiny_captioner_dir), create=True, batch_size=3, workers=2) as lib:
        r = lib.index([photos])
        assert (r.indexed, r.reused, r.failed) == (20, 20, 0) and sum(embedded) == 20
        records = {os.path.basename(rec.path): rec for rec in lib.metadata.get_records([k.id for k in lib.metadata.known_files().values()])}
        assert len(records) == 40 and {rec.status for rec in records.values()} == {"indexed"}
        for i in range(20):
            original, copy = records[f"p{i}.jpg"], records[f"p{i} (1).jpg"]
            assert copy.content_hash == original.content_hash and copy.caption == original.caption and copy.caption is not None
            assert (copy.width, copy.height) == (original.width, original.height) == (64, 48)
            q = lib.encoder.embed_images([Image.open(photos / f"p{i}.jpg")]).max(axis=1)
            ids, scores = lib.vectors.search(q / np.linalg.norm(q), k=40)
            found = dict(zip(ids[0].tolist(), scores[0].tolist()))
            assert found[copy.id] == found[original.id]  # the same vectors, once embedded
        assert lib.status().captioned == 40
    _check_consistent(lib_dir)


def test_a_copy_whose_original_was_never_committed_is_embedded_itself(tiny_itm_dir, tmp_path, monkeypatch):
    """A copy waits for its original's batch; should that batch never be committed, the copy is embedded, not lost."""
    from blip2_search.indexing import pipeline

    real_store, dropped = pipeline.Indexer._store_batch, []

    def store(self, results, *a):
        if not dropped:  # the first batch vanishes without a commit
            dropped.extend(os.path.basename(r.file.path) for r in results)
            return None
        return real_store(self, results, *a)

    monkeypatch.setattr(pipeline.Indexer, "_store_batch", store)
    photos = tmp_path / "photos"
    for i in range(6):
        shutil.copy(_photo(photos / f"p{i}.jpg", i), photos / f"p{i} (1).jpg")
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        lib.index([photos])
        statuses = {os.path.basename(p): k.status for p, k in lib.metadata.known_files().items()}
    assert dropped == ["p0 (1).jpg", "p1 (1).jpg", "p2 (1).jpg"]
    assert all(name not in statuses for name in dropped)
    assert statuses == {name: "indexed" for name in [f"p{i}.jpg" for i in range(6)] + [f"p{i} (1).jpg" for i in range(3, 6)]}


def test_copies_waiting_for_their_original_hold_no_pixels_but_the_first(tiny_itm_dir, tmp_path, monkeypatch):
    """Copies waiting for their original's commit kept their decoded pixels (review: unbounded with many copies);
    only the first keeps them, as it is embedded itself should the original's batch never be committed."""
    from blip2_search.indexing import pipeline

    real_store, dropped, real_release, held = pipeline.Indexer._store_batch, [], pipeline.Indexer._release, []

    def store(self, results, *a):
        if not dropped:  # the first batch vanishes without a commit: its contents' first waiting copies are embedded
            dropped.extend(os.path.basename(r.file.path) for r in results)
            return None
        return real_store(self, results, *a)

    def release(self, waiting, *a):
        held.append(max((sum(bool(c.pixels) for c in copies) for copies in waiting.values()), default=0))
        return real_release(self, waiting, *a)

    monkeypatch.setattr(pipeline.Indexer, "_store_batch", store)
    monkeypatch.setattr(pipeline.Indexer, "_release", release)
    photos = tmp_path / "photos"
    for i in range(6):
        original = _photo(photos / f"p{i}.jpg", i)
        for n in (1, 2, 3):
            shutil.copy(original, photos / f"p{i} ({n}).jpg")
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        report = lib.index([photos])
        statuses = {os.path.basename(p): k.status for p, k in lib.metadata.known_files().items()}
    assert dropped == ["p0 (1).jpg", "p1 (1).jpg", "p2 (1).jpg"]
    assert max(held) == 1 and report.failed == 0
    assert len(statuses) == 24 - len(dropped) and set(statuses.values()) == {"indexed"}


def test_a_failed_commit_does_not_hide_the_interrupt(tiny_itm_dir, photos, tmp_path, monkeypatch):
    from blip2_search.indexing import pipeline

    _queue_ahead(monkeypatch, True)
    real_embed, calls = pipeline.embed_batch, []

    def embed(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_embed(*a, **kw)

    def store(self, *a):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "embed_batch", embed)
    monkeypatch.setattr(pipeline.Indexer, "_store_batch", store)
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        r = _interrupted(lib, [photos])
    assert r.interrupted and r.indexed == 0  # Ctrl-C is what the caller hears about, not the commit after it


def test_captions_are_written_and_embedded(tiny_itm_dir, tiny_captioner_dir, photos, tmp_path):
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=str(tiny_captioner_dir), create=True, batch_size=4) as lib:
        lib.index([photos])
        recs = lib.metadata.get_records([k.id for k in lib.metadata.known_files().values()])
        assert all(r.caption for r in recs) and lib.status().captioned == 7
        ids, vecs = next(lib.metadata.iter_caption_vectors())
        rec = {r.id: r for r in recs}
        np.testing.assert_allclose(vecs[0], lib.encoder.embed_texts([rec[int(ids[0])].caption])[0], atol=1e-5)


def test_read_only_library_is_a_clear_error(tiny_itm_dir, photos, tmp_path, monkeypatch):
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (mode & os.W_OK and str(p).startswith(str(lib_dir))) else real_access(p, mode, *a, **k))
    with pytest.raises(LibraryError, match="read-only"):
        Library.open(lib_dir)
    monkeypatch.undo()
    with Library.open(lib_dir) as lib:
        assert lib.status().indexed == 7  # intact


def test_missing_or_stale_faiss_file_is_rebuilt(tiny_itm_dir, photos, tmp_path):
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        want = lib.search("a red circle", 5, rerank=False, fusion=False)
    (lib_dir / "vectors.faiss.json").unlink()
    with Library.open(lib_dir) as lib:
        got = lib.search("a red circle", 5, rerank=False, fusion=False)
    assert [h.id for h in got.hits] == [h.id for h in want.hits]
    assert (lib_dir / "vectors.faiss.json").exists()  # written back
    assert len(list(lib_dir.glob("vectors.*.f32"))) == 1  # the unreferenced data file went
    _check_consistent(lib_dir)


def test_unreadable_file_and_file_changing_mid_run(tiny_itm_dir, photos, tmp_path, monkeypatch):
    from blip2_search.indexing import read

    locked, changing = str(photos / "p0.jpg"), str(photos / "p1.jpg")
    real_open, real_stat = open, os.stat

    def fake_open(path, *a, **k):  # root reads chmod-000 files, so refuse the read as the OS would
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    def fake_stat(path, *a, **k):  # the file grows between the read and the check after it
        st = real_stat(path, *a, **k)
        if str(path) == changing:
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size + 10, st.st_atime, st.st_mtime, st.st_ctime))
        return st

    monkeypatch.setattr(read, "open", fake_open, raising=False)
    monkeypatch.setattr(read.os, "stat", fake_stat)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        r = lib.index([photos])
        errors = {Path(f.path).name: f.error for f in lib.failures()}
    assert r.failed == 2 and r.indexed == 5
    assert "permission" in errors["p0.jpg"].lower() and "changed while it was read" in errors["p1.jpg"]
    monkeypatch.undo()
    with Library.open(lib_dir) as lib:  # retried on the next run, now fine
        r2 = lib.index([photos])
        assert r2.indexed == 2 and r2.failed == 0 and lib.status().failed == 0


def test_a_file_deleted_while_a_run_reads_is_gone_not_failed(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """Deleted between the scan and its read: it was recorded as a failure ("cannot read (No such file or
    directory)") and counted in `failed` until the next run. A known photo is now marked deleted, as when the scan
    misses it (vectors kept); a new file is skipped; one whose folder went too is left as it was for the next run."""
    from blip2_search.indexing import pipeline

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        before = lib.metadata.known_files()
    _photo(photos / "new.jpg", 50)
    real = pipeline.read_and_decode

    def deleted_first(file, *a, **kw):
        name = os.path.basename(file.path)
        if name in ("p0.jpg", "new.jpg"):
            os.remove(file.path)
        elif name == "nested é.png":
            shutil.rmtree(photos / "sub dir")
        return real(file, *a, **kw)

    monkeypatch.setattr(pipeline, "read_and_decode", deleted_first)
    with Library.open(lib_dir) as lib:
        r = lib.index([photos], rehash=True)  # every file is read
        assert (r.failed, r.deleted, r.reused, r.indexed) == (0, 1, 5, 0) and lib.failures() == []
        known = lib.metadata.known_files()
        assert known[str(photos / "p0.jpg")].status == "deleted" and str(photos / "new.jpg") not in known
        assert known[str(photos / "sub dir" / "nested é.png")].status == "indexed"  # its folder went too
        assert before[str(photos / "p0.jpg")].content_hash in lib.metadata.embedded_hashes()  # kept for a restore
        st = lib.status()
        assert (st.failed, st.deleted, st.indexed) == (0, 1, 6)
    monkeypatch.undo()
    with Library.open(lib_dir) as lib:
        r = lib.index([photos])
        assert (r.failed, r.deleted, r.unchanged) == (0, 1, 5)  # the next run finds the folder gone
    _check_consistent(lib_dir)


def test_full_disk_is_a_clear_error_and_the_library_stays_intact(tiny_itm_dir, photos, tmp_path):
    from sqlalchemy import event

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    for i in range(6):
        _photo(photos / "more" / f"m{i}.jpg", 300 + i, size=(640, 480))
    with Library.open(lib_dir, batch_size=3) as lib:
        engine = lib.metadata._engine
        engine.dispose()
        # SQLite reports SQLITE_FULL ("database or disk is full") once the file may not grow: a real full disk
        event.listen(engine, "connect", lambda conn, rec: conn.execute("PRAGMA max_page_count = 1"))
        with pytest.raises(LibraryError, match="full"):
            lib.index([photos])
    with Library.open(lib_dir) as lib:
        assert lib.status().indexed == 7
        assert lib.index([photos]).indexed == 6
    _check_consistent(lib_dir)


def test_exif_orientation_is_applied_before_embedding(tiny_itm_dir, tmp_path):
    """A photo stored rotated with an orientation tag is embedded exactly as its upright twin;
    the same rotated pixels without the tag are not (the demo-model version: test_demo_search.py)."""
    rng = np.random.default_rng(11)
    upright = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    photos = tmp_path / "photos"
    photos.mkdir()
    upright.save(photos / "upright.png")
    rotated = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view: undoes ROTATE_90 (counter-clockwise)
    rotated.save(photos / "tagged.png", exif=exif)
    rotated.save(photos / "untagged.png")
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        lib.index([photos])
        ids = {Path(p).name: k.id for p, k in lib.metadata.known_files().items()}
        vec = {name: lib.vectors.vectors_for(np.array([i]))[0] for name, i in ids.items()}
    np.testing.assert_allclose(vec["tagged.png"], vec["upright.png"], atol=1e-6)
    assert np.abs(vec["untagged.png"] - vec["upright.png"]).max() > 1e-2


def test_a_bad_model_leaves_no_empty_library(tmp_path, monkeypatch):
    from blip2_search.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="pass model with an existing directory"):
        Library.open(tmp_path / "lib", model=str(tmp_path / "no-such-model"), create=True)
    assert not (tmp_path / "lib").exists()
    monkeypatch.setenv("BLIP2_SEARCH_MODEL", str(tmp_path / "nor-this-one"))  # the default model, too
    with pytest.raises(ModelNotFoundError):
        Library.open(tmp_path / "lib", create=True)
    assert not (tmp_path / "lib").exists()
    import torch

    for bad in ({"dtype": "float16"}, {"device": "cuda"}) if not torch.cuda.is_available() else ():  # nor a device this machine lacks
        with pytest.raises(InvalidInputError, match=f"{next(iter(bad))}="):  # named as the keyword passed
            Library.open(tmp_path / "lib", model="demo", create=True, **bad)
        assert not (tmp_path / "lib").exists()


def test_a_first_run_that_fails_to_find_its_captioner_records_nothing(tmp_path, photos, tiny_itm_dir, tiny_captioner_dir, monkeypatch):
    """The captioner goes missing between `open` and `index`: the run fails before recording the
    embedder, so the next run still captions (the library does not read as 'no captions wanted')."""
    from blip2_search.errors import ModelNotFoundError

    moved = tmp_path / "captioner"
    shutil.copytree(tiny_captioner_dir, moved)
    monkeypatch.setenv("BLIP2_SEARCH_CAPTIONER", str(moved))
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), create=True) as lib:
        moved.rename(tmp_path / "away")
        with pytest.raises(ModelNotFoundError, match="pass captioner with an existing directory"):
            lib.index([photos])
        assert lib.metadata.info().embedder is None
    (tmp_path / "away").rename(moved)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), create=True) as lib:
        assert lib.captioner_name == str(moved)
        lib.index([photos])
        assert lib.status().captioned == lib.status().indexed > 0 and lib.metadata.info().captioner is not None


def test_a_new_library_resolves_its_model_once(tmp_path, photos, tiny_itm_dir, monkeypatch):
    """`open` finds the embedder of a new library (to fail early); indexing reuses it instead of resolving again."""
    from blip2_search.models import encoder as encoder_module
    from blip2_search.models import loading

    calls = []
    real = loading.resolve_model

    def counting(name, **kw):
        calls.append(name)
        return real(name, **kw)

    monkeypatch.setattr(loading, "resolve_model", counting)
    monkeypatch.setattr(encoder_module, "resolve_model", counting)
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        assert lib.index([photos]).indexed == 7
    assert len(calls) == 1
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:  # an existing library resolves when it loads the model
        lib.encoder
    assert len(calls) == 2


def test_an_index_run_removes_what_a_save_killed_midway_left(tiny_itm_dir, photos, tmp_path):
    """A SIGKILL between writing the index's temporary and moving it into place leaves an index-sized file;
    a save removes only old ones (another process may be saving), but the lock's holder removes any."""
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        lib.index([photos])
    (data,) = (tmp_path / "lib").glob("vectors.*.f32")
    leftover = data.with_name(data.name + ".x1y2z3.tmp")
    leftover.write_bytes(data.read_bytes())  # written just now: young
    with Library.open(tmp_path / "lib") as lib:
        assert lib.index([photos]).unchanged == 7
    assert not leftover.exists()


def test_the_last_progress_report_counts_what_the_run_wrote(tiny_itm_dir, photos, tmp_path):
    (photos.parent / "other").mkdir(exist_ok=True)
    (photos.parent / "other" / "broken.jpg").write_bytes(b"not a jpeg")
    seen = []
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True, batch_size=32) as lib:
        report = lib.index([photos, photos.parent / "other"], progress=seen.append)  # one batch: written after the last file
    last = seen[-1]
    assert report.indexed > 0 and report.failed == 1
    assert (last.done, last.total, last.indexed, last.reused, last.failed) == (report.scanned, report.scanned, report.indexed, report.reused, 1)


def test_captions_turned_on_later_reach_the_photos_indexed_without(tiny_itm_dir, tiny_captioner_dir, photos, tmp_path):
    """A library indexed with captions off, then indexed with a captioner: the photos already indexed are
    captioned (as a captioning run would have), with their caption vectors; a second run has nothing to do."""
    with Library.open(tmp_path / "with", model=str(tiny_itm_dir), captioner=str(tiny_captioner_dir), create=True, batch_size=4) as lib:
        lib.index([photos])
        want = {r.path: r.caption for r in lib.metadata.get_records([k.id for k in lib.metadata.known_files().values()])}
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        lib.index([photos])
        assert lib.status().captioned == 0
    seen = []
    with Library.open(tmp_path / "lib", captioner=str(tiny_captioner_dir), batch_size=4) as lib:
        report = lib.index([photos], progress=seen.append)
        assert report.unchanged == 7 and report.indexed == 0
        assert "captioned 7 photos indexed without captions" in report.notes
        assert [p.done for p in seen if p.stage == "caption"] == [4, 7] and seen[-1].total == 7
        records = lib.metadata.get_records([k.id for k in lib.metadata.known_files().values()])
        assert {r.path: r.caption for r in records} == want
        assert {r.caption_model for r in records} == {str(tiny_captioner_dir)}
        ids, vecs = next(lib.metadata.iter_caption_vectors())
        by_id = {r.id: r.caption for r in records}
        assert len(ids) == 7
        np.testing.assert_allclose(vecs, lib.encoder.embed_texts([by_id[int(i)] for i in ids]), atol=1e-5)
        assert lib.index([photos]).notes == ()


def test_caption_backfill_skips_photos_it_cannot_read_and_says_so(tiny_itm_dir, tiny_captioner_dir, photos, tmp_path):
    """Photos of another folder, gone or changed since they were indexed, stay uncaptioned with a note; a
    copy of one photo is captioned with it; a long-lived reader (a server) sees the new captions."""
    other = tmp_path / "other"
    _photo(other / "gone.jpg", 40)
    _photo(other / "changed.jpg", 41)
    shutil.copy(photos / "p0.jpg", other / "copy of p0.jpg")
    with _open(tmp_path / "lib", tiny_itm_dir) as server:
        server.index([photos, other])
        assert len(server.engine._captions()[0]) == 0
        (other / "gone.jpg").unlink()
        _photo(other / "changed.jpg", 42)
        with Library.open(tmp_path / "lib", captioner=str(tiny_captioner_dir)) as lib:
            report = lib.index([photos])
            assert "captioned 8 photos indexed without captions" in report.notes  # 7 and the copy
            assert any(n.startswith("2 photos indexed without captions could not be read") for n in report.notes)
            uncaptioned = sorted(os.path.basename(r.path) for r in lib.metadata.uncaptioned())
            assert uncaptioned == ["changed.jpg", "gone.jpg"]
        assert len(server.engine._captions()[0]) == 8


def test_a_photo_moved_across_two_runs_keeps_its_record(tiny_itm_dir, photos, tmp_path):
    """Moved out of the indexed folder (one run finds it gone), later into another folder indexed
    separately: it is the same photo (id, caption, links), not a new record beside a deleted one."""
    lib_dir, other = tmp_path / "lib", tmp_path / "other"
    other.mkdir()
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        before = lib.metadata.get_by_paths([str(photos / "p0.jpg")])[str(photos / "p0.jpg")]
        lib.metadata.set_captions([CaptionUpdate(before.id, "a kept caption", "m")])
        shutil.move(photos / "p0.jpg", tmp_path / "p0.jpg")
        assert lib.index([photos]).deleted == 1
        shutil.move(tmp_path / "p0.jpg", other / "p0 moved.jpg")
        shutil.copy(photos / "p1.jpg", other / "copy of p1.jpg")  # a copy of a live photo stays a copy
        r = lib.index([other])
        assert (r.reused, r.indexed) == (2, 0)
        known = lib.metadata.known_files()
        assert str(photos / "p0.jpg") not in known
        moved = lib.metadata.get_records([known[str(other / "p0 moved.jpg")].id])[0]
        assert (moved.id, moved.status, moved.caption) == (before.id, "indexed", "a kept caption")
        assert known[str(other / "copy of p1.jpg")].id != known[str(photos / "p1.jpg")].id
        assert lib.status().indexed == 8 and lib.status().deleted == 0
        # a folder that went away whole (an unplugged drive): a copy found elsewhere is a copy, not its move
        shutil.move(photos / "sub dir", tmp_path / "unplugged")
        assert lib.index([photos]).deleted == 1
        nested = lib.metadata.get_by_paths([str(photos / "sub dir" / "nested é.png")])[str(photos / "sub dir" / "nested é.png")]
        shutil.copy(tmp_path / "unplugged" / "nested é.png", other / "from the phone.png")
        lib.index([other])
        assert lib.metadata.known_files()[str(other / "from the phone.png")].id != nested.id
        shutil.move(tmp_path / "unplugged", photos / "sub dir")
        assert lib.index([photos]).reused == 1
        back = lib.metadata.get_by_paths([nested.path])[nested.path]
        assert (back.id, back.status) == (nested.id, "indexed")  # the photo came back under its own record
    _check_consistent(lib_dir)


def test_caption_backfill_reads_a_copy_when_the_first_file_is_gone(tiny_itm_dir, tiny_captioner_dir, photos, tmp_path):
    """One caption per content, from whichever copy reads; the server hears once, not once a batch."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(photos / "p0.jpg", other / "copy of p0.jpg")
    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        lib.index([photos])
        lib.index([other])  # the copy's record comes after p0's
    (photos / "p0.jpg").unlink()  # gone, but its folder is not indexed in the next run: its record stays
    with Library.open(tmp_path / "lib", captioner=str(tiny_captioner_dir), batch_size=3) as lib:
        report = lib.index([other])
        assert report.notes == ("captioned 8 photos indexed without captions",)
        assert lib.metadata.uncaptioned() == [] and lib.metadata.captions_generation() == 1  # 3 batches, one reload
        p0, copy = (lib.metadata.get_by_paths([str(p)])[str(p)] for p in (photos / "p0.jpg", other / "copy of p0.jpg"))
        assert p0.caption == copy.caption and p0.caption


def test_a_full_disk_leaves_search_and_prune_working(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """With no space to write the vector index, searches rebuild it in memory (with a note) and prune still
    forgets photos, dropping the stale index file instead (user review: both refused, so the disk stayed full)."""
    import errno

    from blip2_search.store import exact_files, index_files

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        want = [h.id for h in lib.search("a red circle", 3, rerank=False, fusion=False).hits]
    (lib_dir / "vectors.faiss.json").unlink()

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as disk:
        disk.setattr(index_files, "atomic_write", full)
        disk.setattr(exact_files, "atomic_write", full)
        with Library.open(lib_dir) as lib:
            result = lib.search("a red circle", 3, rerank=False, fusion=False)
            assert [h.id for h in result.hits] == want
            assert any("rebuilt in memory but not saved" in n and "No space left" in n for n in result.notes)
    with Library.open(lib_dir) as lib:  # space again: rebuilt and saved
        assert lib.search("a red circle", 3, rerank=False, fusion=False).notes == ()
    assert (lib_dir / "vectors.faiss.json").exists()
    shutil.move(photos / "p0.jpg", tmp_path / "p0 elsewhere.jpg")  # gone from the library; kept as a query image
    server = Library.open(lib_dir)
    assert len(server.search("a red circle", 7, rerank=False, fusion=False).hits) == 7
    with monkeypatch.context() as disk:
        disk.setattr(index_files, "atomic_write", full)
        disk.setattr(exact_files, "atomic_write", full)
        with Library.open(lib_dir) as lib:
            report = lib.prune(missing=True)
            assert (report.missing, report.images) == (1, 1) and "removed the stale vector index" in report.notes[0]
    assert not (lib_dir / "vectors.faiss.json").exists() and not list(lib_dir.glob("vectors.*.f32"))
    assert len(server.similar(tmp_path / "p0 elsewhere.jpg", 6).hits) == 6  # it follows the prune: 6 live photos
    server.close()
    with Library.open(lib_dir) as lib:
        assert lib.status().indexed == 6 and lib.search("a red circle", 3, rerank=False, fusion=False).notes == ()
    _check_consistent(lib_dir)


def test_a_prune_with_no_room_to_compact_still_forgets_and_says_why_it_did_not_compact(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """VACUUM writes a second copy of the database: on a full disk it failed the whole prune (exit code 2, no report)
    after the photos had been forgotten, the summary unsaid."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from blip2_search.store import metadata as metadata_module

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
    shutil.move(photos / "p0.jpg", tmp_path / "p0.jpg")
    with _open(lib_dir, tiny_itm_dir) as lib:
        assert lib.index([photos]).deleted == 1

    def full(engine):
        raise OperationalError("VACUUM", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(metadata_module, "vacuum", full)
    res = CliRunner().invoke(main, ["prune", "--library", str(lib_dir)])
    assert res.exit_code == 0, res.output
    (note,), summary = res.stderr.strip().splitlines(), res.stdout.strip()
    assert note == (f"note: the deleted photos were forgotten, but the metadata could not be compacted: library {lib_dir / 'metadata.sqlite'}: "
                    "database or disk is full; the disk is full; free disk space and run the command again"), note
    assert summary.startswith("forgot 1 deleted photos") and "not compacted: too little" not in summary, summary
    with Library.open(lib_dir) as lib:
        assert lib.status().deleted == 0 and lib.status().indexed == 6
    _check_consistent(lib_dir)


def test_caption_backfill_interrupted_says_what_it_did_and_signals_servers_as_it_goes(tiny_itm_dir, tiny_captioner_dir, photos, tmp_path, monkeypatch):
    """Ctrl-C in the backfill keeps and reports the batches written; a run killed outright has told servers
    to reload at least every CAPTIONS_SIGNAL_S; the report's seconds include the backfill."""
    from blip2_search.indexing import pipeline

    with _open(tmp_path / "lib", tiny_itm_dir) as lib:
        lib.index([photos])
    real, calls = pipeline.Indexer._put_captions, []

    def interrupted_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, *args)
        time.sleep(0.3)

    monkeypatch.setattr(pipeline.Indexer, "_put_captions", interrupted_second)
    monkeypatch.setattr(pipeline, "CAPTIONS_SIGNAL_S", 0.0)
    with Library.open(tmp_path / "lib", captioner=str(tiny_captioner_dir), batch_size=3) as lib:
        report = _interrupted(lib, [photos])
        assert report.interrupted and report.notes == ("captioned 3 photos indexed without captions",)
        assert report.seconds >= 0.3 and lib.status().captioned == 3
        assert lib.metadata.captions_generation() == 2  # after the batch (signal period 0), and at the end


def test_a_damaged_vector_index_of_the_right_size_is_rebuilt(tiny_itm_dir, photos, tmp_path):
    """Bytes overwritten inside the vectors file (size, generation and count still right) gave scores like 1e37
    as hits; scores of unit vectors cannot pass 1, so the file is rebuilt from the database, with a note."""
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:  # compact ones rescore from the database
        lib.index([photos])
        want = lib.search("a red circle", 3, rerank=False, fusion=False)
    (index,) = lib_dir.glob("vectors.*.f32")
    rows = np.fromfile(index, dtype=np.float32)  # one image's 32 vectors overwritten in place: same size and count
    rows[: 32 * 256] = np.random.default_rng(0).normal(size=32 * 256) * 100
    rows.tofile(index)
    data = index.read_bytes()
    for search in (lambda lib: lib.search("a red circle", 3, rerank=False, fusion=False),
                   lambda lib: lib.similar(photos / "p1.jpg", 3)):
        with Library.open(lib_dir) as lib:
            got = search(lib)
            assert all(-1.001 <= h.itc <= 1.001 for h in got.hits)
            assert got.notes == ("the vector index was damaged (it gave scores impossible for unit vectors): rebuilt it from the database",)
            assert lib.search("a red circle", 3, rerank=False, fusion=False).notes == ()
        with Library.open(lib_dir) as lib:
            assert [h.id for h in lib.search("a red circle", 3, rerank=False, fusion=False).hits] == [h.id for h in want.hits]
        (index,) = lib_dir.glob("vectors.*.f32")  # rebuilt under a new name
        index.write_bytes(data)  # damaged again for the image search
    rows[: 32 * 256] = np.nan  # not numbers at all: those images had dropped out of every search silently
    rows.tofile(index)
    with Library.open(lib_dir) as lib:
        got = lib.search("a red circle", 3, rerank=False, fusion=False)
        assert [h.id for h in got.hits] == [h.id for h in want.hits] and "damaged" in got.notes[0]
    # the other reads of the vectors: a composite query, an image search, a rerank, duplicates (review: the
    # photo dropped out silently, NaN scores, or no duplicate groups at all)
    (damaged,) = lib_dir.glob("vectors.*.f32")
    nan_rows = np.fromfile(damaged, dtype=np.float32)
    nan_rows[: 32 * 256] = np.nan
    first = int(np.fromfile(next(lib_dir.glob("vectors.*.ids")), dtype=np.int64)[0])  # the photo of the damaged row
    for use in (lambda lib: lib.search('"a red circle" - "a square"', 3, rerank=False, fusion=False),
                lambda lib: lib.similar(photos / "p1.jpg", 3), lambda lib: lib.rerank("a red circle", [first, *[i for i in (1, 2, 3) if i != first][:2]]),
                lambda lib: lib.duplicates(0.5)):
        (damaged,) = lib_dir.glob("vectors.*.f32")
        nan_rows.tofile(damaged)
        with Library.open(lib_dir) as lib:
            got = use(lib)
            assert isinstance(got, list) or got.notes[-1:] == ("the vector index was damaged (it gave scores impossible for unit "
                                                                "vectors): rebuilt it from the database",), got
            if hasattr(got, "hits"):
                assert all(np.isfinite(h.score) for h in got.hits) and len(got.hits) == 3
        with Library.open(lib_dir) as lib:
            assert lib.search("a red circle", 3, rerank=False, fusion=False).notes == ()  # rebuilt: whole again
    assert not any(np.isnan(np.fromfile(next(lib_dir.glob("vectors.*.f32")), dtype=np.float32)))


def test_a_damaged_index_brought_up_to_date_beside_a_running_index_is_rebuilt(tiny_itm_dir, photos, tmp_path):
    """A damaged file behind the database, brought up to date in memory beside a running `index` (not saved back), was
    taken for a newer save than the one loaded (its generation is the database's, not the file's): the file stayed,
    the rebuild loaded it again, and every search said the database's vectors were damaged (review)."""
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
    (data,) = lib_dir.glob("vectors.*.f32")
    rows = np.fromfile(data, dtype=np.float32)
    rows[: 32 * 256] = np.nan
    rows.tofile(data)
    with open_metadata(lib_dir, create=False) as meta:  # the run beside commits: the file is behind the database
        live = sorted(k.id for k in meta.known_files().values() if k.status == "indexed")
        meta.mark_deleted(live[-1:])
    lock = os.open(lib_dir / "index.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # that run holds the library's lock
    try:
        with Library.open(lib_dir) as lib:
            got = lib.search("a red circle", 3, rerank=False, fusion=False)
            assert "the vector index was damaged (it gave scores impossible for unit vectors): rebuilt it from the database" in got.notes
            assert live[-1] not in [h.id for h in got.hits] and len(got.hits) == 3
    finally:
        os.close(lock)


def test_a_damaged_index_that_cannot_be_removed_is_rebuilt_in_memory(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """On read-only media the damaged files cannot be removed: searches still answer (rebuilt in memory, with the
    note), where removing them raised a raw OSError (review)."""
    import errno

    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir, vector_index="exact") as lib:
        lib.index([photos])
        want = [h.id for h in lib.search("a red circle", 3, rerank=False, fusion=False).hits]
    (data,) = lib_dir.glob("vectors.*.f32")
    rows = np.fromfile(data, dtype=np.float32)
    rows[: 32 * 256] = np.nan
    rows.tofile(data)

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Library, "_remove_index_file", read_only)
    with Library.open(lib_dir) as lib:
        for _ in range(2):
            got = lib.search("a red circle", 3, rerank=False, fusion=False)
            assert [h.id for h in got.hits] == want
        assert len(lib.duplicates(0.5)) >= 0 and len(lib.similar(photos / "p1.jpg", 3).hits) == 3
    assert data.exists()


def test_a_server_that_could_not_record_the_new_fingerprint_follows_one_that_did(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """A server whose adoption of the new fingerprint failed (a busy or read-only database) compares the older one;
    after another process adopted it and indexed, the server said the library was re-embedded elsewhere (review)."""
    from blip2_search.store.metadata import MetadataStore

    model, lib_dir, new, _ = _library_of_the_older_fingerprint(tiny_itm_dir, photos, tmp_path)

    def busy(self, recorded, revision):
        raise LibraryError("database is locked")

    with monkeypatch.context() as patched:
        patched.setattr(MetadataStore, "adopt_embedder_revision", busy)
        server = Library.open(lib_dir)
        assert len(server.search("a red circle", 3, rerank=False, fusion=False).hits) == 3
    try:
        _photo(photos / "later.jpg", 77)
        with Library.open(lib_dir) as other:  # adopts, then indexes a photo
            assert other.index([photos]).indexed == 1 and other.metadata.info().embedder == new
        assert len(server.search("a red circle", 8, rerank=False, fusion=False).hits) == 8
    finally:
        server.close()


def test_a_reembed_without_captions_embeds_the_kept_captions_again(tiny_itm_dir, tiny_captioner_dir, photos, tmp_path):
    """--reembed drops every caption vector (they came from the old model); with captions off nothing wrote
    new ones, so caption fusion lost every photo. The kept caption texts are embedded with the new model."""
    from tiny_models import make_tiny_itm

    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=str(tiny_captioner_dir), create=True, batch_size=4) as lib:
        lib.index([photos])
    other = make_tiny_itm(tmp_path / "other", seed=5)
    with Library.open(tmp_path / "lib", model=str(other), captioner=False, reembed=True, batch_size=4) as lib:
        report = lib.index([photos])
        assert "embedded the captions of 7 photos that had none embedded (after a re-embed without captions)" in report.notes
        records = {r.id: r for r in lib.metadata.get_records(range(1, 20))}
        ids, vecs = next(lib.metadata.iter_caption_vectors())
        assert len(ids) == 7 and all(records[int(i)].caption for i in ids)
        np.testing.assert_allclose(vecs, lib.encoder.embed_texts([records[int(i)].caption for i in ids]), atol=1e-5)
        assert lib.metadata.captions_without_vectors() == [] and "embedded the captions" not in " ".join(lib.index([photos]).notes)


def test_a_caption_of_no_words_is_kept_but_never_embedded(tiny_itm_dir, tiny_captioner_dir, photos, tmp_path, monkeypatch):
    """A captioner with nothing to say ("", or marks that BLIP-2's normalisation drops) had its caption embedded
    like a real one, then fused into every search. The text is kept (the photo counts as captioned, so it is not
    captioned again each run) but no caption vector is written: at indexing, in the caption pass of photos
    indexed without captions, nor when the kept captions are embedded again after a re-embed."""
    from blip2_search.models.captioner import Blip2Captioner
    from tiny_models import make_tiny_itm

    for name in ("caption_pixels", "caption_vit"):  # every other photo of a batch gets a caption of no words
        real = getattr(Blip2Captioner, name)
        monkeypatch.setattr(Blip2Captioner, name, lambda self, *a, _real=real, **k: [
            ". ~" if i % 2 else text for i, text in enumerate(_real(self, *a, **k))])

    def blank_and_embedded(lib):
        records = lib.metadata.get_records([k.id for k in lib.metadata.known_files().values()])
        blank = {r.id for r in records if r.caption == ". ~"}
        embedded = {int(i) for ids, _ in lib.metadata.iter_caption_vectors() for i in ids}
        assert 0 < len(blank) < 7 and embedded == {r.id for r in records} - blank and lib.status().captioned == 7
        return blank

    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=str(tiny_captioner_dir), create=True, batch_size=4) as lib:
        lib.index([photos])
        blank = blank_and_embedded(lib)
    with _open(tmp_path / "later", tiny_itm_dir) as lib:
        lib.index([photos])
    with Library.open(tmp_path / "later", captioner=str(tiny_captioner_dir), batch_size=4) as lib:
        assert "captioned 7 photos indexed without captions" in lib.index([photos]).notes
        blank_and_embedded(lib)
        assert lib.index([photos]).notes == ()
    other = make_tiny_itm(tmp_path / "other", seed=5)
    with Library.open(tmp_path / "lib", model=str(other), captioner=False, reembed=True, batch_size=4) as lib:
        notes = lib.index([photos]).notes
        assert f"embedded the captions of {7 - len(blank)} photos that had none embedded (after a re-embed without captions)" in notes
        assert blank_and_embedded(lib) == blank
        assert "embedded the captions" not in " ".join(lib.index([photos]).notes)


def test_captioner_none_stops_captioning_for_good_and_keeps_written_captions(tiny_itm_dir, tiny_captioner_dir, photos, tmp_path):
    """`captioner="none"` (CLI `--captioner none`) forgets the library's captioner: later plain runs write no
    captions and backfill none; captions already written stay; naming a captioner again turns them back on."""
    lib_dir = tmp_path / "lib"
    with Library.open(lib_dir, model=str(tiny_itm_dir), captioner=str(tiny_captioner_dir), create=True, batch_size=4) as lib:
        lib.index([photos])
    _photo(photos / "new1.jpg", 201)
    with Library.open(lib_dir, captioner="none", batch_size=4) as lib:
        report = lib.index([photos])
        assert report.indexed == 1 and report.notes == ("the library no longer captions new photos (captions already written stay in "
                                                        "search); Library.open(FOLDER, captioner=C).index(PHOTO_DIRS) captions again",)
        assert lib.status().captioner is None and lib.status().captioned == 7
    _photo(photos / "new2.jpg", 202)
    with Library.open(lib_dir, batch_size=4) as lib:  # a plain run: no captions, no backfill
        report = lib.index([photos])
        assert report.indexed == 1 and report.notes == ()
        assert lib.status().captioned == 7
    result = CliRunner().invoke(main, ["status", "--library", str(lib_dir), "--json"])
    assert json.loads(result.output)["captioner"] is None
    with Library.open(lib_dir, captioner=str(tiny_captioner_dir), batch_size=4) as lib:
        lib.metadata.set_captioner(ModelRef(str(tiny_captioner_dir), None))
    result = CliRunner().invoke(main, ["index", str(photos), "--library", str(lib_dir), "--captioner", "none", "--no-captions", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["notes"] == [  # 'none' wins over a one-run switch; the CLI's command
        "the library no longer captions new photos (captions already written stay in search); index --captioner C captions again"], result.output
    with Library.open(lib_dir, captioner=str(tiny_captioner_dir), batch_size=4) as lib:
        assert "captioned 2 photos indexed without captions" in lib.index([photos]).notes
        assert lib.status().captioned == 9


def test_a_new_library_with_captioner_none_needs_no_captioner(tiny_itm_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_SEARCH_CAPTIONER", str(tmp_path / "no such captioner"))
    result = CliRunner().invoke(main, ["index", str(photos), "--library", str(tmp_path / "lib"), "--model", str(tiny_itm_dir),
                                       "--captioner", "none", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    with Library.open(tmp_path / "lib") as lib:
        assert lib.status().captioner is None and lib.status().captioned == 0 and lib.status().indexed == 7


@pytest.mark.parametrize("how", ["index the real folder after its alias", "index the alias after the real folder",
                                 "index the parent after a link to its subfolder"])
def test_a_photo_deleted_from_a_folder_indexed_under_another_name_leaves_search(tiny_itm_dir, tmp_path, how):
    """A folder indexed under one name (a symlink to it or to a folder inside it, or the folder behind a
    symlink), a photo deleted, the folder indexed under its other name: the deleted photo is marked deleted;
    the others keep their records (no second record each, which searched as duplicates)."""
    real, link = tmp_path / "real", tmp_path / "link"
    for i in range(3):
        _photo(real / "a" / f"q{i}.jpg", 60 + i)
    link.symlink_to(real / "a" if "subfolder" in how else real, target_is_directory=True)
    first, second = (real, link) if how == "index the alias after the real folder" else (link, real)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([first])
        ids = {Path(p).name: k.id for p, k in lib.metadata.known_files().items()}
    (real / "a" / "q0.jpg").unlink()
    with Library.open(lib_dir) as lib:
        report = lib.index([second])
        assert (report.deleted, report.reused) == (1, 2)
        known = lib.metadata.known_files()
        assert {Path(p).name: (k.id, k.status) for p, k in known.items()} == {
            "q0.jpg": (ids["q0.jpg"], "deleted"), "q1.jpg": (ids["q1.jpg"], "indexed"), "q2.jpg": (ids["q2.jpg"], "indexed")}
        assert {Path(h.path).name for h in lib.search("a photo", k=5, rerank=False, fusion=False).hits} == {"q1.jpg", "q2.jpg"}
        assert lib.index([second]).deleted == 0
    _check_consistent(lib_dir)


def _statuses(lib) -> dict[str, str]:
    return {os.path.relpath(p, lib.folder.parent): k.status for p, k in lib.metadata.known_files().items()}


def test_absent_folders_keep_their_photos_whatever_is_found_elsewhere(tiny_itm_dir, tmp_path):
    """Only a name that resolves to a folder of the run is an alias. A drive unplugged after one of its photos
    was copied home (the copy looks like a move of it), a folder split into two others indexed one at a time,
    a folder renamed: their other photos stay indexed (a renamed folder's deleted photo too: `prune --missing`)."""
    lib_dir = tmp_path / "lib"
    usb, home = tmp_path / "usb" / "Pictures", tmp_path / "home" / "Pictures"
    for name, seed in (("2019/a.jpg", 1), ("2019/b.jpg", 2), ("2020/c.jpg", 3)):
        _photo(usb / name, 100 + seed)
    inbox = tmp_path / "p" / "inbox"
    _photo(inbox / "x.jpg", 110)
    _photo(inbox / "y.jpg", 111)
    old = tmp_path / "old"
    _photo(old / "r0.jpg", 120)
    _photo(old / "r1.jpg", 121)
    with _open(lib_dir, tiny_itm_dir) as lib:
        for folder in (usb, inbox, old):
            lib.index([folder])
        ids = {Path(p).name: k.id for p, k in lib.metadata.known_files().items()}
    (home / "2019").mkdir(parents=True)
    shutil.copy2(usb / "2019" / "a.jpg", home / "2019" / "a.jpg")
    (tmp_path / "usb").rename(tmp_path / "unplugged")
    (tmp_path / "p" / "new").mkdir()
    (tmp_path / "p" / "archive").mkdir()
    (inbox / "x.jpg").rename(tmp_path / "p" / "new" / "x.jpg")
    (inbox / "y.jpg").rename(tmp_path / "p" / "archive" / "y.jpg")
    inbox.rmdir()
    (old / "r0.jpg").unlink()
    old.rename(tmp_path / "new name")
    with Library.open(lib_dir) as lib:
        assert lib.index([home]).deleted == 0
        assert lib.index([tmp_path / "p" / "new"]).deleted == 0
        assert lib.index([tmp_path / "p" / "archive"]).deleted == 0
        assert lib.index([tmp_path / "new name"]).deleted == 0
        assert _statuses(lib) == {"usb/Pictures/2019/b.jpg": "indexed", "usb/Pictures/2020/c.jpg": "indexed",
                                  "home/Pictures/2019/a.jpg": "indexed", "p/new/x.jpg": "indexed", "p/archive/y.jpg": "indexed",
                                  "old/r0.jpg": "indexed", "new name/r1.jpg": "indexed"}
        new_ids = {Path(p).name: k.id for p, k in lib.metadata.known_files().items()}
        assert (new_ids["a.jpg"], new_ids["x.jpg"], new_ids["y.jpg"], new_ids["r1.jpg"]) == (ids["a.jpg"], ids["x.jpg"], ids["y.jpg"], ids["r1.jpg"])
        assert lib.prune(missing=True).images == 3  # b, c (the drive, gone for good here) and r0


def test_a_photo_behind_an_unreadable_folder_of_an_alias_is_kept(tiny_itm_dir, tmp_path, monkeypatch):
    """Indexed through a symlink; then the real folder indexed while one of its subfolders cannot be read and
    a photo elsewhere was deleted: the deleted one goes, the unreadable folder's photo is kept as it was."""
    from blip2_search.indexing import scan as scan_module

    real, link = tmp_path / "real", tmp_path / "link"
    _photo(real / "a" / "q0.jpg", 130)
    _photo(real / "a" / "q1.jpg", 131)
    _photo(real / "locked" / "z.jpg", 132)
    link.symlink_to(real, target_is_directory=True)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([link])
    (real / "a" / "q0.jpg").unlink()
    locked = str(real / "locked")
    real_scandir, real_lstat = os.scandir, os.lstat

    def scandir(path):
        if os.path.normpath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    def lstat(path, *a, **kw):  # what a file behind a folder without permission gives (root reads everything)
        if f"{os.sep}locked{os.sep}" in str(path):
            raise PermissionError(13, "Permission denied", path)
        return real_lstat(path, *a, **kw)

    monkeypatch.setattr(scan_module.os, "scandir", scandir)
    monkeypatch.setattr(os, "lstat", lstat)
    with Library.open(lib_dir) as lib:
        assert lib.index([real]).deleted == 1
        monkeypatch.undo()
        assert _statuses(lib) == {"link/a/q0.jpg": "deleted", "real/a/q1.jpg": "indexed", "link/locked/z.jpg": "indexed",
                                  "real/locked": "failed"}  # the folder, with its reason


def test_a_search_opened_before_the_first_index_run_recorded_its_model_uses_that_model(tiny_itm_dir, photos, tmp_path, monkeypatch):
    """A search that opens a new library while its first `index` (another process) is still resolving the
    model finds no model recorded; by its first search one is: it must use that one, not the default
    checkpoint (which would be downloaded)."""
    monkeypatch.setenv("BLIP2_SEARCH_MODEL", str(tmp_path / "the default, never to be loaded"))
    lib_dir = tmp_path / "lib"
    open_metadata(lib_dir, create=True).close()  # what the indexing process has made so far
    with Library.open(lib_dir) as searcher:
        with _open(lib_dir, tiny_itm_dir) as indexer:
            indexer.index([photos])
        hits = searcher.search("a photo", k=3, rerank=False).hits
        assert len(hits) == 3 and searcher.encoder.name == str(tiny_itm_dir)


def test_a_backup_that_mirrors_the_whole_disk_is_no_alias_of_it(tiny_itm_dir, tmp_path, monkeypatch):
    """`cd BACKUP; index .` where BACKUP mirrors / : a found BACKUP/<path> sits at the same relative path as the
    recorded <path> under the name '' ('/'), and realpath('') is the current folder, BACKUP itself. That is no
    alias of the backup: an unplugged drive's photo stays, and the original photo keeps its record."""
    photos, usb, backup = tmp_path / "photos", tmp_path / "usb", tmp_path / "backup"
    _photo(photos / "x.jpg", 200)
    _photo(usb / "d.jpg", 201)
    mirror = backup / str(photos).lstrip(os.sep)
    mirror.mkdir(parents=True)
    shutil.copy2(photos / "x.jpg", mirror / "x.jpg")
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([photos])
        lib.index([usb])
    usb.rename(tmp_path / "unplugged")
    monkeypatch.chdir(backup)
    with Library.open(lib_dir) as lib:
        assert lib.index(["."]).deleted == 0
        statuses = _statuses(lib)
    assert statuses["usb/d.jpg"] == statuses["photos/x.jpg"] == statuses[os.path.relpath(mirror / "x.jpg", tmp_path)] == "indexed"


def test_a_hidden_folder_indexed_by_name_is_not_gone_when_its_parent_is_indexed(tiny_itm_dir, tmp_path):
    """`index` does not enter hidden folders ('.trip'); one named as a folder to index is indexed, and a later
    run on its parent must not take its photos for deleted. A photo deleted from it is found by its own run."""
    parent = tmp_path / "p"
    _photo(parent / "a.jpg", 210)
    _photo(parent / ".trip" / "x.jpg", 211)
    _photo(parent / ".trip" / "y.jpg", 212)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        lib.index([parent / ".trip"])
        report = lib.index([parent])
        assert (report.scanned, report.indexed, report.deleted) == (1, 1, 0)
        assert set(_statuses(lib).values()) == {"indexed"}
        (parent / ".trip" / "x.jpg").unlink()
        assert lib.index([parent]).deleted == 0
        assert lib.index([parent, parent / ".trip"]).deleted == 1  # both named: the hidden one is scanned, x is gone


def test_photos_behind_a_link_to_an_unplugged_drive_are_kept(tiny_itm_dir, tmp_path):
    """A folder of the photo library that is a symlink to a drive: unplugged (the link dangles), its photos
    are unreachable, not deleted, with a note; plugged back, nothing is embedded again. A photo deleted
    elsewhere in the same run is still found gone."""
    real, usb = tmp_path / "real", tmp_path / "usb"
    _photo(real / "a.jpg", 220)
    _photo(real / "b.jpg", 221)
    _photo(usb / "trip" / "d.jpg", 222)
    (real / "drive").symlink_to(usb, target_is_directory=True)
    lib_dir = tmp_path / "lib"
    with _open(lib_dir, tiny_itm_dir) as lib:
        assert lib.index([real]).indexed == 3
        usb.rename(tmp_path / "unplugged")
        (real / "b.jpg").unlink()
        report = lib.index([real])
        assert report.deleted == 1 and len(report.notes) == 1, report
        assert f"1 photo under {str(real / 'drive')!r}" in report.notes[0] and "Library.prune(missing=True)" in report.notes[0]
        assert _statuses(lib) == {"real/a.jpg": "indexed", "real/b.jpg": "deleted", "real/drive/trip/d.jpg": "indexed"}
        (tmp_path / "unplugged").rename(usb)
        report = lib.index([real])
        assert (report.unchanged, report.indexed, report.deleted, report.notes) == (2, 0, 0, ())

