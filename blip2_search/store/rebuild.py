"""Keeping the FAISS file in step with the metadata store, which is the source of truth."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import numpy as np

from blip2_search.errors import LibraryError
from blip2_search.store import index_choice
from blip2_search.store.compact import CompactVectorStore
from blip2_search.store.metadata import MetadataStore
from blip2_search.store.rows import ChangedVectors
from blip2_search.store.vectors import FaissVectorStore, LoadResult, VectorStore

VECTORS_FILENAME = "vectors.faiss"
"""Name of the FAISS file inside a library folder (its sidecar adds ``.json``)."""

DEFAULT_MEMORY_BUDGET_BYTES = 4 * 2**30
"""What ``auto`` lets the exact index use before it moves to compact codes."""

BESIDE_CATCH_UP_MIN = 2000
"""Beside a running ``index``, a file behind the database is brought up to date only when the journal names at most
this many photos, or a tenth of the library: reading a photo's vectors from the database costs ~7x reading it from
the file (0.37 vs 0.05 ms at 100k photos), so that bounds the catch-up to about the file's own load time. A run on a
GPU commits ~60k photos between two saves; a reader then serves the last save as it is (the search engine makes up
for it, see ``index_behind``). A file behind after a run was killed is always brought up to date (else: a rebuild)."""


def rebuild(metadata: MetadataStore, vector_store: VectorStore, *, chunk_size: int = 1024) -> int:
    """Empty ``vector_store`` and add every indexed image's vectors from one consistent snapshot
    of ``metadata``, ``chunk_size`` images at a time; return that snapshot's vectors generation."""
    vector_store.reset()
    with metadata.live_vectors(chunk_size) as live:
        if live.count:
            found = (live.num_query_tokens, live.dim)
            expected = (vector_store.num_query_tokens, vector_store.dim)
            if found != expected:
                raise LibraryError(
                    f"library {metadata.location} stores vectors of shape {found} but the vector "
                    f"store expects {expected}; open it with the library's embedder"
                )
        for chunk in live.chunks():
            vector_store.add(chunk.ids, chunk.vectors)
        return live.generation


