"""Tests of the FAISS vector store against numpy brute force, its files, and the rebuild helper."""

from __future__ import annotations

import importlib
import json

import faiss
import numpy as np
import pytest

from blip2_search.errors import InvalidInputError, LibraryError
from blip2_search.store import (
    EXACT_FACTORY,
    EmbedderInfo,
    FailedFile,
    FaissVectorStore,
    IndexedImage,
    ModelRef,
    choose_index,
    exact_files,
    index_files,
    open_metadata,
    open_vectors,
    rebuild,
)
from blip2_search.store import index_choice, index_files
from blip2_search.store.index_files import sidecar_path


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(ids, vectors, queries, k, allowed=None, multi=False):
    """Independent ground truth: score every image, sort by (-score, id)."""
    ids = np.asarray(ids, dtype=np.int64)
    if allowed is not None:
        keep = np.isin(ids, allowed)
        ids, vectors = ids[keep], vectors[keep]
    out_ids, out_scores = [], []
    for query in queries:
        if multi:  # query [P, D]: mean over P of max over the image's Q vectors
            sims = np.einsum("nqd,pd->npq", vectors.astype(np.float64), query.astype(np.float64))
            scores = sims.max(axis=2).mean(axis=1)
        else:
            scores = (vectors.astype(np.float64) @ query.astype(np.float64)).max(axis=1)
        order = np.lexsort((ids, -scores))[: min(k, len(ids))]
        out_ids.append(ids[order])
        out_scores.append(scores[order])
    return np.array(out_ids, dtype=np.int64).reshape(len(queries), -1), np.array(out_scores).reshape(
        len(queries), -1
    )


def assert_same_ranking(got, expected, atol=1e-5):
    """Ids equal, except where two expected scores are within float32 rounding of each other."""
    (gids, gscores), (eids, escores) = got, expected
    assert gids.shape == eids.shape and gids.dtype == np.int64 and gscores.dtype == np.float32
    np.testing.assert_allclose(gscores, escores, atol=atol)
    for row in range(len(eids)):
        for col in range(eids.shape[1]):
            if gids[row, col] != eids[row, col]:
                near = np.abs(escores[row] - escores[row, col]) <= atol
                assert gids[row, col] in eids[row][near], (row, col)


@pytest.fixture(scope="module")
def library():
    rng = np.random.default_rng(42)
    n, q, d = 300, 4, 16
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)  # sparse, unordered ids
    vectors = unit(rng, n, q, d)
    vectors[10] = vectors[20]  # duplicate images: exact ties between two ids
    vectors[30] = vectors[20]
    store = FaissVectorStore(q, d, use_gpu=False)
    for start in range(0, n, 128):
        store.add(ids[start : start + 128], vectors[start : start + 128])
    return store, ids, vectors, unit(rng, 25, d)  # 25 queries: FAISS's BLAS code path (>= 20)


@pytest.mark.parametrize("k", [1, 5, 37, 299, 300, 1000])
def test_search_equals_brute_force(library, k):
    store, ids, vectors, queries = library
    assert len(store) == 300 and store.ntotal == 1200
    result = store.search(queries, k)
    assert result[0].shape == (25, min(k, 300))
    assert_same_ranking(result, brute_force(ids, vectors, queries, k))


def test_ties_are_broken_by_ascending_id(library):
    store, ids, vectors, _ = library
    query = vectors[20][0][None, :]  # scores exactly 1.0 for the three identical images
    got_ids, got_scores = store.search(query, 3)
    assert got_ids[0].tolist() == sorted(ids[[10, 20, 30]].tolist())
    assert got_scores[0, 0] == got_scores[0, 1] == got_scores[0, 2]


def test_all_tied_images_need_the_deeper_search():
    rng = np.random.default_rng(1)
    q, d, n = 4, 8, 60
    store = FaissVectorStore(q, d, use_gpu=False)
    ids = rng.permutation(np.arange(1000, 1000 + n)).astype(np.int64)
    store.add(ids, np.broadcast_to(unit(rng, 1, q, d), (n, q, d)))  # every image identical
    got, _ = store.search(unit(rng, 2, d), 5)
    assert got.tolist() == [list(range(1000, 1005))] * 2
    for lists in (False, True):
        store.multi_vector_lists = lists
        got, _ = store.search_vectors(unit(rng, 1, 3, d), 5)
        assert got.tolist() == [list(range(1000, 1005))]


def test_filtered_search_is_inside_the_search(library):
    store, ids, vectors, queries = library
    rng = np.random.default_rng(7)
    allowed = np.concatenate(
        [rng.choice(ids, 40, replace=False), np.array([5, 17], dtype=np.int64)]
    )  # 2 unknown
    for k in (1, 10, 40, 100):
        got = store.search(queries, k, allowed_ids=allowed)
        assert got[0].shape == (25, min(k, 40))
        assert_same_ranking(got, brute_force(ids, vectors, queries, k, allowed=allowed))
    # the allowed images are the worst for query 0: truncating to k first would find none
    worst = brute_force(ids, vectors, queries[:1], 300)[0][0][-3:]
    got, _ = store.search(queries[:1], 2, allowed_ids=worst)
    assert set(got[0].tolist()) <= set(worst.tolist()) and got.shape == (1, 2)
    empty = store.search(queries, 5, allowed_ids=np.array([], dtype=np.int64))
    assert empty[0].shape == (25, 0) and empty[1].shape == (25, 0)


