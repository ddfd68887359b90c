"""Near-duplicate photos: groups whose image-to-image score reaches a threshold, without n^2 exact scores.

The exact score of image B for image A is the mean over A's Q vectors of the max over B's Q
vectors of the inner product (``VectorStore.search_vectors``); scoring every pair costs n^2 Q^2 D
(a day at 100k images). Near duplicates have nearly the same Q vectors, so they also have nearly
the same *summary*, the mean of their Q vectors (centred, normalised). Each image's nearest summaries
(FAISS inner-product search, a flat index up to ``EXACT_SUMMARY_MAX`` images, IVF beyond) are its
candidates; only those pairs get the exact score, and pairs at or above the threshold join one
group (union-find).
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from ..store.scoring import mean_max

EXACT_SUMMARY_MAX = 10_000
"""Up to this many images the summary neighbours come from a flat (exact) index; beyond, from IVF.

The flat search costs n^2 D: 3.6 s at 20k images, 25 s at 50k, 69 s at 100k on 2 cores
(docs/benchmarks.md), ~1 s at 10k. The IVF search (``IVF_PROBES`` of sqrt(n) lists) found the same
groups as the flat one on the benchmark's libraries of 20k, 50k and 100k images."""
IVF_PROBES = 8
"""Lists searched per image by the IVF summary index (of sqrt(n) lists)."""
_IVF_TRAIN_PER_LIST = 64  # k-means points per list (FAISS asks for 39 at least)
_IVF_TRAIN_ITERATIONS = 10  # of k-means (FAISS's default: 25); the centroids only route the search
CANDIDATES_PER_NEIGHBOUR = 2
"""Summary candidates scored exactly per neighbour asked for."""
_ROWS = 64  # images whose candidates are scored at once (64 x 21 candidates x 32 KB, read then gathered: ~90 MB for ViT-g)


