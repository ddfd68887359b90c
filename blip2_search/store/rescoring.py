"""The compact store's search: approximate candidates from PQ codes, then exact rescoring.

For one query (a text vector ``[D]``, or an image's vectors ``[P, D]``):

1. ``approximate_images`` asks the IVF index for the best ``depth`` vectors of each query row
   and takes each image's best one as its approximate score (for P rows: the mean over the rows,
   a row that missed the image counting at that row's lowest returned score);
2. ``rescore_top_k`` reads the full float32 vectors of the best candidates through ``exact``
   (in a library: the metadata database, the source of truth) a batch at a time, and stops when
   the next candidate's approximate score is below what an image whose exact score reaches the
   current k-th would show: ``slope * kth + intercept - margin_sigmas * sigma``, a line fitted
   at training time (``calibrate``). PQ shrinks scores (slope ~0.7) and adds noise (sigma
   ~0.03 for 4-bit codes of 256-d BLIP-2-like vectors), so the line is what makes the stopping
   point follow the data. If the candidates run out first it asks for 4x deeper lists (more IVF
   lists when the probed ones are exhausted), up to ``rescore_max`` rescored images.

Returned scores are exact, and the ranking is exact among the rescored images; an image whose
quantisation error hid it below the stopping line is missed (docs/benchmarks.md measures recall).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from blip2_search.store.scoring import rank, top_k

Exact = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Exact scores of images for a query: ``(query [D] or [P, D], ids [c])`` -> ``[c] float32``."""

_BITMAP_MAX_BITS = 1 << 29  # filters by bitmap over vector ids up to 64 MiB, else by id set


@dataclass(frozen=True)
class CompactParams:
    """Search settings of the compact store (not build parameters: changing them needs no rebuild).

    ``nprobe``: IVF lists searched first (None: nlist / 16, at least 16). ``rescore_batch``:
    images rescored per read (at least 2 k). ``rescore_max``: at most this many images rescored
    per query. ``margin_sigmas``: width of the stopping margin in calibrated standard deviations
    (3.0: recall@10 0.999 at 100k clustered images, against 0.9925 with 2.5; bench/search.py).
    """

    nprobe: int | None = None
    rescore_batch: int = 64
    rescore_max: int = 4096
    margin_sigmas: float = 3.0


@dataclass(frozen=True)
class Calibration:
    """How approximate scores relate to exact ones: ``approx ~ slope * exact + intercept``, with
    residual standard deviation ``sigma``; fitted on held-out training vectors."""

    slope: float
    intercept: float
    sigma: float


def calibrate(index: faiss.Index, held: np.ndarray, directions: np.ndarray) -> Calibration:
    """Fit ``approx = slope * exact + intercept`` over held-out vectors ``[h, D]`` x data-like
    directions ``[r, D]`` (the approximate side decoded from the codes, as the search scores them)."""
    decoded = index.sa_decode(index.sa_encode(held))
    exact = (held @ directions.T).ravel().astype(np.float64)
    approx = (decoded @ directions.T).ravel().astype(np.float64)
    slope, intercept = np.polyfit(exact, approx, 1)
    sigma = float(np.std(approx - (slope * exact + intercept)))
    return Calibration(float(slope), float(intercept), sigma)


def id_selector(vector_ids: np.ndarray) -> tuple[faiss.IDSelector, object]:
    """A FAISS selector of ``vector_ids [n] int64``, and the array that must outlive it: a bitmap
    when the largest id allows (cheap to build), else FAISS's id set."""
    bits = int(vector_ids.max()) + 1
    if bits <= _BITMAP_MAX_BITS:
        mask = np.zeros(bits, dtype=bool)
        mask[vector_ids] = True
        bitmap = np.packbits(mask, bitorder="little")
        return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap  # its size in bytes, not bits
    return faiss.IDSelectorBatch(vector_ids), vector_ids


def approximate_images(
    index: faiss.Index,
    query: np.ndarray,
    num_query_tokens: int,
    depth: int,
    search_params: faiss.SearchParametersIVF,
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Approximate image scores from the best ``depth`` vectors of each query row.

    ``query [D]`` or ``[P, D]`` -> ``(image ids [c], approx [c], bound, exhausted)``: images not
    returned score (approximately) at most ``bound``; ``exhausted`` when the probed lists held
    fewer than ``depth`` vectors. Vector ids are ``image_id * Q + q``.
    """
    rows = query.reshape(-1, query.shape[-1])
    scores, vector_ids = index.search(rows, depth, params=search_params)
    valid = vector_ids >= 0
    exhausted = bool((~valid).any())
    lows = np.where(valid.any(axis=1), np.where(valid, scores, np.inf).min(axis=1), -np.inf)
    image_ids = vector_ids // num_query_tokens
    found = np.unique(image_ids[valid])
    approx = np.repeat(lows[:, None], len(found), axis=1)  # [P, c]: unseen rows at their low
    for p in range(len(rows)):
        ids, best = image_ids[p][valid[p]], scores[p][valid[p]]
        order = np.lexsort((-best, ids))
        ids, best = ids[order], best[order]
        first = np.r_[True, ids[1:] != ids[:-1]]
        approx[p, np.searchsorted(found, ids[first])] = best[first]
    return found, approx.mean(axis=0).astype(np.float32), float(lows.mean()), exhausted


def rescore_top_k(
    index: faiss.Index,
    query: np.ndarray,
    exact: Exact,
    *,
    k: int,
    batch: int,
    n_candidates: int,
    num_query_tokens: int,
    calibration: Calibration,
    params: CompactParams,
    search_params: faiss.SearchParametersIVF,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` among candidates taken in approximate order (module docstring):
    ``(ids [<= k] int64, exact scores float32)``, ranked; fewer than k only when the probed
    lists never returned enough of the ``n_candidates`` (the caller then scores them all)."""
    margin = params.margin_sigmas * calibration.sigma
    nlist = faiss.extract_index_ivf(index).nlist
    nprobe = min(nlist, params.nprobe or max(16, nlist // 16))
    total = n_candidates * num_query_tokens
    depth = min(total, max(4096, 8 * batch))
    seen_ids: list[np.ndarray] = []
    seen_scores: list[np.ndarray] = []
    n_seen = 0
    while True:
        search_params.nprobe = nprobe
        found, approx, bound, exhausted = approximate_images(index, query, num_query_tokens, depth, search_params)
        if seen_ids:
            fresh = ~np.isin(found, np.concatenate(seen_ids))
            found, approx = found[fresh], approx[fresh]
        order = rank(found, approx)
        found, approx = found[order], approx[order]
        position, finished = 0, False
        while True:
            kth = None
            if n_seen >= k:
                scores = np.concatenate(seen_scores)
                kth = float(np.partition(scores, len(scores) - k)[len(scores) - k])
            upcoming = approx[position] if position < len(found) else bound
            if kth is not None and upcoming < calibration.slope * kth + calibration.intercept - margin:
                finished = True
                break
            if n_seen >= params.rescore_max or position >= len(found):
                finished = n_seen >= params.rescore_max
                break
            take = found[position : position + batch]
            position += len(take)
            seen_ids.append(take)
            seen_scores.append(exact(query, take))
            n_seen += len(take)
        saw_all = (depth >= total and not exhausted) or (exhausted and nprobe >= nlist)
        if finished or saw_all:
            break
        if exhausted:
            nprobe = min(nlist, nprobe * 4)
        else:
            depth = min(total, depth * 4)
    if not seen_ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return top_k(np.concatenate(seen_ids), np.concatenate(seen_scores), k)