@pytest.mark.parametrize("lists", [False, True], ids=["direct", "candidate-lists"])
@pytest.mark.parametrize("k", [1, 3, 12, 300, 400])
def test_search_vectors_equals_brute_force(library, k, lists, monkeypatch):
    store, ids, vectors, _ = library
    monkeypatch.setattr(store, "multi_vector_lists", lists)
    rng = np.random.default_rng(k)
    queries = unit(rng, 3, 4, 16)
    assert_same_ranking(store.search_vectors(queries, k), brute_force(ids, vectors, queries, k, multi=True))
    allowed = rng.choice(ids, 50, replace=False)
    got = store.search_vectors(queries, k, allowed_ids=allowed)
    assert_same_ranking(got, brute_force(ids, vectors, queries, k, allowed=allowed, multi=True))


@pytest.mark.parametrize("lists", [False, True])
def test_search_vectors_with_one_query_vector_equals_search(library, lists, monkeypatch):
    store, _, _, queries = library
    monkeypatch.setattr(store, "multi_vector_lists", lists)
    single = store.search(queries[:4], 20)
    multi = store.search_vectors(queries[:4, None, :], 20)
    np.testing.assert_array_equal(single[0], multi[0])
    np.testing.assert_allclose(single[1], multi[1], atol=1e-5)


def test_storage_not_grouped_per_image_is_still_scored_right():
    rng = np.random.default_rng(9)
    q, d, n = 3, 8, 40
    ids, vectors = np.arange(n, dtype=np.int64) * 7, unit(rng, n, q, d)
    store = FaissVectorStore(q, d, use_gpu=False)
    order = rng.permutation(n * q)  # e.g. an index file written by another tool, vectors interleaved
    vector_ids = (ids[:, None] * q + np.arange(q)).reshape(-1)
    store._index.add_with_ids(vectors.reshape(-1, d)[order], vector_ids[order])
    store._image_ids.update(ids.tolist())
    queries = unit(rng, 2, 2, d)
    assert_same_ranking(store.search_vectors(queries, 10), brute_force(ids, vectors, queries, 10, multi=True))


def test_cpu_scan_in_many_chunks_keeps_ties_at_the_cut(monkeypatch):
    from blip2_search.store import scoring

    monkeypatch.setattr(scoring, "_SCAN_CHUNK_FLOATS", 40)  # 10 images of Q=4 per matrix product
    rng = np.random.default_rng(8)
    q, d, n = 4, 8, 57
    ids = rng.permutation(n).astype(np.int64) * 5 + 1
    vectors = unit(rng, n, q, d)
    vectors[[3, 20, 44, 50]] = vectors[9]  # five identical images across chunks
    store = FaissVectorStore(q, d, use_gpu=False)
    store.add(ids, vectors)
    query = vectors[9][:1]
    got, scores = store.search(query, 2)  # the cut falls inside the tie: lowest ids win
    assert got[0].tolist() == sorted(ids[[3, 9, 20, 44, 50]].tolist())[:2] and scores[0, 0] == scores[0, 1]
    queries = unit(rng, 3, d)
    assert_same_ranking(store.search(queries, 20), brute_force(ids, vectors, queries, 20))
    allowed = ids[::3]
    assert_same_ranking(
        store.search(queries, 7, allowed_ids=allowed), brute_force(ids, vectors, queries, 7, allowed=allowed)
    )


def test_blip2_shape_32x256():
    rng = np.random.default_rng(3)
    ids, vectors, queries = np.arange(64, dtype=np.int64), unit(rng, 64, 32, 256), unit(rng, 3, 256)
    store = FaissVectorStore(32, 256, use_gpu=False)
    store.add(ids, vectors)
    assert_same_ranking(store.search(queries, 10), brute_force(ids, vectors, queries, 10))


def test_add_replaces_remove_and_validation():
    rng = np.random.default_rng(5)
    store = FaissVectorStore(2, 4, use_gpu=False)
    v = unit(rng, 3, 2, 4)
    store.add(np.array([1, 2, 3]), v)
    store.add(np.array([2]), -v[1:2])  # replace image 2
    assert len(store) == 3 and store.ntotal == 6
    got, scores = store.search(v[1, :1], 3)
    assert got[0, -1] == 2 and np.isclose(scores[0, -1], (-v[1] @ v[1, 0]).max(), atol=1e-6)
    assert store.remove(np.array([2, 99])) == 1 and len(store) == 2 and store.image_ids().tolist() == [1, 3]
    assert store.present(np.array([3, 2, 99, 1, 3])).tolist() == [1, 3] and store.present(np.array([], np.int64)).tolist() == []
    assert_same_ranking(store.search(v[0, :1], 5), brute_force([1, 3], v[[0, 2]], v[0, :1], 5))
    for bad in [
        lambda: store.add(np.array([1]), unit(rng, 1, 3, 4)),
        lambda: store.add(np.array([4, 4]), unit(rng, 2, 2, 4)),
        lambda: store.add(np.array([-1]), unit(rng, 1, 2, 4)),
        lambda: store.add(np.array([5]), np.full((1, 2, 4), np.nan, dtype=np.float32)),
        lambda: store.search(unit(rng, 2, 5), 3),
        lambda: store.search_vectors(unit(rng, 2, 4), 3),
        lambda: FaissVectorStore(2, 4, factory="IVF16,PQ2x4fs"),
    ]:
        with pytest.raises(InvalidInputError):
            bad()
    store.reset()
    assert len(store) == 0 and store.search(v[0, :1], 3)[0].shape == (1, 0)