def summaries(read: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Each image's mean Q vector, minus the library's mean, normalised: ``[n, D] float32``.

    Centring matters: BLIP-2's query slots share a large common direction, so raw means of
    unrelated photos are close too. Read ``chunk`` images at a time.
    """
    if not len(ids):
        return np.zeros((0, 0), np.float32)
    means = np.concatenate([read(ids[start : start + chunk]).mean(axis=1) for start in range(0, len(ids), chunk)])
    means -= means.mean(axis=0)
    return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def summary_neighbours(summary: np.ndarray, k: int) -> np.ndarray:
    """Positions of each row's ``k`` nearest summaries by inner product (itself included): ``[n, k]``,
    -1 where fewer were found."""
    n, d = summary.shape
    k = min(k, n)
    if n <= EXACT_SUMMARY_MAX:
        index: faiss.Index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(int(np.sqrt(n)), n // 39))  # sqrt(n) lists, and the 39 points a list k-means needs
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = _IVF_TRAIN_ITERATIONS
        sample = np.random.default_rng(0).choice(n, min(n, _IVF_TRAIN_PER_LIST * nlist), replace=False)
        index.train(summary[np.sort(sample)])
        index.nprobe = IVF_PROBES
    index.add(summary)
    _, positions = index.search(summary, k)
    return positions


CLOSEST_EXACT_MAX = 64
"""Groups up to this size score every pair for `closest_in_group`; larger ones (a burst, a time-lapse) score
each image against its `CLOSEST_CANDIDATES` nearest members by summary, as the grouping itself does."""
CLOSEST_CANDIDATES = 8


def closest_in_group(vectors: np.ndarray) -> np.ndarray:
    """For each image of a group (``[m, Q, D]`` vectors, m >= 2), its best exact score with another member, in
    either direction (a pair joins a group when one of its two scores reaches the threshold): ``[m] float32``.
    Above `CLOSEST_EXACT_MAX` members, the best among each image's nearest members by summary."""
    m = len(vectors)
    best = np.full(m, -np.inf, dtype=np.float32)
    for i, others in enumerate(_group_neighbours(vectors)):
        scores = mean_max(vectors[i], vectors[others])  # image j's score for image i: counts for both
        best[i] = max(best[i], scores.max())
        np.maximum.at(best, others, scores)
    return best


def _group_neighbours(vectors: np.ndarray, block: int = 1024) -> list[np.ndarray]:
    """Whom each member of a group is scored against: every other member, or its nearest by summary."""
    m = len(vectors)
    if m <= CLOSEST_EXACT_MAX:
        return [np.delete(np.arange(m), i) for i in range(m)]
    means = vectors.mean(axis=1)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    out = []
    for start in range(0, m, block):  # `block` rows of the m x m summary products at a time
        near = means[start : start + block] @ means.T
        near[np.arange(len(near)), np.arange(start, start + len(near))] = -np.inf
        out.extend(np.argpartition(-near, CLOSEST_CANDIDATES, axis=1)[:, :CLOSEST_CANDIDATES])
    return out


SCORE_ROUNDING = 1e-6
"""float32 scores of unit vectors fall short of their true value by up to this: an exact copy scores 0.99999994,
so a threshold of 1 (accepted: "(0, 1]") found no copies."""


def duplicate_groups(
    ids: np.ndarray,
    read: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    *,
    neighbours: int = 10,
) -> list[list[int]]:
    """Groups (>= 2 images) linked by an exact score >= ``threshold`` among each image's ``neighbours``
    best summary candidates, each sorted by id, groups by their first id. ``read(ids)`` returns
    ``[n, Q, D]`` vectors in the given order."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        return []
    summary = summaries(read, ids)
    candidates = summary_neighbours(summary, neighbours * CANDIDATES_PER_NEIGHBOUR + 1)
    parent = np.arange(len(ids))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for start in range(0, len(ids), _ROWS):
        rows = np.arange(start, min(start + _ROWS, len(ids)))
        block = candidates[rows]
        wanted = np.unique(np.concatenate([rows, block[block >= 0]]))
        vectors = read(ids[wanted])
        block_scores = pair_scores(vectors, np.searchsorted(wanted, rows), np.searchsorted(wanted, np.maximum(block, 0)))
        for row, cands, scores in zip(rows.tolist(), block, block_scores):
            keep = (cands >= 0) & (cands != row)
            cands, scores = cands[keep].astype(np.int64), scores[keep]
            if not len(cands):
                continue
            best = np.lexsort((ids[cands], -scores))[:neighbours]
            for c, s in zip(cands[best].tolist(), scores[best].tolist()):
                if s >= threshold - SCORE_ROUNDING:
                    parent[find(row)] = find(c)
    groups: dict[int, list[int]] = {}
    for position in range(len(ids)):
        groups.setdefault(find(position), []).append(int(ids[position]))
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def pair_scores(vectors: np.ndarray, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``mean_max`` of each image ``vectors[rows[i]]`` against each of ``vectors[candidates[i, j]]``.

    ``vectors [W, Q, D]`` float32, ``rows [R]`` and ``candidates [R, C]`` positions in it ->
    ``[R, C] float32`` (equal to ``scoring.mean_max`` row by row, up to float32 rounding).

    One numpy call for a block of images, made of one [Q, D] x [D, Q] product a pair: products this
    small run on the calling thread (OpenBLAS's threshold), where one [C*Q, D] x [D, Q] product an
    image woke both BLAS threads each time, which on a busy 2-core machine spent most of the time
    waiting for the other core (65 of 89 s at 20k images).
    """
    stored = vectors[candidates]  # [R, C, Q, D]
    queries = vectors[rows].transpose(0, 2, 1)[:, None]  # [R, 1, D, Q]
    sims = np.matmul(stored, queries)  # [R, C, Q stored, Q query]
    return sims.max(axis=2).astype(np.float64).mean(axis=2).astype(np.float32)
