"""The compact vector store (PQ codes + exact rescoring) against numpy brute force, its files,
the index choice, and a library indexed and searched with ``--vector-index compact``."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from blip2_search.errors import InvalidInputError, LibraryError
from blip2_search.store import (
    CompactVectorStore,
    EmbedderInfo,
    FaissVectorStore,
    IndexedImage,
    ModelRef,
    index_choice,
    open_metadata,
    open_vectors,
)
from blip2_search.store.index_files import sidecar_path

Q, D = 8, 32


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Train with one OpenMP thread: on a busy 2-core machine FAISS's per-iteration barriers make
    these tiny trainings 10x slower with two (3.7 s instead of 0.25 s), and results are the same."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int, *, topics: int = 20, q: int = Q, d: int = D):
    """Images around topic centres whose Q vectors share per-slot directions, plus noise; queries
    near topic centres (the structure of real embeddings, as in bench/search.py)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((topics, d)))
    slots = unit(rng.standard_normal((q, d)))
    content = unit(centres[rng.integers(0, topics, n)] + rng.standard_normal((n, d)) / np.sqrt(d))
    noise = rng.standard_normal((n, q, d)) / np.sqrt(d)
    vectors = unit(0.6 * slots[None] + 0.6 * content[:, None, :] + 0.5 * noise)
    queries = unit(centres[rng.integers(0, topics, 40)] + rng.standard_normal((40, d)) / np.sqrt(d))
    return vectors, queries


def brute_force(ids, vectors, queries, k, multi=False):
    """Ground truth: every image scored in float64, ranked by (-score, id)."""
    v = vectors.astype(np.float64)
    out = []
    for query in queries:
        if multi:
            scores = np.einsum("nqd,pd->npq", v, query.astype(np.float64)).max(axis=2).mean(axis=1)
        else:
            scores = (v @ query.astype(np.float64)).max(axis=1)
        order = np.lexsort((ids, -scores))[:k]
        out.append((ids[order], scores))
    return out


def check_exact_scores(got_ids, got_scores, ids, all_scores):
    """Returned scores are the brute-force scores of the returned images, best first, ties by id."""
    lookup = dict(zip(ids.tolist(), all_scores.tolist()))
    np.testing.assert_allclose(got_scores, [lookup[i] for i in got_ids.tolist()], atol=1e-5)
    assert (np.diff(got_scores) <= 1e-6).all()


@pytest.fixture(scope="module")
def data():
    vectors, queries = clustered(4000, seed=1)
    ids = np.arange(4000, dtype=np.int64) * 3 + 5  # sparse ids
    by_id = dict(zip(ids.tolist(), range(len(ids))))

    def vectors_of(wanted):
        return vectors[[by_id[i] for i in np.asarray(wanted).tolist()]]

    return ids, vectors, queries, vectors_of


@pytest.fixture(scope="module")
def trained(data):
    ids, vectors, _, vectors_of = data
    store = CompactVectorStore(Q, D, vectors_of=vectors_of, train_at=None)
    store.add(ids, vectors)
    assert not store.trained and store.holds_vectors
    store.train(store._exact_sample())
    assert store.trained and not store.holds_vectors and len(store) == 4000 and store.ntotal == 4000 * Q
    return store


