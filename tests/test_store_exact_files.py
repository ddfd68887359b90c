"""The exact index's files (``exact_files``): a save appends what changed, a lazy store reads no vectors,
tombstones, compaction, spilling, crashes, and the older one-FAISS-file layout."""

from __future__ import annotations

import numpy as np
import pytest

from blip2_search.errors import LibraryError
from blip2_search.store import FaissVectorStore, exact_files, index_files, vectors as vectors_module
from blip2_search.store.index_files import read_sidecar, save_vector_index, sidecar_path

Q, D = 4, 16


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def expected_search(contents: dict[int, np.ndarray], queries: np.ndarray, k: int):
    """Brute force over ``contents`` (id -> [Q, D]): ids and max-inner-product scores, ties by id."""
    ids = np.array(sorted(contents), dtype=np.int64)
    stacked = np.stack([contents[i] for i in ids.tolist()]).astype(np.float64)
    out = []
    for query in queries:
        scores = (stacked @ query.astype(np.float64)).max(axis=1)
        out.append(ids[np.lexsort((ids, -scores))[:k]])
    return np.array(out)


def saved(path, generation, *, lazy=False):
    loaded = FaissVectorStore.load(path, expected_generation=generation, num_query_tokens=Q, dim=D, use_gpu=False, lazy=lazy)
    assert loaded.ok, loaded.reason
    return loaded.store


def files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "vectors.faiss.lock")


@pytest.fixture
def start(tmp_path):
    """A saved index of 100 images (ids 1..100) and the contents it holds."""
    rng = np.random.default_rng(3)
    contents = {i: v for i, v in zip(range(1, 101), unit(rng, 100, Q, D))}
    store = FaissVectorStore(Q, D, use_gpu=False)
    store.add(np.array(list(contents)), np.stack(list(contents.values())))
    path = tmp_path / "vectors.faiss"
    store.save(path, generation=1)
    return path, contents, rng


def test_a_lazy_store_appends_its_changes_without_reading_the_vectors(start, monkeypatch):
    path, contents, rng = start
    first = read_sidecar(path).params
    data = path.parent / first["data"]
    size = data.stat().st_size

    def no_reads(*args):
        raise AssertionError("read the vectors")

    monkeypatch.setattr(vectors_module, "read_vectors", no_reads)
    store = saved(path, 1, lazy=True)
    assert not store.loaded and len(store) == 100 and store.ntotal == 400
    added = dict(zip([101, 102, 5], unit(rng, 3, Q, D)))  # two new photos, one replaced (5)
    store.add(np.array(list(added)), np.stack(list(added.values())))
    assert store.remove(np.array([7, 8, 999])) == 2
    info = store.save(path, generation=2)
    contents = {**{i: v for i, v in contents.items() if i not in (7, 8)}, **added}
    assert not store.loaded and info.images == len(contents) == 100
    second = read_sidecar(path).params
    assert second["data"] == first["data"] and second["rows"] == 103  # the same file, three rows longer
    assert data.stat().st_size == size + 3 * Q * D * 4
    assert files(path.parent) == sorted([first["data"], second["ids"], "vectors.faiss.json"])  # the old ids file went
    row_ids = np.fromfile(path.parent / second["ids"], dtype=np.int64)
    assert sorted(row_ids[row_ids < 0].tolist()) == [-1, -1, -1] and row_ids[-3:].tolist() == [101, 102, 5]
    monkeypatch.undo()

    queries = unit(rng, 6, D)
    for reopened in (saved(path, 2), store):  # a reader of the files, and the lazy store reading them on search
        np.testing.assert_array_equal(reopened.search(queries, 15)[0], expected_search(contents, queries, 15))
        np.testing.assert_array_equal(reopened.vectors_for(np.array([5, 101])), np.stack([added[5], added[101]]))
    assert store.loaded