def test_choose_index_is_a_pure_budget_decision():
    flat = 1000 * (32 * (4 * 256 + 48) + 64)  # vectors, IDMap2 ids and the id set
    assert choose_index(1000, 32, 256, flat) == EXACT_FACTORY
    assert choose_index(1000, 32, 256, flat - 1) == "IVF32,PQ64x4fs"  # 32 B codes + 8 B ids a vector
    assert choose_index(10**6, 32, 256, 10**6 * (32 * 40 + 8)) == "IVF1024,PQ64x4fs"
    with pytest.raises(InvalidInputError, match="raise the memory budget"):
        choose_index(10**6, 32, 256, 10**6)


# -- files ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_staleness(library, tmp_path):
    store, ids, vectors, queries = library
    path = tmp_path / "vectors.faiss"
    info = store.save(path, generation=7)
    assert info.images == 300 and info.vectors == 1200 and info.faiss_version == faiss.__version__
    data = tmp_path / info.params["data"]
    assert info.index_bytes == data.stat().st_size == 300 * 4 * 16 * 4 and sidecar_path(path).exists()
    assert np.fromfile(tmp_path / info.params["ids"], dtype=np.int64).tolist() == store.stored()[0].tolist()
    loaded = FaissVectorStore.load(path, expected_generation=7, num_query_tokens=4, dim=16, use_gpu=False)
    assert loaded.ok and len(loaded.store) == 300
    np.testing.assert_array_equal(loaded.store.search(queries, 30)[0], store.search(queries, 30)[0])
    stale = FaissVectorStore.load(path, expected_generation=8, num_query_tokens=4, dim=16)
    assert stale.state == "stale" and stale.store is None and "generation 7" in stale.reason
    assert FaissVectorStore.load(path, expected_generation=7, num_query_tokens=8, dim=16).state == "invalid"
    assert (
        FaissVectorStore.load(
            tmp_path / "none.faiss", expected_generation=7, num_query_tokens=4, dim=16
        ).state
        == "missing"
    )
    sidecar_path(path).write_text("{not json")
    assert FaissVectorStore.load(path, expected_generation=7, num_query_tokens=4, dim=16).state == "invalid"


@pytest.mark.parametrize("params", [None, [], "x"])
def test_a_sidecar_whose_params_are_not_an_object_is_rebuilt_not_a_crash(library, tmp_path, params):
    """Damage that leaves the sidecar valid JSON ("params": null) crashed every search with an AttributeError."""
    store, _, _, queries = library
    path = tmp_path / "vectors.faiss"
    store.save(path, generation=7)
    sidecar = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**sidecar, "params": params}))
    assert FaissVectorStore.load(path, expected_generation=7, num_query_tokens=4, dim=16).state == "invalid"
    store.save(path, generation=7)  # the rebuild's save reads the old sidecar to tidy its files
    loaded = FaissVectorStore.load(path, expected_generation=7, num_query_tokens=4, dim=16, use_gpu=False)
    assert loaded.ok and len(loaded.store) == 300


def test_a_crash_during_save_leaves_the_old_files_valid(library, tmp_path, monkeypatch):
    """A save writes new files under new names and commits by replacing the sidecar: a crash at any of its
    three writes leaves the previous save readable (and the next save removes what the crash left)."""
    store, ids, vectors, queries = library
    path = tmp_path / "vectors.faiss"
    small = FaissVectorStore(4, 16, use_gpu=False)
    small.add(ids[:5], vectors[:5])
    small.save(path, generation=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    real_replace = index_files.os.replace
    for crash_at in (1, 2, 3):  # the data file, the ids file, the sidecar
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == crash_at:
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)

        monkeypatch.setattr(index_files.os, "replace", replace)
        with pytest.raises(LibraryError, match="cannot save vector index .*free disk space"):
            store.save(path, generation=2)
        monkeypatch.undo()
        old = FaissVectorStore.load(path, expected_generation=1, num_query_tokens=4, dim=16)
        assert old.ok and old.store.image_ids().tolist() == sorted(ids[:5].tolist())
        assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    store.save(path, generation=2)
    after = sorted(p.name for p in tmp_path.iterdir())
    assert len(after) == len(before) == 4 and not set(after) & (set(before) - {"vectors.faiss.json", "vectors.faiss.lock"})