def recall_at(store, data, k, multi=False, allowed=None):
    ids, vectors, queries, _ = data
    if multi:
        queries = vectors[:: len(vectors) // 20][:, :3] + 0.0  # image-to-image: 3 of an image's vectors
    keep = np.ones(len(ids), bool) if allowed is None else np.isin(ids, allowed)
    truth = brute_force(ids[keep], vectors[keep], queries, k, multi)
    search = store.search_vectors if multi else store.search
    got_ids, got_scores = search(queries, k, allowed_ids=allowed)
    hits = 0
    for row, (want, all_scores) in enumerate(truth):
        check_exact_scores(got_ids[row], got_scores[row], ids[keep], all_scores)
        hits += len(set(got_ids[row].tolist()) & set(want.tolist()))
    return hits / (len(truth) * k)


def test_recall_at_10_and_exact_scores_on_clustered_vectors(trained, data):
    assert trained.factory == "IVF32,PQ8x4fs"
    assert recall_at(trained, data, 10) >= 0.99
    assert recall_at(trained, data, 50) >= 0.99


def test_image_to_image_recall_and_exact_scores(trained, data):
    assert recall_at(trained, data, 10, multi=True) >= 0.99


def test_filters_are_honoured_small_large_and_huge_ids(trained, data):
    ids = data[0]
    rng = np.random.default_rng(3)
    few = np.concatenate([rng.choice(ids, 50, replace=False), [1, 2]])  # 2 unknown ids
    many = rng.choice(ids, 1500, replace=False)  # searched through a FAISS selector
    low = ids[:1500]  # the lowest ids: a short bitmap, where FAISS took its size in bits for bytes and let others in
    for allowed in (few, many, low):
        got, _ = trained.search(data[2], 10, allowed_ids=allowed)
        assert set(got.ravel().tolist()) <= set(allowed.tolist())
        assert recall_at(trained, data, 10, allowed=allowed) >= 0.99
    assert trained.search(data[2][:2], 5, allowed_ids=np.array([], dtype=np.int64))[0].shape == (2, 0)
    # ids too large for a bitmap selector use FAISS's id set
    far_ids, vectors, queries = data[0] + 10**12, data[1], data[2][:5]
    far = CompactVectorStore(Q, D, vectors_of=lambda w: vectors[(np.asarray(w) - 10**12 - 5) // 3], train_at=None)
    far.add(far_ids[:1000], vectors[:1000])
    far.train(far._exact_sample())
    got, _ = far.search(queries, 10, allowed_ids=far_ids[200:900])
    want = brute_force(far_ids[200:900], vectors[200:900], queries, 10)
    for row, (want_ids, _) in enumerate(want):
        assert len(set(got[row].tolist()) & set(want_ids.tolist())) >= 9


def test_add_replace_remove_reset_after_training(data):
    ids, vectors, queries, _ = data
    extra = {}

    def vectors_of(wanted):
        return np.stack([extra[i] for i in np.asarray(wanted).tolist()])

    store = CompactVectorStore(Q, D, vectors_of=vectors_of, train_at=1000)
    for start in range(0, 1200, 300):  # trains itself while crossing 1,000 images
        part = ids[start : start + 300]
        extra.update(zip(part.tolist(), vectors[start : start + 300]))
        store.add(part, vectors[start : start + 300])
        assert store.trained == (start + 300 >= 1000)
    assert len(store) == 1200 and store.image_ids().tolist() == sorted(ids[:1200].tolist())
    target = queries[0]
    replaced = np.broadcast_to(target, (Q, D)).copy()  # image ids[7] now matches query 0 exactly
    extra[int(ids[7])] = replaced
    store.add(ids[7:8], replaced[None])
    got, scores = store.search(target[None], 3)
    assert got[0, 0] == ids[7] and np.isclose(scores[0, 0], 1.0, atol=1e-5) and len(store) == 1200
    assert store.remove(np.array([ids[7], 99_999_999])) == 1 and len(store) == 1199
    assert store.present(np.array([ids[9], ids[7], 99_999_999, ids[9], ids[3]])).tolist() == sorted([ids[9], ids[3]])
    assert ids[7] not in store.search(target[None], 20)[0][0]
    with pytest.raises(InvalidInputError, match="not in the vector index"):
        store.vectors_for(ids[7:8])
    store.reset()
    assert len(store) == 0 and store.trained and store.search(queries[:2], 5)[0].shape == (2, 0)
    with pytest.raises(InvalidInputError):
        store.add(np.array([1]), np.zeros((1, Q, D + 1), np.float32))
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        CompactVectorStore(Q, 12, vectors_of=vectors_of)


def test_save_load_round_trip_and_rejected_files(trained, data, tmp_path):
    ids, vectors, queries, vectors_of = data
    path = tmp_path / "vectors.faiss"
    info = trained.save(path, generation=4)
    assert info.params["store"] == "compact" and info.params["trained"] and "calibration" in info.params
    kwargs = {"num_query_tokens": Q, "dim": D, "vectors_of": vectors_of}
    loaded = CompactVectorStore.load(path, expected_generation=4, **kwargs)
    assert loaded.ok and len(loaded.store) == 4000 and loaded.store.calibration == trained.calibration
    for a, b in zip(loaded.store.search(queries, 10), trained.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    assert CompactVectorStore.load(path, expected_generation=5, **kwargs).state == "stale"
    assert CompactVectorStore.load(path, expected_generation=4, num_query_tokens=Q, dim=64, vectors_of=vectors_of).state == "invalid"
    exact_view = FaissVectorStore.load(path, expected_generation=4, num_query_tokens=Q, dim=D)
    assert exact_view.state == "invalid" and "compact" in exact_view.reason  # another store's file
    sidecar = json.loads(sidecar_path(path).read_text())
    calibration = sidecar["params"]["calibration"]
    # damaged but still JSON: read as invalid (rebuilt), where it crashed searches with a TypeError
    for damaged in ([1], {"x": 1}, {**calibration, "sigma": None}, {**calibration, "sigma": "x"}, {**calibration, "slope": float("nan")}):
        sidecar["params"]["calibration"] = damaged
        sidecar_path(path).write_text(json.dumps(sidecar))
        assert CompactVectorStore.load(path, expected_generation=4, **kwargs).state == "invalid", damaged
    del sidecar["params"]["calibration"]
    sidecar_path(path).write_text(json.dumps(sidecar))
    assert CompactVectorStore.load(path, expected_generation=4, **kwargs).state == "invalid"
    # an exact store's file is not a compact one
    exact = FaissVectorStore(Q, D, use_gpu=False)
    exact.add(ids[:10], vectors[:10])
    exact.save(path, generation=4)
    assert CompactVectorStore.load(path, expected_generation=4, **kwargs).state == "invalid"
    # before training the compact store saves and reloads its exact vectors
    small = CompactVectorStore(Q, D, vectors_of=vectors_of, train_at=None)
    small.add(ids[:10], vectors[:10])
    small.save(path, generation=6)
    again = CompactVectorStore.load(path, expected_generation=6, **kwargs)
    assert again.ok and not again.store.trained and len(again.store) == 10
    assert CompactVectorStore.load(path, expected_generation=6, train_at=5, **kwargs).store.trained


def test_memory_per_image_and_index_choice(trained):
    assert index_choice.compact_bytes_per_image(32, 256) == 32 * (32 + 8) + 8 <= 2048
    lists = faiss.extract_index_ivf(trained._index).nlist
    fixed = lists * D * 4 + 16 * D * 4  # coarse quantiser and PQ tables, once per index
    per_image = (trained.memory_bytes() - fixed) / len(trained)
    assert per_image <= Q * (D // 8 + 8) * 1.1 + 8  # codes in 32-code blocks, ids, id array
    assert index_choice.compact_threshold("exact", 32, 256, 2**30) is None
    assert index_choice.compact_threshold("compact", 32, 256, 2**40) == index_choice.COMPACT_MIN_IMAGES
    per_exact = index_choice.exact_bytes_per_image(32, 256)
    assert index_choice.compact_threshold("auto", 32, 256, 100_000 * per_exact) == 100_001
    with pytest.raises(InvalidInputError, match="pass vector_index=.exact."):
        index_choice.compact_threshold("fast", 32, 256, 2**30)
    assert index_choice.compact_factory(32 * 10**6, 256) == "IVF1024,PQ64x4fs"


# -- in a library ----------------------------------------------------------------------------------


def test_open_vectors_switches_kind_and_rescores_from_the_database(tmp_path, metadata_location, monkeypatch):
    monkeypatch.setattr(index_choice, "COMPACT_MIN_IMAGES", 50)
    vectors, queries = clustered(120, seed=5)
    (tmp_path / "lib").mkdir(exist_ok=True)
    meta = open_metadata(metadata_location, create=True, embedder=EmbedderInfo(ModelRef("m"), Q, D))
    ids = np.array(meta.upsert_indexed(
        [IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"h{i}", vectors=vectors[i]) for i in range(120)]
    ))
    np.testing.assert_array_equal(meta.vectors_for(ids[[5, 2]]), vectors[[5, 2]])
    with pytest.raises(LibraryError, match="no stored vectors"):
        meta.vectors_for([10**6])
    path = tmp_path / "lib" / "vectors.faiss"
    exact = open_vectors(meta, path, kind="exact", use_gpu=False)
    compact = open_vectors(meta, path, kind="compact", use_gpu=False)
    assert isinstance(compact.store, CompactVectorStore) and compact.store.trained
    assert "built as" in compact.rebuilt_because  # the exact file was rejected
    for a, b in zip(compact.store.search(queries, 10), exact.store.search(queries, 10)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    again = open_vectors(meta, path, kind="compact", use_gpu=False)
    assert again.rebuilt_because is None and again.store.trained
    assert open_vectors(meta, path, kind="exact", use_gpu=False).rebuilt_because is not None
    meta.close()


def test_images_pruned_while_a_search_runs_score_out_instead_of_failing_it(tmp_path, metadata_location, monkeypatch):
    """A server's compact index was loaded before `prune` removed rows from the database; its searches
    rescore from the database, so they must rank the vanished images out, not raise."""
    monkeypatch.setattr(index_choice, "COMPACT_MIN_IMAGES", 50)
    vectors, queries = clustered(120, seed=7)
    meta = open_metadata(metadata_location, create=True, embedder=EmbedderInfo(ModelRef("m"), Q, D))
    ids = np.array(meta.upsert_indexed(
        [IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"h{i}", vectors=vectors[i]) for i in range(120)]
    ))
    store = open_vectors(meta, tmp_path / "vectors.faiss", kind="compact", use_gpu=False).store
    assert isinstance(store, CompactVectorStore) and store.trained
    before, _ = store.search(queries, 10)
    gone = np.unique(before[:, :3])  # each query's best three
    meta.mark_deleted(gone.tolist())
    assert meta.forget_deleted() == (len(gone), len(gone))
    kept = np.flatnonzero(~np.isin(ids, gone))
    found, scores = store.search(queries, 10)  # the index still lists the pruned images
    for row, (truth_ids, all_scores) in enumerate(brute_force(ids[kept], vectors[kept], queries, 10)):
        np.testing.assert_array_equal(found[row], truth_ids)
        check_exact_scores(found[row], scores[row], ids[kept], all_scores)
    image_query = vectors[kept[:2]]
    found, _ = store.search_vectors(image_query, 10)
    assert not np.isin(found, gone).any()
    with pytest.raises(LibraryError, match="no longer holds the vectors of images"):
        store.vectors_for(gone[:2])
    np.testing.assert_array_equal(meta.vectors_for(ids[kept[:2]], missing="nan"), vectors[kept[:2]])
    assert np.isnan(meta.vectors_for(gone[:1], missing="nan")).all()
    meta.close()


def test_a_compact_index_trained_while_loading_is_saved(tmp_path, monkeypatch):
    """An 'auto' library under its memory budget saves exact vectors; with a smaller budget the next
    open trains the compact codes, and must save them (it retrained in every process before)."""
    monkeypatch.setattr(index_choice, "COMPACT_MIN_IMAGES", 50)
    vectors, _ = clustered(120, seed=6)
    meta = open_metadata(tmp_path / "lib", create=True, embedder=EmbedderInfo(ModelRef("m"), Q, D))
    meta.upsert_indexed([IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1, f"h{i}", vectors=vectors[i]) for i in range(120)])
    path = tmp_path / "lib" / "vectors.faiss"
    roomy = open_vectors(meta, path, kind="auto", memory_budget_bytes=2**30, use_gpu=False)
    assert not roomy.store.trained and not json.loads(sidecar_path(path).read_text())["params"].get("trained")
    tight = open_vectors(meta, path, kind="auto", memory_budget_bytes=1, use_gpu=False)
    assert tight.rebuilt_because is None and tight.store.trained  # trained on load, not rebuilt
    assert json.loads(sidecar_path(path).read_text())["params"]["trained"]
    trains = []
    monkeypatch.setattr(CompactVectorStore, "train", lambda *a, **kw: trains.append(1))
    again = open_vectors(meta, path, kind="auto", memory_budget_bytes=1, use_gpu=False)
    assert again.store.trained and trains == []
    meta.close()


def test_library_index_and_search_with_compact_selected(tiny_itm_dir, tmp_path, monkeypatch):
    from blip2_search.cli import main
    from blip2_search.library import Library

    monkeypatch.setattr(index_choice, "COMPACT_MIN_IMAGES", 8)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photos / f"p{i:02d}.jpg")
    shutil.copy(photos / "p00.jpg", photos / "copy.jpg")  # a tie
    lib_dir = tmp_path / "lib"
    args = ["index", str(photos), "--library", str(lib_dir), "--model", str(tiny_itm_dir), "--no-captions",
            "--vector-index", "compact", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    sidecar = json.loads(sidecar_path(lib_dir / "vectors.faiss").read_text())
    assert sidecar["params"]["store"] == "compact" and sidecar["params"]["trained"]
    text = "a red circle on the left"
    with Library.open(lib_dir) as lib:
        assert lib.vector_index_kind() == "compact" and lib.vectors.trained
        ids = lib.metadata.filter_ids()
        emb = lib.encoder.embed_texts([text])
        truth = brute_force(ids, lib.metadata.vectors_for(ids), emb, 13)[0]
        hits = lib.search(text, k=13, rerank=False, fusion=False).hits
        assert [h.id for h in hits] == truth[0].tolist()
        check_exact_scores(np.array([h.id for h in hits]), np.array([h.itc for h in hits]), ids, truth[1])
        assert lib.similar(photos / "p03.jpg", k=3).hits[0].path.endswith("p03.jpg")
        groups = [[r.id for r in g] for g in lib.duplicates(0.99)]
    with Library.open(lib_dir, vector_index="exact") as lib:  # recorded by the next index run
        lib.index([photos])
        assert isinstance(lib.vectors, FaissVectorStore)
    with Library.open(lib_dir) as lib:
        assert lib.vector_index_kind() == "exact"
        assert [h.id for h in lib.search(text, k=13, rerank=False, fusion=False).hits] == truth[0].tolist()
        assert [[r.id for r in g] for g in lib.duplicates(0.99)] == groups


def _compact_library(tiny_itm_dir, tmp_path, monkeypatch):
    """12 random photos indexed into a library whose vector index is compact (trained at 8 images)."""
    from blip2_search.library import Library

    monkeypatch.setattr(index_choice, "COMPACT_MIN_IMAGES", 8)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photos / f"p{i:02d}.jpg")
    lib_dir = tmp_path / "lib"
    with Library.open(lib_dir, model=str(tiny_itm_dir), captioner=False, create=True, vector_index="compact") as lib:
        lib.index([photos])
    return photos, lib_dir


def test_a_compact_server_beside_an_unsaved_run_that_changed_or_reembedded_photos(tiny_itm_dir, tmp_path, monkeypatch):
    """The loaded compact index lists photos whose vectors the database no longer holds (a photo that
    changed into garbage and was marked failed): they are not hits. A re-embed by another process is
    a clear error, not scores from another model's vectors."""
    from blip2_search.library import Library
    from tiny_models import make_tiny_itm

    photos, lib_dir = _compact_library(tiny_itm_dir, tmp_path, monkeypatch)
    server = Library.open(lib_dir)
    try:
        assert server.vectors.trained
        every = server.search("a photo", k=12, rerank=False, fusion=False)
        assert len(every.hits) == 12
        (photos / "p01.jpg").write_bytes(b"changed into something unreadable")
        with monkeypatch.context() as running:
            running.setattr(Library, "_save_vectors", lambda self: None)  # the other run has not saved yet
            with Library.open(lib_dir) as other:
                assert other.index([photos]).failed == 1
            after = server.search("a photo", k=12, rerank=False, fusion=False)
            assert [h.id for h in after.hits] == [h.id for h in every.hits if not h.path.endswith("p01.jpg")]
            assert all(np.isfinite(h.score) for h in after.hits)
            other_model = make_tiny_itm(tmp_path / "other", seed=5)
            with Library.open(lib_dir, model=str(other_model), reembed=True, captioner=False) as other:
                other.index([photos])
            with pytest.raises(LibraryError, match="being re-embedded with .* by another process .*restart this process"):
                server.search("a photo", k=3, rerank=False)
    finally:
        server.close()


def test_prune_after_a_run_that_died_before_saving_keeps_a_compact_server_searching(tiny_itm_dir, tmp_path, monkeypatch):
    """An index run marked a photo deleted but died before saving vectors.faiss; a server still serves
    its old compact index, whose exact rescoring would read the row prune removes. Prune saves the
    index first, so the server reloads it at its next search."""
    from blip2_search.library import Library

    photos, lib_dir = _compact_library(tiny_itm_dir, tmp_path, monkeypatch)
    with Library.open(lib_dir) as server:
        assert len(server.search("a photo", k=20, rerank=False, fusion=False).hits) == 12
        (photos / "p03.jpg").unlink()
        with Library.open(lib_dir) as dying, monkeypatch.context() as killed:
            killed.setattr(Library, "_save_vectors", lambda self: None)  # killed before its save
            assert dying.index([photos]).deleted == 1
        with Library.open(lib_dir) as pruner:
            assert pruner.prune().images == 1
        hits = server.search("a photo", k=20, rerank=False, fusion=False).hits
        assert len(hits) == 11 and not any(h.path.endswith("p03.jpg") for h in hits)


def test_a_server_follows_vector_index_switches_and_auto_leaves_compact_when_small(tiny_itm_dir, tmp_path, monkeypatch):
    """Day-2 review: switching the index kind by `index --vector-index` left a running server on the old
    kind (no generation change), and `auto` after `compact` kept the compact codes of a small library."""
    from blip2_search.library import Library
    from blip2_search.store import CompactVectorStore, FaissVectorStore

    photos, lib_dir = _compact_library(tiny_itm_dir, tmp_path, monkeypatch)
    with Library.open(lib_dir) as server:
        server.search("a photo", k=3, rerank=False, fusion=False)
        assert isinstance(server.vectors, CompactVectorStore) and server.vectors.trained
        for kind, expected in (("exact", FaissVectorStore), ("compact", CompactVectorStore), ("auto", FaissVectorStore)):
            with Library.open(lib_dir, vector_index=kind) as other:
                assert other.index([photos]).unchanged == 12
            assert len(server.search("a photo", k=12, rerank=False, fusion=False).hits) == 12
            held = server.vectors._exact if isinstance(server.vectors, CompactVectorStore) and not server.vectors.trained else server.vectors
            assert isinstance(held, expected), (kind, type(server.vectors))
    sidecar = json.loads((lib_dir / "vectors.faiss.json").read_text())
    assert not sidecar["params"].get("trained")  # auto at 12 images (threshold far above): exact vectors on disk


def test_a_compact_library_just_under_its_threshold_keeps_its_codes(tiny_itm_dir, tmp_path, monkeypatch):
    """Hysteresis: a photo moved away takes the library one under the threshold; rebuilding exact vectors
    there (and retraining when it comes back) at every crossing would cost a full rebuild each time."""
    from blip2_search.library import Library

    photos, lib_dir = _compact_library(tiny_itm_dir, tmp_path, monkeypatch)
    monkeypatch.setattr(index_choice, "COMPACT_MIN_IMAGES", 12)
    (photos / "p00.jpg").rename(tmp_path / "p00.jpg")
    with Library.open(lib_dir) as lib:
        assert lib.index([photos]).deleted == 1
    assert json.loads((lib_dir / "vectors.faiss.json").read_text())["params"].get("trained")
    with Library.open(lib_dir) as lib:
        assert lib.vectors.trained and len(lib.search("a photo", k=20, rerank=False, fusion=False).hits) == 11
