"""Exact scoring helpers shared by the vector stores: input checks, max-over-Q scores, top k.

Scores follow ``vectors.py``: an image's score for a query vector is the max over its Q vectors
of the inner product; for a multi-vector query ``[P, D]`` the mean over P of that max. Rankings
are by score descending, ties by image id ascending.
"""

from __future__ import annotations

import numpy as np

from blip2_search.errors import InvalidInputError

_SCAN_CHUNK_FLOATS = 1 << 22  # scores held at once by max_scores (16 MiB)
_GATHER_CHUNK_FLOATS = 1 << 24  # filtered images copied at once by max_scores (64 MiB: 2,048 ViT-g images)


def rank(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Order of (ids, scores) by score descending, then id ascending."""
    return np.lexsort((ids, -scores))


def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of ``ids [n]`` by ``scores [n]``, ranked (see ``rank``), ties at the k-th
    score included before the cut: ``(ids [k'], scores [k'])``."""
    if k <= 0 or not len(ids):
        return ids[:0], scores[:0]
    if k < len(scores):
        kth = scores[np.argpartition(-scores, k - 1)[:k]].min()
        keep = np.flatnonzero(scores >= kth)
        ids, scores = ids[keep], scores[keep]
    ranked = rank(ids, scores)[:k]
    return ids[ranked], scores[ranked]


def max_scores(queries: np.ndarray, stored: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Max over each image's Q vectors of the inner product with each query.

    ``queries [m, D]``, ``stored [n, Q, D]``, optional ``rows [c]`` (images to score) ->
    ``[m, n or c] float32``. Scores a chunk of images at a time with one matrix product.
    """
    n, q, d = stored.shape
    count = n if rows is None else len(rows)
    out = np.empty((len(queries), count), dtype=np.float32)
    step = max(1, _SCAN_CHUNK_FLOATS // (q * max(len(queries), 1)))
    gathered = None
    if rows is not None:  # the chosen images are copied a bounded chunk at a time into one buffer
        step = min(step, max(1, _GATHER_CHUNK_FLOATS // (q * d)))
        gathered = np.empty((min(step, count), q, d), dtype=stored.dtype)
    for start in range(0, count, step):
        if rows is None:
            part = stored[start : start + step]
        else:
            chunk = rows[start : start + step]
            part = np.take(stored, chunk, axis=0, out=gathered[: len(chunk)], mode="clip")  # rows are valid
        if len(queries) == 1:  # matrix-vector: no BLAS threads to wake for one query
            out[0, start : start + len(part)] = (part.reshape(-1, d) @ queries[0]).reshape(len(part), q).max(axis=1)
        else:
            sims = part.reshape(-1, d) @ queries.T  # [c * Q, m]
            out[:, start : start + len(part)] = sims.reshape(len(part), q, -1).max(axis=1).T
    return out


def check_ids(image_ids: np.ndarray, num_query_tokens: int) -> np.ndarray:
    """``image_ids`` as ``[n] int64``; InvalidInputError unless 1-D, integer and in range."""
    ids = np.asarray(image_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise InvalidInputError(f"image ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    limit = np.iinfo(np.int64).max // num_query_tokens
    if ids.size and (ids.min() < 0 or ids.max() >= limit):
        raise InvalidInputError(f"image ids must be in [0, {limit}); pass the library's image ids")
    return ids


def check_vectors(
    image_ids: np.ndarray, vectors: np.ndarray, num_query_tokens: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``add`` arguments: ``(ids [n] int64, vectors [n, Q, D] float32, C-contiguous)``."""
    ids = check_ids(image_ids, num_query_tokens)
    shape = (len(ids), num_query_tokens, dim)
    array = np.asarray(vectors)
    if array.shape != shape:
        raise InvalidInputError(f"vectors have shape {array.shape}, expected {shape}")
    if len(np.unique(ids)) != len(ids):
        raise InvalidInputError("image ids passed to add() repeat; pass each image once")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InvalidInputError("vectors contain NaN or infinity; check the embedder's output")
    return ids, array


def check_queries(queries: np.ndarray, ndim: int, dim: int) -> np.ndarray:
    """Checked queries, ``[m, D]`` (ndim 2) or ``[m, P, D]`` (ndim 3), float32, C-contiguous."""
    array = np.asarray(queries)
    if array.ndim != ndim or array.shape[-1] != dim:
        expected = "[m, D]" if ndim == 2 else "[m, P, D]"
        raise InvalidInputError(f"queries have shape {array.shape}, expected {expected} with D={dim}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InvalidInputError("queries contain NaN or infinity; check the encoder's output")
    return array


def mean_max(query: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Mean over query vectors ``[P, D]`` of max over each image's ``[c, Q, D]``: ``[c] float32``."""
    c, q, d = stored.shape
    sims = (stored.reshape(c * q, d) @ query.T).reshape(c, q, len(query))
    return sims.max(axis=1).astype(np.float64).mean(axis=1).astype(np.float32)


def rescore(query: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Exact scores of a small batch of images, without BLAS threads (numpy's einsum loops).

    ``query [D]`` -> max over Q (``search``); ``query [P, D]`` -> mean over P of max over Q
    (``search_vectors``); ``stored [c, Q, D]`` -> ``[c] float32``. For the compact store's
    batches of ~64 images, waking BLAS threads costs more than the product itself: 6 ms instead of
    0.2 ms per batch on a busy 2-core machine (bench/search.py).
    """
    if query.ndim == 1:
        return np.einsum("cqd,d->cq", stored, query).max(axis=1).astype(np.float32)
    sims = np.einsum("cqd,pd->cpq", stored, query).max(axis=2)
    return sims.astype(np.float64).mean(axis=1).astype(np.float32)