def _same_size_stores(seed: int = 5) -> tuple[FaissVectorStore, FaissVectorStore]:
    """Two exact stores of the same images (same file size) with different vectors."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, 41, dtype=np.int64)
    stores = []
    for _ in range(2):
        store = FaissVectorStore(4, 16, use_gpu=False)
        store.add(ids, unit(rng, 40, 4, 16))
        stores.append(store)
    return stores[0], stores[1]


def _pause_after_first_write(monkeypatch, entered, release):
    """Make `atomic_write` stop between a save's data file and its ids and sidecar."""
    real = exact_files.atomic_write
    seen = []

    def atomic_write(path, write):
        real(path, write)
        seen.append(path)
        if len(seen) == 1:
            entered.set()
            assert release.wait(10)

    monkeypatch.setattr(exact_files, "atomic_write", atomic_write)


def test_two_saves_at_once_never_pair_one_index_with_the_others_sidecar(tmp_path, monkeypatch):
    """An index run and a search that rebuilt a stale file may save at once: the second save waits
    for the first one's writes, so the files on disk always come from one save."""
    import threading

    newer, older = _same_size_stores()
    path = tmp_path / "vectors.faiss"
    entered, release = threading.Event(), threading.Event()
    _pause_after_first_write(monkeypatch, entered, release)
    first = threading.Thread(target=lambda: newer.save(path, generation=6))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=lambda: older.save(path, generation=5))
    second.start()
    second.join(1.0)  # without the lock it writes both files now, between the first save's two
    release.set()
    first.join(10)
    second.join(10)
    generation = index_files.saved_generation(path)
    loaded = FaissVectorStore.load(path, expected_generation=generation, num_query_tokens=4, dim=16)
    assert loaded.ok
    expected = {6: newer, 5: older}[generation]
    np.testing.assert_array_equal(loaded.store.stored()[1], expected.stored()[1])


def test_a_read_never_pairs_a_sidecar_with_a_later_saves_index(tmp_path, monkeypatch):
    """A process reading the index while another saves gets the files of one save (the saver removes the
    files its sidecar no longer names: without the lock, the reader's data file would be gone)."""
    import threading

    current, other = _same_size_stores(6)
    path = tmp_path / "vectors.faiss"
    current.save(path, generation=6)
    entered, release = threading.Event(), threading.Event()
    real_open = exact_files._open_data

    def open_data(name, *args):  # the sidecar and the row ids have been read: pause before the data file
        entered.set()
        assert release.wait(10)
        return real_open(name, *args)

    monkeypatch.setattr(exact_files, "_open_data", open_data)
    results = []
    reader = threading.Thread(
        target=lambda: results.append(FaissVectorStore.load(path, expected_generation=6, num_query_tokens=4, dim=16))
    )
    reader.start()
    assert entered.wait(10)
    writer = threading.Thread(target=lambda: other.save(path, generation=5))
    writer.start()
    writer.join(1.0)  # without the lock it replaces both files now, under the reader
    release.set()
    reader.join(10)
    writer.join(10)
    (loaded,) = results
    assert loaded.ok
    np.testing.assert_array_equal(loaded.store.stored()[1], current.stored()[1])


def test_the_lock_file_is_as_writable_as_its_folder_and_a_file_system_without_locks_still_works(tmp_path, monkeypatch):
    """A group-writable library: another member must be able to lock (and so save). Where flock fails
    (some network mounts), saving and reading go on unlocked, as before the lock existed."""
    import errno
    import threading

    store, _ = _same_size_stores(7)
    tmp_path.chmod(0o2775)
    path = tmp_path / "vectors.faiss"
    store.save(path, generation=3)
    assert index_files.lock_path(path).stat().st_mode & 0o777 == 0o664

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(index_files.fcntl, "flock", no_locks)
    store.save(path, generation=4)
    assert FaissVectorStore.load(path, expected_generation=4, num_query_tokens=4, dim=16).ok
    monkeypatch.undo()

    # an index run's clean-up of killed saves waits for a save in progress instead of deleting its temporary
    entered, release = threading.Event(), threading.Event()
    real_write = exact_files.atomic_write

    def slow_write(target, write):  # pauses with the data file's temporary written, not yet renamed
        def pausing(temporary):
            write(temporary)
            if not entered.is_set():
                entered.set()
                assert release.wait(10)

        real_write(target, pausing)

    monkeypatch.setattr(exact_files, "atomic_write", slow_write)
    errors = []
    saver = threading.Thread(target=lambda: _call_recording(errors, store.save, path, generation=5))
    saver.start()
    assert entered.wait(10)
    cleaner = threading.Thread(target=index_files.remove_leftovers, args=(path,))
    cleaner.start()
    cleaner.join(1.0)  # without waiting it deletes the save's temporary now
    release.set()
    saver.join(10)
    cleaner.join(10)
    assert errors == [] and index_files.saved_generation(path) == 5


