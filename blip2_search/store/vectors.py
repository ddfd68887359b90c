"""Vector search over images that each have Q vectors (BLIP-2: 32 query vectors of 256 dims).

Scores:
- ``search`` (text-to-image): an image's score for a query vector ``x`` ``[D]`` is the MAX over
  its Q vectors of the inner product, i.e. BLIP-2's ITC cosine for L2-normalised vectors.
- ``search_vectors`` (image-to-image): for a query ``[P, D]``, the MEAN over the P query vectors
  of the max over the image's Q vectors (ColBERT's "MaxSim"); with P = 1 it equals ``search``.
Results hold distinct images, sorted by score descending, ties broken by image id ascending;
``k' = min(k, number of candidate images)`` columns.

``FaissVectorStore`` is exact. Each image's vectors get FAISS ids ``image_id * Q + q``. On a CPU
``search`` scores every (allowed) image with one numpy matrix product over the flat storage and
keeps the top k with ``argpartition``: for single queries that is 2-2.5x faster than FAISS's own
flat search (``bench/search.py``, docs/benchmarks.md). On a GPU it asks FAISS for the top
``K = k * Q`` vectors, which span at least k images, and takes each image's best hit. The top k
is then exact when the k-th image's score is above the lowest score returned (every vector not
returned scores at most that); otherwise it asks again with 4 K, up to every vector.
``search_vectors`` uses the threshold algorithm on the same
lists: candidates are scored exactly from their stored vectors and the search stops when the
k-th exact score beats the mean of the per-row lowest scores, the best any unseen image can do
(or, when the lists already reach most images, every image is scored directly).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import faiss
import numpy as np

from blip2_search.errors import CorruptIndexError, InvalidInputError, LibraryError
from blip2_search.store import exact_files
from blip2_search.store.exact_files import DEAD, RowFiles, read_vectors, row_bytes
from blip2_search.store.index_choice import EXACT_FACTORY, exact_bytes_per_image
from blip2_search.store.index_files import (
    EXACT_STORE,
    SIDECAR_FORMAT,
    IndexInfo,
    LoadState,
    read_index_files,
    read_sidecar,
)
from blip2_search.store.scoring import (
    check_ids,
    check_queries,
    check_vectors,
    max_scores,
    mean_max,
    rank,
    top_k,
)

GPU_MAX_K = 2048
"""FAISS GPU indexes return at most this many neighbours per query."""
_SCORE_CHUNK_IMAGES = 1024
PENDING_BYTES = 256 * 2**20
"""A store opened for changes (``lazy``) keeps at most this much of added vectors in RAM before writing
them past the committed rows of its data file (where no reader looks until the save commits them)."""


class VectorStore(Protocol):
    """Images with ``num_query_tokens`` vectors of ``dim`` each, searchable by max inner product."""

    num_query_tokens: int
    dim: int

    def add(self, image_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace images: ``image_ids [n] int64``, ``vectors [n, Q, D] float32``."""

    def remove(self, image_ids: np.ndarray) -> int:
        """Remove images; return how many were present."""

    def reset(self) -> None:
        """Remove every image."""

    def search(
        self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k images per query ``[m, D] float32``: ``(ids [m, k'] int64, scores [m, k'] float32)``."""

    def search_vectors(
        self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k images per multi-vector query ``[m, P, D] float32`` (mean over P of max over Q)."""

    def __len__(self) -> int:
        """Number of images."""

    @property
    def ntotal(self) -> int:
        """Number of vectors (images x Q)."""

    @property
    def holds_vectors(self) -> bool:
        """True when every full vector is in RAM, so ``stored`` is free (no copy, no disk read)."""

    def image_ids(self) -> np.ndarray:
        """All image ids, ascending: ``[n] int64``."""

    def present(self, image_ids: np.ndarray) -> np.ndarray:
        """The given ids that the index holds, sorted and unique: ``[m] int64`` (the database may be
        ahead of a loaded index while an `index` run in another process goes on)."""

    def vectors_for(self, image_ids: np.ndarray) -> np.ndarray:
        """Full vectors of the given (present) images: ``[n, Q, D] float32``, in the given order."""

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every image: ``(image ids [n] int64, vectors [n, Q, D] float32)``."""

    def memory_bytes(self) -> int:
        """RAM held by the index structures (vectors or codes, ids, quantisers), in bytes."""

    def save(self, path: str | os.PathLike[str], *, generation: int, compact: bool = False, whole: bool = False) -> IndexInfo:
        """Write the index and its sidecar atomically, stamped with ``generation``; return the sidecar. ``compact``:
        leave no space to removed images in the files (``prune``). ``whole``: write new files rather than append to
        the ones it was read from (a process that does not hold the library's lock: see ``FaissVectorStore.save``)."""


def _damaged() -> CorruptIndexError:
    return CorruptIndexError("the vector index holds vectors that are not numbers (NaN or inf): its files are damaged; "
                             "delete the library's vectors.faiss.json and the index is rebuilt from the database")


def _best_per_image(vector_ids: np.ndarray, scores: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the highest score among its returned vectors; ranked (see ``scoring.rank``)."""
    valid = vector_ids >= 0
    image_ids = vector_ids[valid] // q
    scores = scores[valid]
    order = np.lexsort((-scores, image_ids))
    image_ids, scores = image_ids[order], scores[order]
    first = np.ones(len(image_ids), dtype=bool)
    first[1:] = image_ids[1:] != image_ids[:-1]
    image_ids, scores = image_ids[first], scores[first]
    ranked = rank(image_ids, scores)
    return image_ids[ranked], scores[ranked]


class FaissVectorStore:
    """Exact max-inner-product search with FAISS (``IDMap2,Flat``); see the module docstring.

    On a CPU, and for filtered searches, ``search`` scores every (allowed) image with numpy. With
    ``faiss.get_num_gpus() > 0`` unfiltered searches with ``K <= GPU_MAX_K`` run on a GPU copy of
    the index and deeper passes on the CPU index, which stays the master copy (for adds,
    removals, saving and exact re-scoring). Searches may run in parallel threads; ``add``,
    ``remove`` and ``reset`` need exclusive access.
    """

    def __init__(
        self, num_query_tokens: int, dim: int, *, factory: str = EXACT_FACTORY, use_gpu: bool | None = None
    ) -> None:
        if factory != EXACT_FACTORY:
            raise InvalidInputError(
                f"FaissVectorStore is exact ({EXACT_FACTORY!r}), not {factory!r}; "
                "use CompactVectorStore for a compact index"
            )
        if num_query_tokens <= 0 or dim <= 0:
            raise InvalidInputError(f"vector store needs Q > 0 and D > 0, got Q={num_query_tokens}, D={dim}")
        self.num_query_tokens = num_query_tokens
        self.dim = dim
        self.factory = factory
        self._index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        self._image_ids: set[int] = set()
        self._use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self._gpu_index: faiss.Index | None = None
        self._stored_view: tuple[np.ndarray, np.ndarray] | None = None
        self._finite_checked = False  # every stored vector seen to be a number since the last change (`stored`)
        # The saved files this store builds on (see exact_files): a save appends what changed since.
        self._path: Path | None = None
        self._file: RowFiles | None = None  # None: no file (or one of the FAISS layout): the next save writes all
        self._rows: np.ndarray | None = None  # image id of every row of the data file we count on, DEAD where gone
        self._pending: dict[int, np.ndarray | None] = {}  # added since, in order: vectors, or None when in FAISS
        self._data: BinaryIO | None = None  # the data file, while the vectors are not read (a lazy store)
        self._load_lock = threading.Lock()
        # On CPU one FAISS pass over all vectors costs more than scoring every image directly
        # (measured 2x on 5,000 images), so the candidate lists of search_vectors are a GPU path.
        self.multi_vector_lists = self._use_gpu

    # -- contents --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._image_ids)

    @property
    def ntotal(self) -> int:
        """Number of vectors (images x Q)."""
        return len(self._image_ids) * self.num_query_tokens

    @property
    def dead_share(self) -> float:
        """The share of the data file's rows whose images were removed or replaced (until a save rewrites it)."""
        return 0.0 if self._rows is None else self._dead_share()

    @property
    def opened_for_changes(self) -> bool:
        """True for a lazy store that has not read its vectors: it may have written rows past the committed
        ones, which only the holder of the library's lock may do (drop it when the lock is released)."""
        return not self.loaded

    @property
    def loaded(self) -> bool:
        """False while a store opened with ``lazy`` has not read its vectors (its first search reads them)."""
        return self._data is None

    @property
    def holds_vectors(self) -> bool:
        """Always True: the flat index keeps every float32 vector in RAM."""
        return True

    def memory_bytes(self) -> int:
        """RAM of the vectors, the IDMap2 id array and reverse map, and the id set (estimated)."""
        return len(self) * exact_bytes_per_image(self.num_query_tokens, self.dim)

    def _changed(self) -> None:
        """Forget the GPU copy and the flat view; called by every add, remove and reset."""
        self._gpu_index = None
        self._stored_view = None
        self._finite_checked = False

    def _vector_ids(self, image_ids: np.ndarray) -> np.ndarray:
        q = self.num_query_tokens
        return (image_ids[:, None] * q + np.arange(q, dtype=np.int64)[None, :]).reshape(-1)

    def _check_ids(self, image_ids: np.ndarray) -> np.ndarray:
        return check_ids(image_ids, self.num_query_tokens)

    def add(self, image_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace images: ``image_ids [n] int64``, ``vectors [n, Q, D] float32``."""
        ids, array = check_vectors(image_ids, vectors, self.num_query_tokens, self.dim)
        self.remove(ids)
        if not len(ids):
            return
        if self.loaded:
            self._index.add_with_ids(array.reshape(-1, self.dim), self._vector_ids(ids))
        self._image_ids.update(ids.tolist())
        self._changed()
        if self._file is not None:
            for position, image_id in enumerate(ids.tolist()):
                self._pending[image_id] = None if self.loaded else array[position].copy()
            if not self.loaded and len(self._pending) * row_bytes(self.num_query_tokens, self.dim) > PENDING_BYTES:
                self._spill()

    def remove(self, image_ids: np.ndarray) -> int:
        """Remove images (unknown ids are ignored); return how many were present."""
        ids = self._check_ids(image_ids)
        present = np.array([i for i in np.unique(ids).tolist() if i in self._image_ids], dtype=np.int64)
        if len(present):
            if self.loaded:
                self._index.remove_ids(faiss.IDSelectorBatch(self._vector_ids(present)))
            self._image_ids.difference_update(present.tolist())
            self._changed()
            if self._rows is not None:
                self._rows[np.isin(self._rows, present)] = DEAD
            for image_id in present.tolist():
                self._pending.pop(image_id, None)
        return len(present)

    def reset(self) -> None:
        """Remove every image."""
        self._forget_file()
        self._index = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        self._image_ids.clear()
        self._changed()

    def _forget_file(self) -> None:
        """Build on no file: the next save writes every vector."""
        if self._data is not None:
            self._data.close()
        self._path = self._file = self._rows = self._data = None
        self._pending = {}

    def _spill(self) -> None:
        """Write the pending vectors (a lazy store) past the rows counted so far, where the save commits them;
        a data file that cannot be written to is read instead (the pending vectors go into RAM)."""
        if not self._data.writable():
            self._ensure_loaded()
            return
        ids = np.array(list(self._pending), dtype=np.int64)
        try:
            exact_files.write_rows(self._data, len(self._rows), np.stack(list(self._pending.values())))
        except OSError as error:
            raise LibraryError(f"cannot write vectors to {self._data.name} ({error}); free disk space, then run the "
                               "command again") from error
        self._rows = np.concatenate([self._rows, ids])
        self._pending = {}

    def _ensure_loaded(self) -> None:
        """Read the vectors of a lazy store into the FAISS index (in place, one read a run of live rows),
        then the vectors added since."""
        if self._data is not None:
            with self._load_lock:
                if self._data is not None:
                    self._read_rows()

    def _read_rows(self) -> None:
        q, d = self.num_query_tokens, self.dim
        live = self._rows[self._rows != DEAD]
        index = faiss.index_factory(d, self.factory, faiss.METRIC_INNER_PRODUCT)
        flat = faiss.downcast_index(index.index)
        n = len(live) * q
        flat.codes.resize(n * d * 4)
        flat.ntotal = index.ntotal = n
        if n:
            storage = faiss.rev_swig_ptr(flat.codes.data(), n * d * 4).view(np.float32).reshape(len(live), q, d)
            read_vectors(self._data, self._rows, storage, q, d)
            index.id_map.resize(n)
            faiss.rev_swig_ptr(index.id_map.data(), n)[:] = self._vector_ids(live)
        index.construct_rev_map()
        added = [(image_id, vectors) for image_id, vectors in self._pending.items() if vectors is not None]
        if added:
            ids = np.array([image_id for image_id, _ in added], dtype=np.int64)
            index.add_with_ids(np.stack([v for _, v in added]).reshape(-1, d), self._vector_ids(ids))
        self._pending = dict.fromkeys(self._pending)
        self._index = index
        self._data.close()
        self._data = None
        self._changed()

    def image_ids(self) -> np.ndarray:
        """All image ids, ascending: ``[n] int64``."""
        return np.array(sorted(self._image_ids), dtype=np.int64)

    def present(self, image_ids: np.ndarray) -> np.ndarray:
        """The given ids that the index holds, sorted and unique: ``[m] int64``."""
        return np.array([i for i in np.unique(self._check_ids(image_ids)).tolist() if i in self._image_ids], dtype=np.int64)

    # -- search ----------------------------------------------------------------------------

    def _candidates(self, allowed_ids: np.ndarray | None) -> tuple[int, faiss.IDSelector | None]:
        """(number of candidate images, FAISS selector or None for all)."""
        if allowed_ids is None:
            return len(self), None
        allowed = self.present(allowed_ids)
        vector_ids = self._vector_ids(allowed)
        return len(allowed), faiss.IDSelectorBatch(vector_ids)

    def _search_raw(
        self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of ``queries [m, D]``: (scores [m, k], vector ids [m, k]), -1 ids pad."""
        if selector is not None:
            return self._index.search(queries, k, params=faiss.SearchParameters(sel=selector))
        if self._use_gpu and k <= GPU_MAX_K:
            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            return self._gpu_index.search(queries, k)
        return self._index.search(queries, k)

    def _queries(self, queries: np.ndarray, ndim: int) -> np.ndarray:
        return check_queries(queries, ndim, self.dim)

    def search(
        self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k images by max over each image's vectors of the inner product with a query.

        ``queries [m, D] float32`` -> ``(ids [m, k'] int64, scores [m, k'] float32)``, best first,
        ties by ascending id. ``allowed_ids`` restricts candidates inside the search.
        """
        self._ensure_loaded()
        queries = self._queries(queries, 2)
        if not self._use_gpu or allowed_ids is not None:
            return self._search_scan(queries, int(k), allowed_ids)
        n_images, selector = self._candidates(allowed_ids)
        k_out = min(int(k), n_images)
        out_ids = np.zeros((len(queries), max(k_out, 0)), dtype=np.int64)
        out_scores = np.zeros((len(queries), max(k_out, 0)), dtype=np.float32)
        if k_out <= 0:
            return out_ids, out_scores
        total = n_images * self.num_query_tokens
        depth = min(k_out * self.num_query_tokens, total)
        pending = np.arange(len(queries))
        while len(pending):
            scores, vector_ids = self._search_raw(queries[pending], depth, selector)
            unfinished = []
            for row, query_index in enumerate(pending):
                ids, best = _best_per_image(vector_ids[row], scores[row], self.num_query_tokens)
                if depth < total and not best[k_out - 1] > scores[row].min():
                    unfinished.append(query_index)
                    continue
                out_ids[query_index], out_scores[query_index] = ids[:k_out], best[:k_out]
            pending = np.array(unfinished, dtype=np.int64)
            depth = min(depth * 4, total)
        return out_ids, out_scores

    def _search_scan(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``search`` by scoring every (allowed) image with numpy (the CPU path)."""
        image_ids, stored = self._stored()
        rows = None
        if allowed_ids is not None:
            rows = np.flatnonzero(np.isin(image_ids, self._check_ids(allowed_ids)))
        candidates = image_ids if rows is None else image_ids[rows]
        k_out = max(0, min(k, len(candidates)))
        out_ids = np.zeros((len(queries), k_out), dtype=np.int64)
        out_scores = np.zeros((len(queries), k_out), dtype=np.float32)
        if k_out == 0:
            return out_ids, out_scores
        scores = max_scores(queries, stored, rows)
        if not np.isfinite(scores).all():  # unit vectors cannot score NaN or inf: the file was damaged
            raise _damaged()
        for row in range(len(queries)):
            out_ids[row], out_scores[row] = top_k(candidates, scores[row], k_out)
        return out_ids, out_scores

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored image, without copying: ``(image ids [n] int64, vectors [n, Q, D] float32)``.
        CorruptIndexError when a vector is not a number (a damaged file), checked once per load."""
        ids, stored = self._stored()
        if not self._finite_checked:
            for start in range(0, len(stored), _SCORE_CHUNK_IMAGES):
                if not np.isfinite(stored[start : start + _SCORE_CHUNK_IMAGES]).all():
                    raise _damaged()
            self._finite_checked = True
        return ids, stored

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored image without copying: ``(image ids [n] int64, vectors [n, Q, D] float32)``.

        Each ``add`` appends an image's Q vectors together and removal keeps the order, so the
        flat storage is grouped per image; if it ever is not, it is reordered by vector id (a
        copy). The result is kept until the next add, remove or reset: the view points into
        FAISS's storage, which those may move.
        """
        self._ensure_loaded()
        view = self._stored_view
        if view is None:
            view = self._stored_view = self._read_stored()
        return view

    def _read_stored(self) -> tuple[np.ndarray, np.ndarray]:
        q = self.num_query_tokens
        flat = faiss.downcast_index(self._index.index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), self.ntotal * self.dim).reshape(-1, self.dim)
        vector_ids = faiss.vector_to_array(self._index.id_map)
        offsets = vector_ids.reshape(-1, q) - vector_ids[::q, None]
        if not ((offsets == np.arange(q)).all() and (vector_ids[::q] % q == 0).all()):
            order = np.argsort(vector_ids, kind="stable")
            vector_ids, vectors = vector_ids[order], vectors[order]
        return vector_ids[::q] // q, vectors.reshape(-1, q, self.dim)

    _mean_max = staticmethod(mean_max)

    def vectors_for(self, image_ids: np.ndarray) -> np.ndarray:
        """Stored vectors of the given (present) images: ``[n, Q, D] float32``, in the given order."""
        ids = self._check_ids(image_ids)
        missing = [i for i in ids.tolist() if i not in self._image_ids]
        if missing:
            raise InvalidInputError(f"images {missing[:5]} are not in the vector index; search only returns indexed images")
        if not len(ids):
            return np.zeros((0, self.num_query_tokens, self.dim), np.float32)
        self._ensure_loaded()
        out = self._index.reconstruct_batch(self._vector_ids(ids)).reshape(len(ids), self.num_query_tokens, self.dim)
        if not np.isfinite(out).all():
            raise _damaged()
        return out

    def _exact_scores(self, query: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
        """``_mean_max`` for the given images, read from the index: ``[c] float32``."""
        out = np.empty(len(image_ids), dtype=np.float32)
        for start in range(0, len(image_ids), _SCORE_CHUNK_IMAGES):
            part = image_ids[start : start + _SCORE_CHUNK_IMAGES]
            stored = self._index.reconstruct_batch(self._vector_ids(part))
            out[start : start + len(part)] = self._mean_max(query, stored.reshape(len(part), -1, self.dim))
        return out

    def _score_all(self, query: np.ndarray, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Brute force ``_mean_max`` over every (allowed) image: ``(ids [c], scores [c])``."""
        image_ids, stored = self._stored()
        if allowed is not None:
            rows = np.flatnonzero(np.isin(image_ids, allowed))
            image_ids, stored = image_ids[rows], stored[rows]
        scores = np.empty(len(image_ids), dtype=np.float32)
        for start in range(0, len(image_ids), _SCORE_CHUNK_IMAGES):
            end = start + _SCORE_CHUNK_IMAGES
            scores[start:end] = self._mean_max(query, stored[start:end])
        if not np.isfinite(scores).all():
            raise _damaged()
        return image_ids, scores

    def search_vectors(
        self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k images for multi-vector queries ``[m, P, D] float32`` (image-to-image).

        Score: mean over the P query vectors of the max over the image's Q vectors of the inner
        product. Returns ``(ids [m, k'] int64, scores [m, k'] float32)``, best first, ties by id.
        Candidate lists (the threshold algorithm) are used when ``multi_vector_lists`` is set
        (by default on GPU) and cover under a quarter of the images; otherwise every candidate
        image is scored directly, which is exact too.
        """
        self._ensure_loaded()
        queries = self._queries(queries, 3)
        n_images, selector = self._candidates(allowed_ids)
        k_out = min(int(k), n_images)
        out_ids = np.zeros((len(queries), max(k_out, 0)), dtype=np.int64)
        out_scores = np.zeros((len(queries), max(k_out, 0)), dtype=np.float32)
        if k_out <= 0:
            return out_ids, out_scores
        allowed = None if allowed_ids is None else np.unique(self._check_ids(allowed_ids))
        total = n_images * self.num_query_tokens
        for query_index, query in enumerate(queries):
            depth = k_out * self.num_query_tokens if self.multi_vector_lists else total
            while True:
                if depth >= total:
                    candidates, exact = self._score_all(query, allowed)
                    break
                scores, vector_ids = self._search_raw(query, depth, selector)
                candidates = np.unique(vector_ids[vector_ids >= 0] // self.num_query_tokens)
                if 4 * len(candidates) > n_images:
                    depth = total
                    continue
                exact = self._exact_scores(query, candidates)
                kth = float(exact[rank(candidates, exact)[k_out - 1]])
                unseen_best = float(scores.min(axis=1).astype(np.float64).mean())
                if kth > unseen_best + 1e-5 * (1.0 + abs(unseen_best)):  # margin: FAISS vs numpy rounding
                    break
                depth *= 4
            ranked = rank(candidates, exact)[:k_out]
            out_ids[query_index], out_scores[query_index] = candidates[ranked], exact[ranked]
        return out_ids, out_scores

    # -- files -----------------------------------------------------------------------------

    def save(
        self, path: str | os.PathLike[str], *, generation: int, params: dict[str, Any] | None = None, compact: bool = False,
        whole: bool = False,
    ) -> IndexInfo:
        """Write the index's files and sidecar (``exact_files``), stamped with ``generation``.

        A store loaded from the files at ``path`` appends the images added since and marks the rows of
        those removed; it rewrites every row once more than a quarter of them would be dead, or with
        ``compact`` (``prune``) from a tenth on (``exact_files.PRUNE_DEAD_SHARE``). ``params``: build parameters for the sidecar (default
        ``{"store": "exact"}``). When another process saved the index since (a search that rebuilt it), it
        writes every row instead. A lazy store rewrites by streaming its live rows from the data file it
        opened (readable though removed) into the new one: its vectors never all sit in RAM. ``whole``: write every
        row into a new data file whatever the dead share: only the holder of the library's lock may append (an index
        run may have written rows past the committed ones, which another process's append would overwrite).
        """
        target = Path(path)
        info = IndexInfo(
            factory=self.factory, metric="inner_product", num_query_tokens=self.num_query_tokens, dim=self.dim,
            images=len(self), vectors=self.ntotal, vectors_generation=int(generation), faiss_version=faiss.__version__,
            index_bytes=0, params=params or {"store": EXACT_STORE},
        )
        dead = self.dead_share
        rewrite = whole or dead > exact_files.COMPACT_DEAD_SHARE or (compact and dead > 0 and dead >= exact_files.PRUNE_DEAD_SHARE)
        if self._file is not None and self._path == target and not rewrite:
            ids = np.array(list(self._pending), dtype=np.int64)
            rows = np.concatenate([self._rows, ids])
            saved = exact_files.save_appended(target, info, self._file, rows, len(self._rows), self._pending_vectors(ids))
            if saved is not None:
                written, files, data = saved
                if self._data is None:
                    data.close()
                else:  # a lazy store: its vectors, all in that file now, are read from it on first search
                    self._data.close()
                    self._data = data
                self._path, self._file, self._rows, self._pending = target, files, rows, {}
                return written
        if not self.loaded:
            return self._save_streamed(target, info)
        ids, stored = self.stored()  # checked: rows read back from a file (a replaced one) may be damaged
        chunks = (stored[start : start + _SCORE_CHUNK_IMAGES] for start in range(0, len(ids), _SCORE_CHUNK_IMAGES))
        written, files, _ = exact_files.save_full(target, info, ids, chunks)
        self._path, self._file, self._rows, self._pending = target, files, ids.copy(), {}
        return written

    def _save_streamed(self, target: Path, info: IndexInfo) -> IndexInfo:
        """A lazy store's full save: its live rows read from its data file a chunk at a time, then the vectors
        added since, into a new data file; the store stays lazy over the new file."""
        live = np.flatnonzero(self._rows != DEAD)
        added = np.array(list(self._pending), dtype=np.int64)
        ids = np.concatenate([self._rows[live], added])

        def chunks() -> Iterator[np.ndarray]:
            for start in range(0, len(live), _SCORE_CHUNK_IMAGES):
                part = live[start : start + _SCORE_CHUNK_IMAGES]
                out = np.empty((len(part), self.num_query_tokens, self.dim), dtype=np.float32)
                exact_files.read_rows_at(self._data, part, out, self.num_query_tokens, self.dim)
                if not np.isfinite(out).all():  # rows read back from a file may be damaged
                    raise _damaged()
                yield out
            yield from self._pending_vectors(added)

        written, files, data = exact_files.save_full(target, info, ids, chunks(), keep_open=True)
        self._data.close()
        self._data = data
        self._path, self._file, self._rows, self._pending = target, files, ids.copy(), {}
        return written

    def _dead_share(self) -> float:
        """The share of the data file's rows (with the pending ones) whose images were removed or replaced."""
        dead = int((self._rows == DEAD).sum())
        return dead / max(1, len(self._rows) + len(self._pending))

    def _pending_vectors(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        """The vectors of the images added since the last save, ``[<=1024, Q, D]`` chunks in order."""
        for start in range(0, len(ids), _SCORE_CHUNK_IMAGES):
            part = ids[start : start + _SCORE_CHUNK_IMAGES]
            if self.loaded:
                yield self._index.reconstruct_batch(self._vector_ids(part)).reshape(len(part), self.num_query_tokens, self.dim)
            else:
                yield np.stack([self._pending[i] for i in part.tolist()])

    @classmethod
    def from_index(
        cls, index: faiss.Index, num_query_tokens: int, dim: int, *, use_gpu: bool | None = None
    ) -> FaissVectorStore:
        """A store over an ``IDMap2,Flat`` index read from a file (ids ``image_id * Q + q``)."""
        store = cls(num_query_tokens, dim, use_gpu=use_gpu)
        store._index = index
        vector_ids = faiss.vector_to_array(index.id_map)
        store._image_ids = set(np.unique(vector_ids // num_query_tokens).tolist())
        return store

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_generation: int,
        num_query_tokens: int,
        dim: int,
        use_gpu: bool | None = None,
        lazy: bool = False,
        store: str = EXACT_STORE,
    ) -> LoadResult:
        """Load a saved index if it is current; otherwise say why (missing, stale, invalid) so the
        caller rebuilds it from the metadata store (see ``rebuild.py``).

        ``lazy``: read only the row ids now and the vectors on first search; adds and removals before that
        are kept for the next save, which appends them (for an `index` run, which only changes a few
        photos). ``store``: the store the sidecar must name (``compact`` for a compact store's exact phase).
        An index of the older layout (one FAISS file) is read whole; the next save writes the new one.
        """
        try:
            older = read_sidecar(path).format == SIDECAR_FORMAT
        except (OSError, ValueError, TypeError):
            older = False
        if older:
            outcome = read_index_files(path, expected_generation=expected_generation, factory=EXACT_FACTORY,
                                       num_query_tokens=num_query_tokens, dim=dim, store=store)
            if outcome.state != "ok":
                return LoadResult(None, outcome.state, outcome.reason, outcome.info)
            return LoadResult(cls.from_index(outcome.index, num_query_tokens, dim, use_gpu=use_gpu), "ok", outcome.reason, outcome.info)
        read = exact_files.read_rows(path, expected_generation=expected_generation, num_query_tokens=num_query_tokens, dim=dim,
                                     store=store, writable=lazy)
        if read.state != "ok":
            return LoadResult(None, read.state, read.reason, read.info)
        opened = cls(num_query_tokens, dim, use_gpu=use_gpu)
        opened._index = None
        opened._path, opened._file, opened._rows, opened._data = Path(path), read.files, read.row_ids.copy(), read.data
        opened._image_ids = set(read.row_ids[read.row_ids != DEAD].tolist())
        if not lazy:
            try:
                opened._ensure_loaded()
            except CorruptIndexError as error:  # cut short
                read.data.close()
                return LoadResult(None, "invalid", str(error), read.info)
        return LoadResult(opened, "ok", read.reason, read.info)


@dataclass(frozen=True)
class LoadResult:
    """Outcome of a store's ``load``: ``store`` is set exactly when ``state`` is ``"ok"``.

    ``state``: ``ok``, ``missing`` (no files), ``stale`` (older vectors generation than the
    library) or ``invalid`` (unreadable, or built for another shape); ``reason`` says which.
    """

    store: VectorStore | None
    state: LoadState
    reason: str
    info: IndexInfo | None = None

    @property
    def ok(self) -> bool:
        """True when the saved index is current and loaded."""
        return self.state == "ok"