def test_a_loaded_store_appends_too_and_compacts_when_a_quarter_of_the_rows_are_dead(start):
    path, contents, rng = start
    store = saved(path, 1)
    first = read_sidecar(path).params
    store.remove(np.arange(1, 21))  # 20 dead rows of 100: appended (tombstones only)
    store.save(path, generation=2)
    assert read_sidecar(path).params["data"] == first["data"] and read_sidecar(path).params["rows"] == 100
    store.remove(np.arange(21, 31))  # 30 dead of 100: rewritten into a new data file of the 70 live rows
    info = store.save(path, generation=3)
    assert info.params["data"] != first["data"] and info.params["rows"] == 70 and info.index_bytes == 70 * Q * D * 4
    assert first["data"] not in files(path.parent)
    contents = {i: v for i, v in contents.items() if i > 30}
    queries = unit(rng, 4, D)
    np.testing.assert_array_equal(saved(path, 3).search(queries, 70)[0], expected_search(contents, queries, 70))
    np.testing.assert_array_equal(store.search(queries, 70)[0], expected_search(contents, queries, 70))


def test_many_additions_are_written_past_the_committed_rows_before_the_save(start, monkeypatch):
    """A lazy store keeps at most PENDING_BYTES of added vectors in RAM; readers see none of them until the save."""
    path, contents, rng = start
    monkeypatch.setattr(vectors_module, "PENDING_BYTES", 5 * Q * D * 4)
    store = saved(path, 1, lazy=True)
    added = dict(zip(range(200, 240), unit(rng, 40, Q, D)))
    for start_at in range(200, 240, 8):
        batch = np.arange(start_at, start_at + 8)
        store.add(batch, np.stack([added[i] for i in batch.tolist()]))
    data = path.parent / read_sidecar(path).params["data"]
    assert data.stat().st_size > 100 * Q * D * 4 and len(store._pending) <= 5  # written to the file already
    assert saved(path, 1).image_ids().tolist() == list(range(1, 101))  # not yet committed
    store.remove(np.array([201]))  # a spilled row dies too
    store.save(path, generation=2)
    contents = {**contents, **{i: v for i, v in added.items() if i != 201}}
    queries = unit(rng, 5, D)
    np.testing.assert_array_equal(saved(path, 2).search(queries, 30)[0], expected_search(contents, queries, 30))


def test_a_save_killed_after_writing_rows_leaves_the_previous_save_and_the_next_save_cuts_them_off(start, monkeypatch):
    path, contents, rng = start
    store = saved(path, 1, lazy=True)
    store.add(np.array([300, 301]), unit(rng, 2, Q, D))
    real = exact_files._commit

    def killed(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exact_files, "_commit", killed)
    with pytest.raises(LibraryError, match="free disk space"):
        store.save(path, generation=2)
    monkeypatch.setattr(exact_files, "_commit", real)
    data = path.parent / read_sidecar(path).params["data"]
    assert data.stat().st_size == 102 * Q * D * 4  # the rows are there, uncommitted
    assert saved(path, 1).image_ids().tolist() == list(range(1, 101))
    other = saved(path, 1, lazy=True)  # the next run: one photo removed, nothing added
    other.remove(np.array([1]))
    other.save(path, generation=2)
    assert data.stat().st_size == 100 * Q * D * 4
    assert saved(path, 2).image_ids().tolist() == list(range(2, 101))


def test_a_store_whose_files_another_process_replaced_saves_all_its_rows(start, monkeypatch):
    """An index run's lazy store built on files that a search process replaced meanwhile (it rebuilt a stale
    index): appending would go to a file nobody reads, so the save writes every row, the lazy store reading
    its own (spilled ones included) from the data file it holds open, which the other save removed."""
    path, contents, rng = start
    monkeypatch.setattr(vectors_module, "PENDING_BYTES", 2 * Q * D * 4)
    lazy = saved(path, 1, lazy=True)
    added = dict(zip(range(500, 505), unit(rng, 5, Q, D)))
    lazy.add(np.array(list(added)), np.stack(list(added.values())))  # spilled
    lazy.remove(np.array([1]))
    rebuilt = FaissVectorStore(Q, D, use_gpu=False)
    rebuilt.add(np.array([1, 2]), unit(rng, 2, Q, D))
    rebuilt.save(path, generation=1)  # removes the data file the lazy store holds open
    info = lazy.save(path, generation=2)
    expected = {**{i: v for i, v in contents.items() if i != 1}, **added}
    assert info.images == len(expected) and info.params["rows"] == len(expected)
    queries = unit(rng, 4, D)
    np.testing.assert_array_equal(saved(path, 2).search(queries, 20)[0], expected_search(expected, queries, 20))
    loaded = saved(path, 2)  # a store that holds its vectors writes them all too
    rebuilt.save(path, generation=3)
    loaded.add(np.array([600]), unit(rng, 1, Q, D))
    loaded.save(path, generation=4)
    assert saved(path, 4).image_ids().tolist() == sorted(set(expected) | {600})