def _call_recording(errors: list, function, *args, **kwargs) -> None:
    try:
        function(*args, **kwargs)
    except Exception as error:  # the test asserts there was none
        errors.append(error)


# -- rebuild from the metadata store -------------------------------------------------------------------


def test_rebuild_and_open_vectors_follow_the_metadata_generation(tmp_path, metadata_location):
    rng = np.random.default_rng(11)
    q, d = 4, 16
    (tmp_path / "lib").mkdir(exist_ok=True)
    meta = open_metadata(metadata_location, create=True, embedder=EmbedderInfo(ModelRef("m"), q, d))
    vectors = unit(rng, 30, q, d)
    ids = meta.upsert_indexed(
        [IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"h{i}", vectors=vectors[i]) for i in range(30)]
    )
    meta.mark_deleted(ids[:3])
    store = FaissVectorStore(q, d, use_gpu=False)
    store.add(np.array([999_999]), vectors[:1])  # rebuild starts from empty
    generation = rebuild(meta, store, chunk_size=8)
    assert generation == meta.vectors_generation() and store.image_ids().tolist() == sorted(ids[3:])
    queries = unit(rng, 4, d)
    assert_same_ranking(store.search(queries, 10), brute_force(ids[3:], vectors[3:], queries, 10))

    index_path = tmp_path / "lib" / "vectors.faiss"
    first = open_vectors(meta, index_path, use_gpu=False)
    assert first.rebuilt_because is not None and "no vector index" in first.rebuilt_because
    second = open_vectors(meta, index_path, use_gpu=False)
    assert second.rebuilt_because is None and len(second.store) == 27
    meta.mark_deleted(ids[3:4])
    third = open_vectors(meta, index_path, use_gpu=False)  # brought up to date from the change journal
    assert third.rebuilt_because is None and third.generation == meta.vectors_generation() and len(third.store) == 26
    meta.mark_deleted(ids[4:5])
    meta.forget_vector_changes(meta.vectors_generation())  # a journal that no longer reaches back to the file
    fourth = open_vectors(meta, index_path, use_gpu=False)
    assert "generation" in fourth.rebuilt_because and len(fourth.store) == 25
    with pytest.raises(LibraryError, match="shape"):
        rebuild(meta, FaissVectorStore(q, d + 1, use_gpu=False))
    meta.close()


def _behind_the_database(tmp_path, metadata_location, kind, monkeypatch):
    """A library of 200 images whose index file was saved, then 20 images added, 2 deleted, 3 repainted (new
    content), 1 failed and 1 replaced by a rename: ``(meta, index_path, open_kw, saved generation, ids)``."""
    rng = np.random.default_rng(12)
    q, d = 4, 16
    (tmp_path / "lib").mkdir(exist_ok=True)
    meta = open_metadata(metadata_location, create=True, embedder=EmbedderInfo(ModelRef("m"), q, d))
    assert meta.embedder_since() == meta.vectors_generation()
    vectors = unit(rng, 225, q, d)
    ids = meta.upsert_indexed([IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"h{i}", vectors=vectors[i]) for i in range(200)])
    index_path = tmp_path / "lib" / "vectors.faiss"
    if kind == "trained":  # compact codes from 100 images on (else exact vectors below the threshold)
        monkeypatch.setattr(index_choice, "COMPACT_MIN_IMAGES", 100)
    open_kw = {"kind": "exact" if kind == "exact" else "compact", "use_gpu": False, "save": False}
    saved = open_vectors(meta, index_path, **{**open_kw, "save": True}).generation
    meta.upsert_indexed([IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"h{i}", vectors=vectors[i]) for i in range(200, 220)])
    meta.mark_deleted(ids[:2])
    meta.upsert_indexed([IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"new{i}", vectors=vectors[217 + i]) for i in range(3, 6)])
    meta.mark_failed([FailedFile(str(tmp_path / "6.jpg"), "cut short")])
    meta.rename([(ids[8], str(tmp_path / "7.jpg"))])  # 7.jpg's row is replaced by 8.jpg's photo
    return meta, index_path, open_kw, saved, ids


def _live(meta) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(sorted(k.id for k in meta.known_files().values() if k.status == "indexed"), dtype=np.int64)
    return ids, meta.vectors_for(ids)


