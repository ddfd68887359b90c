"""Compact vector search for large libraries: 4-bit PQ codes in RAM, exact rescoring from disk.

``CompactVectorStore`` keeps every query vector of every image as a 4-bit product-quantisation
code in a FAISS IVF fast-scan index (``IVF{nlist},PQ{D/4}x4fs``: D / 8 bytes a vector plus its
8-byte id, ~1.3 KB an image for 32 x 256). A search takes candidates from the codes and rescores
the best of them exactly from the full vectors read through ``vectors_of`` (``rescoring.py``):
returned scores are exact; recall is measured in docs/benchmarks.md.

Below ``train_at`` images the store holds exact vectors (an inner ``FaissVectorStore``) and is
exact; on reaching it, it trains on a random sample of them and moves to codes, so a library can
grow past its memory budget in one indexing run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import faiss
import numpy as np

from blip2_search.errors import InvalidInputError, LibraryError
from blip2_search.store.index_choice import (
    COMPACT_MIN_IMAGES,
    EXACT_FACTORY,
    compact_factory,
    compact_lists,
)
from blip2_search.store.index_files import (
    COMPACT_STORE,
    IndexInfo,
    read_index_files,
    read_sidecar,
    save_vector_index,
)
from blip2_search.store.exact_files import uses_rows
from blip2_search.store.rescoring import (
    Calibration,
    CompactParams,
    calibrate,
    id_selector,
    rescore_top_k,
)
from blip2_search.store.scoring import (
    check_ids,
    check_queries,
    check_vectors,
    rescore,
    top_k,
)
from blip2_search.store.vectors import FaissVectorStore, LoadResult

VectorsOf = Callable[[np.ndarray], np.ndarray]
"""Full vectors by image id: ``ids [n] int64`` -> ``[n, Q, D] float32`` in that order; NaN rows for
images the source no longer holds (removed by ``prune`` while a search ran): they score -inf."""

_TRAIN_VECTORS = 65_536  # at least this many training vectors when the library has them
_CALIBRATION_VECTORS, _CALIBRATION_DIRECTIONS = 2048, 256
_ADD_CHUNK_IMAGES = 4096


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(np.floor(np.log2(max(x, 1.0)))))


class CompactVectorStore:
    """Approximate candidates from PQ codes, exact scores from ``vectors_of``; see the module docstring.

    ``vectors_of``: reads the full vectors of stored images (only needed once trained).
    ``train_at``: the image count at which the store trains itself and moves to codes (None:
    never on its own; ``train`` still does). Searches may run in parallel threads; ``add``,
    ``remove``, ``reset`` and ``train`` need exclusive access.
    """

    def __init__(
        self,
        num_query_tokens: int,
        dim: int,
        *,
        vectors_of: VectorsOf | None,
        train_at: int | None = COMPACT_MIN_IMAGES,
        params: CompactParams | None = None,
        use_gpu: bool | None = None,
        seed: int = 0,
    ) -> None:
        compact_factory(0, dim)  # D must suit the codes
        self.num_query_tokens = num_query_tokens
        self.dim = dim
        self.vectors_of = vectors_of
        self.train_at = train_at
        self.params = params or CompactParams()
        self.seed = seed
        self._exact: FaissVectorStore | None = FaissVectorStore(num_query_tokens, dim, use_gpu=use_gpu)
        self._index: faiss.Index | None = None
        self._ivf: faiss.IndexIVF | None = None
        self._ids = np.zeros(0, dtype=np.int64)  # sorted image ids (compact phase)
        self.calibration: Calibration | None = None
        self.factory = EXACT_FACTORY

    # -- contents --------------------------------------------------------------------------

    @property
    def trained(self) -> bool:
        """True once the store holds codes rather than exact vectors."""
        return self._exact is None

    @property
    def dead_share(self) -> float:
        """``FaissVectorStore.dead_share`` of the exact phase; 0 once trained."""
        return self._exact.dead_share if self._exact is not None else 0.0

    @property
    def opened_for_changes(self) -> bool:
        """True while its exact vectors are a lazy store that has not read them (``FaissVectorStore``)."""
        return self._exact is not None and self._exact.opened_for_changes

    @property
    def holds_vectors(self) -> bool:
        """True before training (exact vectors in RAM), False after (they are read from disk)."""
        return self._exact is not None

    def __len__(self) -> int:
        return len(self._exact) if self._exact is not None else len(self._ids)

    @property
    def ntotal(self) -> int:
        """Number of vectors (images x Q)."""
        return self._exact.ntotal if self._exact is not None else int(self._index.ntotal)

    def image_ids(self) -> np.ndarray:
        """All image ids, ascending: ``[n] int64``."""
        return self._exact.image_ids() if self._exact is not None else self._ids.copy()

    def present(self, image_ids: np.ndarray) -> np.ndarray:
        """The given ids that the index holds, sorted and unique: ``[m] int64``."""
        if self._exact is not None:
            return self._exact.present(image_ids)
        return self._present(check_ids(image_ids, self.num_query_tokens))

    def memory_bytes(self) -> int:
        """RAM of the index: codes (in 32-code blocks), their ids, the coarse quantiser, the PQ
        tables and the image id array; before training, that of the exact store."""
        if self._exact is not None:
            return self._exact.memory_bytes()
        ivf, lists = self._ivf, self._ivf.invlists
        sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        block = getattr(ivf, "bbs", 1)
        codes = int((-(-sizes // block) * block).sum()) * ivf.code_size
        quantizer = ivf.nlist * self.dim * 4
        pq = 16 * self.dim * 4  # 2**4 centroids of D / M dims for each of M sub-quantisers
        return codes + 8 * int(sizes.sum()) + quantizer + pq + self._ids.nbytes

    def _vector_ids(self, image_ids: np.ndarray) -> np.ndarray:
        q = self.num_query_tokens
        return (image_ids[:, None] * q + np.arange(q, dtype=np.int64)[None, :]).reshape(-1)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        """The sorted unique ids among ``ids`` that are stored (compact phase)."""
        ids = np.unique(ids)
        if not len(self._ids) or not len(ids):
            return ids[:0]
        at = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return ids[self._ids[at] == ids]

    def add(self, image_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace images: ``image_ids [n] int64``, ``vectors [n, Q, D] float32``."""
        if self._exact is not None:
            self._exact.add(image_ids, vectors)
            if self.train_at is not None and len(self._exact) >= self.train_at:
                self.train(self._exact_sample())
            return
        ids, array = check_vectors(image_ids, vectors, self.num_query_tokens, self.dim)
        self.remove(ids)
        if len(ids):
            self._index.add_with_ids(array.reshape(-1, self.dim), self._vector_ids(ids))
            new = np.sort(ids)
            if len(self._ids) and new[0] < self._ids[-1]:
                self._ids = np.union1d(self._ids, new)
            else:  # ids usually grow: appending keeps the array sorted without a merge
                self._ids = np.concatenate([self._ids, new])

    def remove(self, image_ids: np.ndarray) -> int:
        """Remove images (unknown ids are ignored); return how many were present."""
        if self._exact is not None:
            return self._exact.remove(image_ids)
        present = self._present(check_ids(image_ids, self.num_query_tokens))
        if len(present):
            self._index.remove_ids(faiss.IDSelectorBatch(self._vector_ids(present)))
            self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
        return len(present)

    def reset(self) -> None:
        """Remove every image (a trained store stays trained)."""
        if self._exact is not None:
            self._exact.reset()
        else:
            self._index.reset()
            self._ids = np.zeros(0, dtype=np.int64)

    # -- training --------------------------------------------------------------------------

    def sample_size(self, n_images: int) -> int:
        """How many training vectors to draw for a library of ``n_images``."""
        lists = compact_lists(n_images * self.num_query_tokens)
        return min(n_images * self.num_query_tokens, max(_TRAIN_VECTORS, 64 * lists))

    def _exact_sample(self) -> np.ndarray:
        """A random sample of the exact store's vectors: ``[s, D] float32``."""
        _, stored = self._exact.stored()
        flat = stored.reshape(-1, self.dim)
        rng = np.random.default_rng(self.seed)
        picks = rng.choice(len(flat), self.sample_size(len(stored)), replace=False)
        return flat[np.sort(picks)]

    def train(self, sample: np.ndarray, *, expected_images: int | None = None) -> None:
        """Train the codes on ``sample [s, D] float32`` (random vectors of the library) and move
        every stored image to them.

        ``expected_images``: how many images the index is built for (sets the IVF list count;
        default: the larger of the current count and ``train_at``).
        """
        if self._exact is None:
            raise InvalidInputError("the compact store is already trained; reset it by building a new one")
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if sample.ndim != 2 or sample.shape[1] != self.dim or len(sample) < 64:
            raise InvalidInputError(
                f"training sample has shape {sample.shape}, expected at least [64, {self.dim}]; "
                "train on more images"
            )
        expected = max(expected_images or 0, len(self), self.train_at or 0)
        lists = min(compact_lists(expected * self.num_query_tokens), max(1, _pow2_floor(len(sample) / 39)))
        factory = re.sub(r"^IVF\d+", f"IVF{lists}", compact_factory(0, self.dim))
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(sample))
        held = min(_CALIBRATION_VECTORS, len(sample) // 4)
        index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(sample[order[held:]])
        directions = sample[order[held:][:_CALIBRATION_DIRECTIONS]]
        calibration = calibrate(index, sample[order[:held]], directions)
        exact = self._exact
        self._index, self._ivf = index, faiss.extract_index_ivf(index)
        self.calibration, self.factory = calibration, factory
        self._exact, self._ids = None, np.zeros(0, dtype=np.int64)
        ids, stored = exact.stored()
        for start in range(0, len(ids), _ADD_CHUNK_IMAGES):
            self.add(ids[start : start + _ADD_CHUNK_IMAGES], stored[start : start + _ADD_CHUNK_IMAGES])

    def needs_retraining(self) -> bool:
        """True when the library grew 16x past what the IVF lists were sized for (lists 4x too
        long: searches slow down), so the caller should rebuild."""
        if self._ivf is None:
            return False
        return compact_lists(self.ntotal) >= 4 * self._ivf.nlist

    # -- reading full vectors ---------------------------------------------------------------

    def _exact_scores(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact scores of ``ids`` (``rescore``); -inf for images the source no longer holds."""
        scores = rescore(query, self._read(ids))
        return np.where(np.isnan(scores), -np.inf, scores).astype(np.float32)

    def _read_all_present(self, ids: np.ndarray) -> np.ndarray:
        vectors = self._read(ids)
        gone = np.isnan(vectors[:, 0, 0]) if len(ids) else np.zeros(0, dtype=bool)
        if gone.any():
            raise LibraryError(
                f"the database no longer holds the vectors of images {ids[gone][:5].tolist()} (pruned, changed or "
                "being re-embedded by another process since the vector index was loaded); search again"
            )
        return vectors

    def _read(self, ids: np.ndarray) -> np.ndarray:
        if self.vectors_of is None:
            raise LibraryError("the compact vector store has no source of full vectors; pass vectors_of")
        vectors = np.asarray(self.vectors_of(ids), dtype=np.float32)
        expected = (len(ids), self.num_query_tokens, self.dim)
        if vectors.shape != expected:
            raise LibraryError(
                f"the full-vector source returned shape {vectors.shape}, expected {expected}; "
                "rebuild the vector index (delete the library's vectors.faiss.json) if the library changed"
            )
        return vectors

    def vectors_for(self, image_ids: np.ndarray) -> np.ndarray:
        """Full vectors of the given (present) images: ``[n, Q, D] float32``, in the given order."""
        if self._exact is not None:
            return self._exact.vectors_for(image_ids)
        ids = check_ids(image_ids, self.num_query_tokens)
        missing = np.setdiff1d(ids, self._present(ids))
        if len(missing):
            raise InvalidInputError(
                f"images {missing[:5].tolist()} are not in the vector index; search only returns indexed images"
            )
        return self._read_all_present(ids)

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every image: ``(ids [n] int64, vectors [n, Q, D] float32)``; once trained this reads
        every image's vectors through ``vectors_of`` (n x Q x D x 4 bytes: small libraries only)."""
        if self._exact is not None:
            return self._exact.stored()
        return self._ids.copy(), self._read_all_present(self._ids)

    # -- search ----------------------------------------------------------------------------

    def _candidates(self, allowed_ids: np.ndarray | None) -> np.ndarray | None:
        """Stored allowed image ids (sorted), or None for all."""
        if allowed_ids is None:
            return None
        return self._present(check_ids(allowed_ids, self.num_query_tokens))

    def search(
        self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k images by max over each image's vectors of the inner product with a query.

        ``queries [m, D] float32`` -> ``(ids [m, k'] int64, scores [m, k'] float32)``, best first,
        ties by ascending id; scores are exact (see the module docstring for what may be missed).
        """
        if self._exact is not None:
            return self._exact.search(queries, k, allowed_ids=allowed_ids)
        queries = check_queries(queries, 2, self.dim)
        return self._search_each(queries, k, allowed_ids, self._exact_scores)

    def search_vectors(
        self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k images for multi-vector queries ``[m, P, D] float32`` (image-to-image): mean over
        the P query vectors of the max over the image's vectors; exact scores, as ``search``."""
        if self._exact is not None:
            return self._exact.search_vectors(queries, k, allowed_ids=allowed_ids)
        queries = check_queries(queries, 3, self.dim)
        return self._search_each(queries, k, allowed_ids, self._exact_scores)

    def _search_each(self, queries, k, allowed_ids, exact) -> tuple[np.ndarray, np.ndarray]:
        allowed = self._candidates(allowed_ids)
        n_candidates = len(self) if allowed is None else len(allowed)
        k_out = max(0, min(int(k), n_candidates))
        out_ids = np.zeros((len(queries), k_out), dtype=np.int64)
        out_scores = np.zeros((len(queries), k_out), dtype=np.float32)
        if k_out == 0:
            return out_ids, out_scores
        batch = max(self.params.rescore_batch, 2 * k_out)
        keep: object = None
        search_params = faiss.SearchParametersIVF()
        if allowed is not None:
            if len(allowed) <= 2 * batch:  # few enough to score them all
                for row, query in enumerate(queries):
                    out_ids[row], out_scores[row] = top_k(allowed, exact(query, allowed), k_out)
                return out_ids, out_scores
            search_params.sel, keep = id_selector(self._vector_ids(allowed))
        for row, query in enumerate(queries):
            ids, scores = rescore_top_k(
                self._index, query, exact, k=k_out, batch=batch,
                n_candidates=n_candidates, num_query_tokens=self.num_query_tokens,
                calibration=self.calibration, params=self.params, search_params=search_params,
            )
            if len(ids) < k_out:  # the lists missed candidates (cannot happen unfiltered): score all
                pool = self._ids if allowed is None else allowed
                ids, scores = top_k(pool, exact(query, pool), k_out)
            out_ids[row], out_scores[row] = ids, scores
        del keep
        return out_ids, out_scores

    # -- files -----------------------------------------------------------------------------

    def build_params(self) -> dict:
        """What the sidecar records: the store, its phase, and (trained) the calibration."""
        params: dict = {"store": COMPACT_STORE, "trained": self.trained}
        if self.calibration is not None:
            params["calibration"] = asdict(self.calibration)
        return params

    def save(self, path: str | os.PathLike[str], *, generation: int, compact: bool = False, whole: bool = False) -> IndexInfo:
        """Write the index (exact vectors or codes) and its sidecar atomically (``index_files``); ``compact``, ``whole``:
        see ``FaissVectorStore.save`` (codes are always written whole)."""
        if self._exact is not None:
            return self._exact.save(path, generation=generation, params=self.build_params(), compact=compact, whole=whole)
        return save_vector_index(
            self._index, path, factory=self.factory, num_query_tokens=self.num_query_tokens, dim=self.dim,
            images=len(self), vectors=self.ntotal, generation=generation, params=self.build_params(),
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_generation: int,
        num_query_tokens: int,
        dim: int,
        vectors_of: VectorsOf | None,
        train_at: int | None = COMPACT_MIN_IMAGES,
        params: CompactParams | None = None,
        use_gpu: bool | None = None,
        lazy: bool = False,
    ) -> LoadResult:
        """Load a saved compact index if it is current and was built by this store with codes
        for this D; otherwise say why (missing, stale, invalid) so the caller rebuilds it.
        ``lazy``: exact vectors (below ``train_at``) are opened for changes (``FaissVectorStore.load``)."""
        if uses_rows(_sidecar_or_none(path)):  # exact vectors (below train_at): the exact store's files
            exact = FaissVectorStore.load(path, expected_generation=expected_generation, num_query_tokens=num_query_tokens,
                                          dim=dim, use_gpu=use_gpu, store=COMPACT_STORE, lazy=lazy)
            if exact.store is None:
                return exact
            store = cls(num_query_tokens, dim, vectors_of=vectors_of, train_at=train_at, params=params, use_gpu=use_gpu)
            store._exact = exact.store
            if train_at is not None and len(store._exact) >= train_at:
                store.train(store._exact_sample())
            return LoadResult(store, "ok", exact.reason, exact.info)
        outcome = read_index_files(
            path,
            expected_generation=expected_generation,
            factory=None,
            num_query_tokens=num_query_tokens,
            dim=dim,
            store=COMPACT_STORE,
        )
        if outcome.state != "ok":
            return LoadResult(None, outcome.state, outcome.reason, outcome.info)
        info = outcome.info
        store = cls(num_query_tokens, dim, vectors_of=vectors_of, train_at=train_at, params=params, use_gpu=use_gpu)
        expected_codes = compact_factory(0, dim).split(",", 1)[1]
        trained = bool(info.params.get("trained"))
        if not trained and info.factory == EXACT_FACTORY and isinstance(outcome.index, faiss.IndexIDMap2):
            store._exact = FaissVectorStore.from_index(outcome.index, num_query_tokens, dim, use_gpu=use_gpu)
            if train_at is not None and len(store._exact) >= train_at:
                store.train(store._exact_sample())
            return LoadResult(store, "ok", outcome.reason, info)
        calibration = _calibration(info.params.get("calibration"))
        match = re.fullmatch(r"IVF(\d+),(.+)", info.factory)
        if not (trained and calibration and match and match.group(2) == expected_codes):
            return LoadResult(
                None, "invalid", f"index {path} was built as {info.factory!r} {info.params}, "
                f"expected a compact IVF...,{expected_codes} index", info,
            )
        store._index = outcome.index
        store._ivf = faiss.extract_index_ivf(outcome.index)
        store._exact, store.factory = None, info.factory
        store.calibration = calibration
        store._ids = _stored_image_ids(store._ivf, num_query_tokens)
        if train_at is not None and len(store._ids) < SHRINK_BACK * train_at:  # `auto` after `compact`, a library pruned small
            return LoadResult(None, "stale", f"index {path} holds compact codes of {len(store._ids)} images, well under the "
                              f"{train_at} at which this library's index turns compact", info)
        return LoadResult(store, "ok", outcome.reason, info)


def _calibration(recorded: Any) -> Calibration | None:
    """The sidecar's calibration, or None when it is missing or damaged (not three numbers): the index is then rebuilt."""
    try:
        calibration = Calibration(**recorded)
    except TypeError:
        return None
    numbers = (calibration.slope, calibration.intercept, calibration.sigma)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in numbers):
        return None
    return calibration


def _sidecar_or_none(path: str | os.PathLike[str]) -> IndexInfo | None:
    try:
        return read_sidecar(path)
    except (OSError, ValueError, TypeError):
        return None


SHRINK_BACK = 0.9
"""A trained compact index goes back to exact vectors only below this share of its threshold, so a library
near it (an unplugged drive, a prune) does not rebuild and retrain at every crossing."""


def _stored_image_ids(ivf: faiss.IndexIVF, num_query_tokens: int) -> np.ndarray:
    """Sorted image ids of every vector in the inverted lists."""
    lists = ivf.invlists
    parts = [np.zeros(0, dtype=np.int64)]
    for i in range(ivf.nlist):
        size = lists.list_size(i)
        if size:
            parts.append(faiss.rev_swig_ptr(lists.get_ids(i), size) // num_query_tokens)
    return np.unique(np.concatenate(parts))