def test_a_failed_spill_is_a_library_error_naming_the_fix(start, monkeypatch):
    path, contents, rng = start
    monkeypatch.setattr(vectors_module, "PENDING_BYTES", 0)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exact_files, "write_rows", full)
    lazy = saved(path, 1, lazy=True)
    with pytest.raises(LibraryError, match=r"cannot write vectors to .*\.f32 .*No space left.*free disk space"):
        lazy.add(np.array([700]), unit(rng, 1, Q, D))


def test_what_killed_saves_left_is_removed_by_the_next_save_or_index_run(start):
    """A save killed mid-write leaves a temporary with a token no later save repeats; one killed after its commit
    leaves its predecessor's files (at 100k, 3.3 GB): both go at the next save, or when an index run starts."""
    path, contents, rng = start
    folder = path.parent
    params = read_sidecar(path).params
    leftovers = [folder / "vectors.0123456789ab.f32", folder / "vectors.0123456789ab.ids", folder / "vectors.faiss",
                 folder / "vectors.fedcba987654.f32.x1y2z3.tmp", folder / "vectors.faiss.json.a1b2c3.tmp"]

    def leave():
        for leftover in leftovers:
            leftover.write_bytes(b"x" * 64)  # young: a save holding the lock knows none is being written

    leave()
    index_files.remove_leftovers(path)
    assert files(folder) == sorted([params["data"], params["ids"], "vectors.faiss.json"])
    leave()
    store = saved(path, 1, lazy=True)
    store.remove(np.array([5]))
    info = store.save(path, generation=2)
    assert files(folder) == sorted([info.params["data"], info.params["ids"], "vectors.faiss.json"])
    assert saved(path, 2).image_ids().tolist() == [i for i in range(1, 101) if i != 5]


def test_the_older_layout_is_read_and_replaced_by_the_next_save(tmp_path):
    """Libraries saved before this layout have one FAISS file: it is read, and the next save writes rows and removes it."""
    rng = np.random.default_rng(5)
    old = FaissVectorStore(Q, D, use_gpu=False)
    old.add(np.arange(1, 11), unit(rng, 10, Q, D))
    path = tmp_path / "vectors.faiss"
    save_vector_index(old._index, path, factory="IDMap2,Flat", num_query_tokens=Q, dim=D, images=10, vectors=40,
                      generation=4, params={"store": "exact"})
    assert read_sidecar(path).format == 1
    store = saved(path, 4, lazy=True)  # read whole: the older layout cannot be read lazily
    queries = unit(rng, 3, D)
    np.testing.assert_array_equal(store.search(queries, 5)[0], old.search(queries, 5)[0])
    store.remove(np.array([3]))
    store.save(path, generation=5)
    assert not path.exists() and read_sidecar(path).format == exact_files.ROWS_FORMAT
    assert saved(path, 5).image_ids().tolist() == [1, 2, 4, 5, 6, 7, 8, 9, 10]


def test_damaged_row_files_read_as_invalid(start):
    path, contents, rng = start
    params = read_sidecar(path).params
    data, ids = path.parent / params["data"], path.parent / params["ids"]
    load = lambda: FaissVectorStore.load(path, expected_generation=1, num_query_tokens=Q, dim=D)  # noqa: E731
    with open(data, "r+b") as f:
        f.truncate(99 * Q * D * 4)  # cut short
    assert load().state == "invalid" and "fewer rows" in load().reason
    ids.write_bytes(ids.read_bytes()[:-8])
    assert load().state == "invalid" and "do not match" in load().reason
    ids.unlink()
    assert load().state == "invalid"
    sidecar_path(path).write_text(sidecar_path(path).read_text().replace(params["data"], "../elsewhere.f32"))
    assert load().state == "invalid" and "not plain names" in load().reason