@pytest.mark.parametrize("kind", ["exact", "lazy", "compact", "trained"])
def test_a_file_behind_the_database_is_brought_up_to_date_from_the_change_journal(tmp_path, metadata_location, kind, monkeypatch):
    """A process that finds the index file behind the database (a run killed before its last save; a reader beside a
    running `index`, which saves as it goes) rebuilt the whole index from the database (37 s at 100k photos) or served
    the file as it was: now the file is brought to the database's generation from the journal of what changed since,
    reading only those images' vectors."""
    rebuild_module = importlib.import_module("blip2_search.store.rebuild")
    meta, index_path, open_kw, saved, ids = _behind_the_database(tmp_path, metadata_location, kind, monkeypatch)
    current = meta.vectors_generation()
    with monkeypatch.context() as no_rebuild:
        no_rebuild.setattr(rebuild_module, "rebuild", lambda *a, **k: pytest.fail("rebuilt from the database"))
        opened = open_vectors(meta, index_path, **{**open_kw, "save": True, "lazy": kind == "lazy"})
    assert (opened.generation, opened.rebuilt_because, opened.unsaved) == (current, None, None)
    assert index_files.saved_generation(index_path) == current  # and saved: the next process loads it as it is
    live_ids, live_vectors = _live(meta)
    assert len(live_ids) == 200 + 20 - 2 - 1 - 1 and sorted(opened.store.image_ids().tolist()) == live_ids.tolist()
    rng = np.random.default_rng(5)
    queries = unit(rng, 6, 16)
    if kind != "trained":  # exact vectors: every image as the database has it now (the repainted ones too)
        np.testing.assert_array_equal(opened.store.vectors_for(live_ids), live_vectors)
    assert_same_ranking(opened.store.search(queries, 10), brute_force(live_ids, live_vectors, queries, 10), atol=1e-4)
    again = open_vectors(meta, index_path, **open_kw)
    assert again.rebuilt_because is None and sorted(again.store.image_ids().tolist()) == live_ids.tolist()
    assert_same_ranking(again.store.search(queries, 10), brute_force(live_ids, live_vectors, queries, 10), atol=1e-4)
    meta.close()


@pytest.mark.parametrize("kind", ["exact", "compact", "trained"])
def test_a_file_behind_a_journal_that_moved_on_is_used_as_it_is_beside_a_running_index(tmp_path, metadata_location, kind, monkeypatch):
    """Beside a running `index` whose journal no longer reaches back to the file (it saved again since), or names more
    photos than it pays to read now, a reader uses the file as it is (its own generation, no rebuild, nothing saved); never a file older than the embedder's
    vectors (a `--reembed` run's first minutes: that file holds the old model's vectors)."""
    meta, index_path, open_kw, saved, ids = _behind_the_database(tmp_path, metadata_location, kind, monkeypatch)
    since = meta.embedder_since()
    with monkeypatch.context() as busy:  # more changes than it pays to read now (a run on a GPU between two saves)
        busy.setattr(importlib.import_module("blip2_search.store.rebuild"), "BESIDE_CATCH_UP_MIN", 1)
        assert open_vectors(meta, index_path, behind_from=since, **open_kw).generation == saved
        assert open_vectors(meta, index_path, **open_kw).generation == meta.vectors_generation()  # no run: brought up to date
    meta.forget_vector_changes(saved + 1)
    behind = open_vectors(meta, index_path, behind_from=since, **open_kw)
    assert (behind.generation, behind.rebuilt_because) == (saved, None) and sorted(behind.store.image_ids().tolist()) == sorted(ids)
    assert getattr(behind.store, "trained", False) == (kind == "trained")
    if kind == "trained":  # a long first run's saves outgrow the lists it trained (review: every reader rebuilt, retrained)
        from blip2_search.store.compact import CompactVectorStore

        with monkeypatch.context() as grown:
            grown.setattr(CompactVectorStore, "needs_retraining", lambda self: True)
            assert open_vectors(meta, index_path, behind_from=since, **open_kw).rebuilt_because is None
    assert index_files.saved_generation(index_path) == saved  # nothing written
    live_ids, _ = _live(meta)
    current = open_vectors(meta, index_path, **open_kw)  # not asked to: rebuilt from the database
    assert current.generation == meta.vectors_generation() and current.rebuilt_because is not None
    assert sorted(current.store.image_ids().tolist()) == live_ids.tolist()
    assert open_vectors(meta, index_path, behind_from=saved + 1, **open_kw).rebuilt_because is not None
    meta.reset_embedder(EmbedderInfo(ModelRef("another"), 4, 16))  # a re-embed: the file holds the old model's vectors
    assert meta.embedder_since() == meta.vectors_generation() > saved
    after = open_vectors(meta, index_path, behind_from=meta.embedder_since(), **open_kw)
    assert after.rebuilt_because is not None and len(after.store) == 0
    meta.close()


def test_a_reader_that_brings_a_file_up_to_date_writes_new_files_not_over_a_runs_rows(tmp_path, metadata_location, monkeypatch):
    """Only the holder of the library's lock may append to the index's data file: an index run writes rows past the
    committed ones as it goes (over 256 MB of added vectors), which a reader's append of its caught-up file (a run
    that started after the reader looked for one) overwrote; the run's next save then copied the reader's vectors
    as its photos'. A reader writes new files instead."""
    vectors_module = importlib.import_module("blip2_search.store.vectors")
    meta, index_path, open_kw, saved, ids = _behind_the_database(tmp_path, metadata_location, "exact", monkeypatch)
    current = meta.vectors_generation()
    run = FaissVectorStore.load(index_path, expected_generation=saved, num_query_tokens=4, dim=16, use_gpu=False, lazy=True).store
    monkeypatch.setattr(vectors_module, "PENDING_BYTES", 0)  # the run's added rows go to the data file at once
    added = unit(np.random.default_rng(9), 3, 4, 16)
    run.add(np.array([9001, 9002, 9003]), added)
    reader = open_vectors(meta, index_path, **{**open_kw, "save": True})  # caught up and saved back
    assert (reader.generation, reader.rebuilt_because) == (current, None)
    run.save(index_path, generation=current + 1)
    reopened = FaissVectorStore.load(index_path, expected_generation=current + 1, num_query_tokens=4, dim=16, use_gpu=False).store
    np.testing.assert_array_equal(reopened.vectors_for(np.array([9001, 9002, 9003])), added)
    meta.close()


