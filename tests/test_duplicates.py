"""Near-duplicate groups: candidates from summary vectors, checked against all-pairs exact scores."""

from __future__ import annotations

import numpy as np
import pytest

from blip2_search.search import duplicates as duplicates_module
from blip2_search.search.duplicates import duplicate_groups
from blip2_search.store.scoring import mean_max

Q, D = 8, 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def library(n: int, seed: int = 0) -> np.ndarray:
    """BLIP-2-like vectors (a direction shared by every image's slot, topics, noise) with near-duplicate
    groups of 2-5 images whose copies differ by a little noise (scores from ~0.93 to ~1)."""
    rng = np.random.default_rng(seed)
    slot = unit(rng.standard_normal((Q, D)))
    topics = unit(rng.standard_normal((8, D)))
    content = unit(topics[rng.integers(0, 8, n)] + 0.6 * unit(rng.standard_normal((n, D))))
    v = unit(0.6 * slot[None] + 0.6 * content[:, None] + 0.5 * unit(rng.standard_normal((n, Q, D))))
    for g in range(n // 20):
        for c in range(1 + g % 4):
            v[n - 1 - (g * 5 + c)] = unit(v[g * 7] + (0.01 + 0.012 * (g % 10)) * rng.standard_normal((Q, D)))
    return v


def all_pairs(v: np.ndarray, ids: np.ndarray, threshold: float) -> list[list[int]]:
    parent = list(range(len(v)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(len(v)):
        for j in np.flatnonzero(mean_max(v[i], v) >= threshold).tolist():
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(v)):
        groups.setdefault(find(i), []).append(int(ids[i]))
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


@pytest.mark.parametrize("flat", [True, False])
def test_groups_equal_all_pairs_exact_scores(flat, monkeypatch):
    if not flat:  # the IVF path for large libraries, on a small one
        monkeypatch.setattr(duplicates_module, "EXACT_SUMMARY_MAX", 100)
    v = library(800)
    ids = np.arange(800) * 3 + 7  # ids are not positions
    read_calls = []

    def read(wanted: np.ndarray) -> np.ndarray:
        read_calls.append(len(wanted))
        return v[(wanted - 7) // 3]

    for threshold in (0.95, 0.99, 0.999):
        want = all_pairs(v, ids, threshold)
        assert duplicate_groups(ids, read, threshold) == want
    assert len(all_pairs(v, ids, 0.95)) > len(all_pairs(v, ids, 0.99)) > 0  # the thresholds cut groups
    assert max(read_calls) <= 64 * 21 + 64 + 1024  # bounded reads, never the whole library


def test_few_images():
    v = library(20)
    assert duplicate_groups(np.array([5]), lambda i: v[:1], 0.9) == []
    assert duplicate_groups(np.zeros(0, np.int64), lambda i: v[:0], 0.9) == []
    same = np.stack([v[0], v[0]])
    assert duplicate_groups(np.array([4, 9]), lambda i: same[(i == 9).astype(int)], 0.999) == [[4, 9]]
    # exact copies at threshold 1 (accepted), though float32 gives many unit vectors a self-score just under it
    copies = np.stack([v[i] for i in range(20) for _ in range(2)])
    short = [i for i in range(20) if mean_max(v[i], v[i : i + 1])[0] < 1.0]
    assert short, "no vector of this library falls short of 1 against itself: the case is not exercised"
    ids = np.arange(40, dtype=np.int64)
    assert duplicate_groups(ids, lambda i: copies[i], 1.0) == [[2 * i, 2 * i + 1] for i in range(20)]


def test_pair_scores_equal_mean_max_row_by_row():
    """The block scoring in one call gives each image's ``mean_max`` against its candidates."""
    v = library(300, seed=2)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 300, 64)
    candidates = rng.integers(0, 300, (64, 21))
    candidates[:, 0] = rows  # an image among its own candidates, and repeated candidates, as FAISS may give
    candidates[:, 1] = candidates[:, 2]
    scores = duplicates_module.pair_scores(v, rows, candidates)
    assert scores.shape == (64, 21) and scores.dtype == np.float32
    for i in range(64):
        np.testing.assert_allclose(scores[i], mean_max(v[rows[i]], v[candidates[i]]), rtol=0, atol=1e-6)


def test_ivf_summaries_find_the_flat_groups_without_faiss_warnings(monkeypatch, capfd):
    """Above ``EXACT_SUMMARY_MAX`` the candidates come from IVF (sqrt(n) lists, ``IVF_PROBES`` searched):
    the same groups as the flat search, at thresholds from loose to strict, and k-means gets the
    points per list FAISS asks for (it prints a warning otherwise)."""
    v = library(3000, seed=3)
    ids = np.arange(3000) + 100

    def read(wanted: np.ndarray) -> np.ndarray:
        return v[wanted - 100]

    flat = {t: duplicate_groups(ids, read, t) for t in (0.9, 0.95, 0.99)}
    built = []
    monkeypatch.setattr(duplicates_module, "EXACT_SUMMARY_MAX", 1000)
    ivf_class = duplicates_module.faiss.IndexIVFFlat
    monkeypatch.setattr(duplicates_module.faiss, "IndexIVFFlat", lambda *a: built.append(a) or ivf_class(*a))
    for t, groups in flat.items():
        assert duplicate_groups(ids, read, t) == groups and len(groups) > 20
    assert len(built) == 3 and built[0][2] == 54  # int(sqrt(3000)) lists
    assert "WARNING" not in capfd.readouterr().err