def training_sample(metadata: MetadataStore, n_vectors: int, *, seed: int = 0) -> np.ndarray:
    """About ``n_vectors`` vectors of randomly chosen indexed images (all Q of each): ``[s, D]``."""
    ids = metadata.filter_ids()
    info = metadata.info().embedder
    q = info.num_query_tokens if info else 1
    picks = np.random.default_rng(seed).choice(ids, min(len(ids), -(-n_vectors // q)), replace=False)
    return metadata.vectors_for(np.sort(picks)).reshape(-1, info.dim if info else 0)


def _apply_changes(store: VectorStore, changes: ChangedVectors) -> bool:
    """Bring ``store``, loaded from a file saved at the generation ``changes`` starts from, to the snapshot's: remove
    every image the journal names, add back the live ones as they are now. Whether it then holds as many images as
    the snapshot (a file that did not hold what the database did at its generation is rebuilt instead)."""
    store.remove(changes.changed)
    for chunk in changes.chunks():
        store.add(chunk.ids, chunk.vectors)
    return len(store) == changes.count


@dataclass(frozen=True)
class OpenedVectors:
    """A current vector store: ``rebuilt_because`` is None when it was loaded from its file."""

    store: VectorStore
    generation: int
    rebuilt_because: str | None
    unsaved: str | None = None  # why the rebuilt index could not be written back (a full disk): it serves from memory
    file_generation: int | None = None  # the file it was read from, when brought up to date but not saved back: its generation


def open_vectors(
    metadata: MetadataStore,
    index_path: str | os.PathLike[str],
    *,
    kind: str = "exact",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    save: bool = True,
    use_gpu: bool | None = None,
    lazy: bool = False,
    distrust: str | None = None,
    behind_from: int | None = None,
) -> OpenedVectors:
    """Load the FAISS file if it matches the library's vectors generation and ``kind``; one saved at an older
    generation (not older than ``MetadataStore.embedder_since``) is brought up to date from the change journal
    (``MetadataStore.vector_changes``) where it reaches back that far; else rebuild it from ``metadata``. With
    ``save``, what was brought up to date or rebuilt is written back atomically.

    ``kind``: ``exact`` (``FaissVectorStore``), ``compact`` or ``auto`` (``CompactVectorStore``,
    which trains itself at ``index_choice.compact_threshold`` images; ``auto`` from the point
    where the exact index would outgrow ``memory_budget_bytes``). ``lazy``: exact vectors (of either store)
    are opened for changes (``FaissVectorStore.load``): read on first search; a save appends (only the holder of
    the library's lock opens it so; any other writes a file it brought up to date whole). ``distrust``: why
    the file must not be used even if current (found damaged where it could not be removed): rebuilt, not saved.
    ``behind_from``: a file saved at an older generation, not older than this one, that the journal no longer
    reaches back to (or that would take long to bring up to date, see ``BESIDE_CATCH_UP_MIN``) is loaded as it
    is (the returned ``generation`` is its own) instead of rebuilt: what a reader beside a running ``index``
    does (that run saves as it goes, and drops the journal up to each save; see ``MetadataStore.embedder_since``
    for why a file older than that is never used).
    """
    info = metadata.info()
    if info.embedder is None:
        raise LibraryError(
            f"library {metadata.location} has no embedder recorded, so it has no vectors; index photos first"
        )
    q, d = info.embedder.num_query_tokens, info.embedder.dim
    vectors_of = partial(metadata.vectors_for, missing="nan")  # rows pruned while a search runs score -inf
    train_at = index_choice.compact_threshold(kind, q, d, memory_budget_bytes)
    common = {"expected_generation": info.vectors_generation, "num_query_tokens": q, "dim": d, "use_gpu": use_gpu}

    def load(**options) -> LoadResult:
        if train_at is None:
            return FaissVectorStore.load(index_path, **{**common, **options})
        return CompactVectorStore.load(index_path, vectors_of=vectors_of, train_at=train_at, **{**common, **options})

    loaded: LoadResult
    if distrust is not None:
        loaded, save = LoadResult(None, "invalid", distrust), False
    else:
        loaded = load(lazy=lazy)
        if isinstance(loaded.store, CompactVectorStore) and loaded.store.needs_retraining() and behind_from is None:
            # (beside a running index it serves until that run retrains it: each reader would retrain it again)
            loaded = LoadResult(None, "stale", f"index {index_path} was trained for far fewer images than it holds")
    generation = info.vectors_generation
    if loaded.store is None and loaded.state == "stale" and loaded.info is not None and loaded.info.vectors_generation < generation:
        saved_at = loaded.info.vectors_generation
        since = metadata.embedder_since()  # an older file may hold another model's vectors (`--reembed`)
        behind = None
        for _ in range(3):  # a run beside may save again between the two reads: the newer file is read then
            if since is None or since > saved_at:
                break
            behind = load(expected_generation=saved_at, lazy=lazy)
            if behind.store is not None or behind.state != "stale" or behind.info is None or behind.info.vectors_generation <= saved_at:
                break
            saved_at = behind.info.vectors_generation
        if behind is not None and behind.store is not None:
            with metadata.vector_changes(saved_at) as changes:
                if changes.covered and (behind_from is None or len(changes.changed) <= max(BESIDE_CATCH_UP_MIN, changes.count // 10)):
                    up_to_date = _apply_changes(behind.store, changes)
                    retrain = isinstance(behind.store, CompactVectorStore) and behind.store.needs_retraining() and behind_from is None
                    if up_to_date and not retrain:
                        unsaved = None
                        if save:
                            try:  # appended only by the holder of the library's lock (`lazy`), see FaissVectorStore.save
                                behind.store.save(index_path, generation=changes.generation, whole=not lazy)
                            except LibraryError as exc:  # a full disk: it serves from memory
                                unsaved = str(exc)
                        kept = saved_at if unsaved is not None or not save else None  # the file still holds the older rows
                        return OpenedVectors(behind.store, changes.generation, None, unsaved=unsaved, file_generation=kept)
                    loaded = LoadResult(None, "stale", f"index {index_path} was trained for far fewer images than it holds" if up_to_date
                                        else f"index {index_path} did not match the database once brought up to date")
                elif behind_from is not None and behind_from <= saved_at:
                    # beside a running index whose journal moved past this file (it saved again since), or that changed
                    # too many photos since to read now: serve it as it is, also one the writer will have to retrain (its
                    # lists grew long), until a later open
                    return OpenedVectors(behind.store, saved_at, None)
            behind.store.reset()  # not used: its data file is closed now
    if loaded.store is not None:
        if save and isinstance(loaded.store, CompactVectorStore) and loaded.store.trained and not loaded.info.params.get("trained"):
            loaded.store.save(index_path, generation=info.vectors_generation)  # trained while loading an exact file: keep it
        return OpenedVectors(loaded.store, generation, None)
    if train_at is None:
        store: VectorStore = FaissVectorStore(q, d, use_gpu=use_gpu)
    else:
        store = CompactVectorStore(q, d, vectors_of=vectors_of, train_at=train_at, use_gpu=use_gpu)
        count = metadata.counts().indexed
        if count >= train_at:
            store.train(training_sample(metadata, store.sample_size(count)), expected_images=count)
    generation = rebuild(metadata, store)
    if save:
        try:
            store.save(index_path, generation=generation)
        except LibraryError as exc:  # a full disk must not stop searches (nor the prune that frees it)
            return OpenedVectors(store, generation, loaded.reason, unsaved=str(exc))
        if isinstance(store, CompactVectorStore) and store.trained:
            # adding grows FAISS's lists by doubling (up to 2x slack); the file reads back tight
            reopened = CompactVectorStore.load(index_path, vectors_of=vectors_of, train_at=train_at, **common)
            store = reopened.store or store
    return OpenedVectors(store, generation, loaded.reason)