def test_a_compact_index_save_removes_the_row_files_and_an_exact_save_the_faiss_file(start):
    path, contents, rng = start
    import faiss

    index = faiss.index_factory(D, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    index_files.save_vector_index(index, path, factory="IDMap2,Flat", num_query_tokens=Q, dim=D, images=0, vectors=0,
                                  generation=2, params={"store": "compact"})
    assert files(path.parent) == ["vectors.faiss", "vectors.faiss.json"]
    store = FaissVectorStore(Q, D, use_gpu=False)
    store.add(np.array([1]), unit(rng, 1, Q, D))
    info = store.save(path, generation=3)
    assert files(path.parent) == sorted([info.params["data"], info.params["ids"], "vectors.faiss.json"])


def test_a_store_whose_replaced_file_holds_damaged_rows_does_not_save_them(start):
    """A server found NaN rows and removed the files while an index run held them open: the run's full save
    re-read its rows from the open file and wrote the damage back at the new generation (review)."""
    from blip2_search.errors import CorruptIndexError

    path, contents, rng = start
    lazy = saved(path, 1, lazy=True)
    lazy.add(np.array([900]), unit(rng, 1, Q, D))
    data = path.parent / read_sidecar(path).params["data"]
    rows = np.fromfile(data, dtype=np.float32)
    rows[: Q * D] = np.nan
    rows.tofile(data)  # in place: the lazy store's open file sees it
    for leftover in index_files.files_of_index(path):
        leftover.unlink()  # the server removed the damaged index
    with pytest.raises(CorruptIndexError):
        lazy.save(path, generation=2)
    assert not sidecar_path(path).exists()  # nothing saved: the next open rebuilds from the database


def test_without_locks_a_save_does_not_remove_files_another_save_has_not_committed_yet(start, monkeypatch):
    import errno

    path, contents, rng = start
    uncommitted = path.parent / "vectors.0123456789ab.f32"  # another save's new data file, its sidecar not yet written
    uncommitted.write_bytes(b"x" * 64)

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(index_files.fcntl, "flock", no_locks)
    index_files.remove_leftovers(path)
    assert uncommitted.exists()
    monkeypatch.undo()
    index_files.remove_leftovers(path)  # with the lock held, nothing can be mid-save: unnamed files go
    assert not uncommitted.exists()


def test_a_lazy_store_compacts_by_streaming_its_rows_not_by_reading_them_all(start, monkeypatch):
    """Past a quarter of dead rows (or asked to compact: prune) a lazy store rewrites its live rows into a new data
    file a chunk at a time from the file it holds open; it used to read every vector into RAM first."""
    path, contents, rng = start
    monkeypatch.setattr(vectors_module, "PENDING_BYTES", 2 * Q * D * 4)
    monkeypatch.setattr(vectors_module, "_SCORE_CHUNK_IMAGES", 16)  # several chunks
    monkeypatch.setattr(vectors_module, "read_vectors", lambda *a: pytest.fail("read every vector"))
    first = read_sidecar(path).params["data"]
    store = saved(path, 1, lazy=True)
    added = dict(zip(range(300, 305), unit(rng, 5, Q, D)))
    store.add(np.array(list(added)), np.stack(list(added.values())))  # spilled past the committed rows
    store.remove(np.arange(1, 31))  # 30 of 105 rows dead
    info = store.save(path, generation=2)
    expected = {**{i: v for i, v in contents.items() if i > 30}, **added}
    assert info.params["data"] != first and info.params["rows"] == len(expected) == 75 and not store.loaded
    assert (path.parent / info.params["data"]).stat().st_size == 75 * Q * D * 4 and first not in files(path.parent)
    store.remove(np.array([31]))  # one dead row of 75: a tombstone, even when compacting is asked for (prune)
    assert store.save(path, generation=3, compact=True).params["rows"] == 75
    store.remove(np.arange(32, 39))  # 8 of 75: past the tenth from which prune compacts
    assert store.save(path, generation=3).params["rows"] == 75
    assert store.save(path, generation=4, compact=True).params["rows"] == 67 and store.dead_share == 0.0
    monkeypatch.undo()
    for gone in range(31, 39):
        del expected[gone]
    queries = unit(rng, 4, D)
    for reader in (saved(path, 4), store):
        np.testing.assert_array_equal(reader.search(queries, 30)[0], expected_search(expected, queries, 30))