def test_a_run_saving_while_a_reader_opens_its_last_save_leaves_the_reader_the_newer_file(tmp_path, metadata_location, monkeypatch):
    """The reader reads the sidecar, then the file at the sidecar's generation: a run beside that saved in between
    made that second read stale, and the reader rebuilt the whole index from the database (stress test)."""
    rebuild_module = importlib.import_module("blip2_search.store.rebuild")
    meta, index_path, open_kw, saved, ids = _behind_the_database(tmp_path, metadata_location, "exact", monkeypatch)
    real_load, real_rebuild, calls = FaissVectorStore.load.__func__, rebuild_module.rebuild, []

    def load_while_a_run_saves(cls, path, **kw):
        calls.append(kw["expected_generation"])
        if len(calls) == 2:  # between the reader's two reads, the run saves what it has committed
            store = FaissVectorStore(4, 16, use_gpu=False)
            store.save(path, generation=real_rebuild(meta, store))
        return real_load(cls, path, **kw)

    monkeypatch.setattr(FaissVectorStore, "load", classmethod(load_while_a_run_saves))
    monkeypatch.setattr(rebuild_module, "rebuild", lambda *a, **k: pytest.fail("rebuilt from the database"))
    opened = open_vectors(meta, index_path, behind_from=meta.embedder_since(), **open_kw)
    current = meta.vectors_generation()
    assert calls == [current, saved, current] and (opened.generation, opened.rebuilt_because) == (current, None)
    assert sorted(opened.store.image_ids().tolist()) == _live(meta)[0].tolist()
    meta.close()


def test_a_current_compact_file_that_needs_retraining_serves_beside_a_running_index(tmp_path, metadata_location, monkeypatch):
    """A run's saves outgrow the lists it trained: beside it, readers rebuilt (and retrained) the index at every open
    of a current file (stress test; last session fixed it for a file behind the database); the run retrains it."""
    from blip2_search.store.compact import CompactVectorStore

    meta, index_path, open_kw, saved, ids = _behind_the_database(tmp_path, metadata_location, "trained", monkeypatch)
    assert open_vectors(meta, index_path, **{**open_kw, "save": True}).generation == meta.vectors_generation()  # current
    monkeypatch.setattr(CompactVectorStore, "needs_retraining", lambda self: True)
    beside = open_vectors(meta, index_path, behind_from=meta.embedder_since(), **open_kw)
    assert beside.rebuilt_because is None and beside.store.trained
    assert "trained for far fewer" in open_vectors(meta, index_path, **open_kw).rebuilt_because  # no run beside: retrained now
    meta.close()


def test_the_change_journal_names_the_images_each_write_changed(tmp_path, metadata_location):
    """Each write that changes the live vectors journals the images it changed; a change of every image (a re-embed,
    another index kind) journals none in particular, so no file saved before it is brought up to date."""
    rng = np.random.default_rng(3)
    q, d = 2, 8
    (tmp_path / "lib").mkdir(exist_ok=True)
    meta = open_metadata(metadata_location, create=True, embedder=EmbedderInfo(ModelRef("m"), q, d))
    start = meta.vectors_generation()

    def changed_since(generation):
        with meta.vector_changes(generation) as changes:
            return changes.covered, sorted(changes.changed.tolist()), changes.generation, changes.count

    ids = meta.upsert_indexed([IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"h{i}", vectors=unit(rng, q, d)) for i in range(6)])
    assert changed_since(start) == (True, sorted(ids), start + 1, 6)
    step = meta.vectors_generation()
    meta.mark_deleted([ids[0], 10_000])
    meta.mark_failed([FailedFile(str(tmp_path / "1.jpg"), "gone bad"), FailedFile(str(tmp_path / "new.jpg"), "bad")])
    meta.rename([(ids[2], str(tmp_path / "3.jpg"))])  # replaces 3.jpg's row
    meta.rename([(ids[4], str(tmp_path / "elsewhere.jpg"))])  # a move: its vectors stay, nothing changes
    assert changed_since(step) == (True, [ids[0], ids[1], ids[3]], step + 3, 3)
    meta.mark_deleted([ids[0]])  # already deleted: no change
    assert meta.vectors_generation() == step + 3
    meta.set_vector_index("compact")
    assert changed_since(step)[0] is False and changed_since(step + 4)[:2] == (True, [])
    meta.forget_vector_changes(step + 1)
    assert changed_since(step)[0] is False and changed_since(step + 1)[0] is False  # the journal starts past it
    meta.forget_vector_changes(step)  # never back
    assert changed_since(step + 4)[0] is True
    meta.reset_embedder(EmbedderInfo(ModelRef("other"), q, d))
    assert changed_since(step + 4)[0] is False
    meta.close()


