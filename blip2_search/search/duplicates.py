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

EXACT_SUMMARY_MAX = 200_000
"""Up to this many images the summary neighbours come from a flat (exact) index; beyond, from IVF."""
CANDIDATES_PER_NEIGHBOUR = 2
"""Summary candidates scored exactly per neighbour asked for."""
_ROWS = 64  # images whose candidates are scored at once (64 x 21 candidates x 32 KB: ~45 MB for ViT-g)


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
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)
        index.train(summary[np.sort(sample)])
        index.nprobe = 16
    index.add(summary)
    _, positions = index.search(summary, k)
    return positions


def closest_in_group(vectors: np.ndarray) -> np.ndarray:
    """For each image of a group (``[m, Q, D]`` vectors, m >= 2), its best exact score with another member, in
    either direction (a pair joins a group when one of its two scores reaches the threshold): ``[m] float32``."""
    scores = np.stack([mean_max(v, vectors) for v in vectors])  # scores[i, j]: image j's score for image i
    np.fill_diagonal(scores, -np.inf)
    return np.maximum(scores.max(axis=1), scores.max(axis=0)).astype(np.float32)


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
        where = {int(p): i for i, p in enumerate(wanted)}
        for row, cands in zip(rows.tolist(), block):
            cands = np.array([c for c in cands.tolist() if c >= 0 and c != row], dtype=np.int64)
            if not len(cands):
                continue
            scores = mean_max(vectors[where[row]], vectors[[where[c] for c in cands.tolist()]])
            best = np.lexsort((ids[cands], -scores))[:neighbours]
            for c, s in zip(cands[best].tolist(), scores[best].tolist()):
                if s >= threshold:
                    parent[find(row)] = find(c)
    groups: dict[int, list[int]] = {}
    for position in range(len(ids)):
        groups.setdefault(find(position), []).append(int(ids[position]))
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])