def test_a_library_from_before_the_change_journal_journals_from_its_migration_on(tmp_path, metadata_location):
    """Schema v3 adds the journal: a file saved before the migration and behind it is rebuilt (nothing says what
    changed since), one saved after it is brought up to date, unless an older version wrote since (no journal)."""
    from sqlalchemy import text

    rng = np.random.default_rng(4)
    (tmp_path / "lib").mkdir(exist_ok=True)
    index_path = tmp_path / "lib" / "vectors.faiss"
    embedder = EmbedderInfo(ModelRef("m"), 2, 8)
    meta = open_metadata(metadata_location, create=True, embedder=embedder)
    ids = meta.upsert_indexed([IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"h{i}", vectors=unit(rng, 2, 8)) for i in range(5)])
    open_vectors(meta, index_path, use_gpu=False)
    meta.mark_deleted(ids[:1])
    with meta._engine.begin() as connection:  # the library as schema v2 left it
        connection.execute(text("DROP TABLE vector_changes"))
        connection.execute(text("DELETE FROM library_info WHERE key = 'changes_since'"))
        connection.execute(text("UPDATE library_info SET value = '2' WHERE key = 'schema_version'"))
    meta.close()
    meta = open_metadata(metadata_location, create=False, embedder=embedder)
    assert meta.info().schema_version == 3
    assert "generation" in open_vectors(meta, index_path, use_gpu=False).rebuilt_because
    meta.mark_deleted(ids[1:2])
    caught_up = open_vectors(meta, index_path, use_gpu=False)
    assert caught_up.rebuilt_because is None and sorted(caught_up.store.image_ids().tolist()) == sorted(ids[2:])
    meta.mark_deleted(ids[2:3])
    with meta._engine.begin() as connection:  # an older blip2-search, still running when this one migrated, deletes
        connection.execute(text("UPDATE images SET status = 'deleted' WHERE id = :i"), {"i": ids[3]})  # without a journal
        connection.execute(text("UPDATE library_info SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'vectors_generation'"))
    rebuilt = open_vectors(meta, index_path, use_gpu=False)
    assert "generation" in rebuilt.rebuilt_because and sorted(rebuilt.store.image_ids().tolist()) == sorted(ids[4:])
    meta.close()


def test_a_library_from_before_the_embedder_generation_records_it_at_its_next_index_run(tmp_path):
    """Libraries made before `embedder_since` was kept have none: no file behind the database is used (it may
    predate an interrupted `--reembed`) until a run records one, past every file saved before it."""
    from blip2_search.store import updates
    from blip2_search.store.schema import INFO_EMBEDDER_SINCE

    embedder = EmbedderInfo(ModelRef("m"), 4, 16)
    meta = open_metadata(tmp_path / "lib", create=True, embedder=embedder)
    meta.upsert_indexed([IndexedImage(str(tmp_path / "a.jpg"), 1, 1, "h", vectors=unit(np.random.default_rng(1), 1, 4, 16)[0])])
    with meta._write() as connection:
        updates._set_info(connection, {INFO_EMBEDDER_SINCE: None})
    assert meta.embedder_since() is None
    meta.ensure_embedder(embedder)  # an index run
    assert meta.embedder_since() == meta.vectors_generation() + 1
    meta.close()


@pytest.mark.skipif(
    faiss.get_num_gpus() == 0, reason="no GPU on this machine: the GPU search path is untested here"
)
def test_gpu_search_equals_cpu(library):
    store, ids, vectors, queries = library
    gpu = FaissVectorStore(4, 16, use_gpu=True)
    gpu.add(ids, vectors)
    for k in (10, 600):  # 600 * Q > GPU_MAX_K: the deeper passes run on the CPU index
        assert_same_ranking(gpu.search(queries, k), store.search(queries, k))
    allowed = ids[:50]
    assert_same_ranking(
        gpu.search(queries, 10, allowed_ids=allowed), store.search(queries, 10, allowed_ids=allowed)
    )


def test_saving_removes_stale_temporaries_and_keeps_the_folder_readable(tmp_path):
    """A kill during a save leaves `vectors.faiss.XXXX.tmp`; the next save removes it once it is old
    (a live save's temporary is young). Saved files are as readable as their folder, not 0600."""
    import os
    import time

    from blip2_search.store.index_files import STALE_TEMPORARY_S, atomic_write

    target = tmp_path / "vectors.faiss"
    old, young = tmp_path / "vectors.faiss.dead.tmp", tmp_path / "vectors.faiss.live.tmp"
    old.write_bytes(b"x" * 10)
    young.write_bytes(b"y")
    past = time.time() - STALE_TEMPORARY_S - 60
    os.utime(old, (past, past))
    tmp_path.chmod(0o755)
    atomic_write(target, lambda p: p.write_bytes(b"index"))
    assert target.read_bytes() == b"index" and not old.exists() and young.exists()
    assert target.stat().st_mode & 0o777 == 0o644
