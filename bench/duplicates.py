"""Near-duplicate groups (`blip2-search duplicates`): summary candidates + exact scores, against the
ways it replaced, side by side in one run.

Synthetic BLIP-2-shaped vectors (32 x 256, a direction shared by each query slot, topics, noise)
with near-duplicate groups of 2-5 images (copies plus a little noise). Two comparisons:

- ``duplicates_per_image_<b>k_s``: the first way, one exact image-to-image search over the whole
  store per image (n^2), on the first ``--baseline`` images, against ``duplicates_summary_<b>k_s``;
  both must give the same groups.
- ``duplicates_before_<n>k_s``: the previous summary way (a flat summary search up to 200k images,
  each image's candidates scored with one matrix product), against ``duplicates_summary_<n>k_s``
  (now: IVF summaries above ``EXACT_SUMMARY_MAX``, a block's pairs scored in one call) at each of
  ``--sizes``; ``duplicates_<n>k_same_groups`` is 1 when both give the same groups, else the
  share of groups found by both.

    python bench/duplicates.py --quick                  # 1k first way, 10k before/after (~35 s)
    python bench/duplicates.py                          # 2k first way, 100k before/after
    python bench/duplicates.py --baseline 0 --sizes 20000 50000 100000   # 3.3 GB of vectors at 100k
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss

from blip2_search.search.duplicates import CANDIDATES_PER_NEIGHBOUR, duplicate_groups, summaries
from blip2_search.store import FaissVectorStore
from blip2_search.store.scoring import mean_max

Q, D = 32, 256
THRESHOLD = 0.95


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slot = _unit(rng.standard_normal((Q, D)))
    topics = _unit(rng.standard_normal((max(1, n // 500), D)))
    out = np.empty((n, Q, D), np.float32)
    for start in range(0, n, 4096):
        m = min(4096, n - start)
        content = _unit(topics[rng.integers(0, len(topics), m)] + 0.6 * _unit(rng.standard_normal((m, D))))
        out[start : start + m] = _unit(0.6 * slot[None] + 0.6 * content[:, None] + 0.5 * _unit(rng.standard_normal((m, Q, D))))
    for g in range(n // 50):  # 2% of images have 1-4 near copies at the end of the library
        for c in range(1 + g % 4):
            out[n - 1 - (g * 5 + c)] = _unit(out[g * 7] + (0.002 + 0.0025 * (g % 10)) * rng.standard_normal((Q, D)))
    return out


def per_image_search(store: FaissVectorStore, threshold: float, neighbours: int = 10) -> list[list[int]]:
    """The replaced way: for every image, an exact image-to-image search of the whole store."""
    ids = store.image_ids()
    parent = {int(i): int(i) for i in ids}

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i, vectors in zip(ids.tolist(), store.vectors_for(ids)):
        found, scores = store.search_vectors(vectors[None], min(neighbours + 1, len(ids)))
        for j, s in zip(found[0].tolist(), scores[0].tolist()):
            if j != i and s >= threshold:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in parent:
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def before(ids: np.ndarray, read, threshold: float, neighbours: int = 10) -> tuple[list[list[int]], float]:
    """The previous summary way: a flat (exact) summary search, then one ``mean_max`` product per image;
    returns (groups, seconds of the flat search)."""
    summary = summaries(read, ids)
    start = time.perf_counter()
    index = faiss.IndexFlatIP(summary.shape[1])
    index.add(summary)
    _, candidates = index.search(summary, min(len(ids), neighbours * CANDIDATES_PER_NEIGHBOUR + 1))
    flat_s = time.perf_counter() - start
    parent = np.arange(len(ids))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for start in range(0, len(ids), 64):
        rows = np.arange(start, min(start + 64, len(ids)))
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
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0]), flat_s


def _store(vectors: np.ndarray) -> FaissVectorStore:
    store = FaissVectorStore(Q, D, use_gpu=False)
    for start in range(0, len(vectors), 8192):
        store.add(np.arange(start, min(len(vectors), start + 8192)), vectors[start : start + 8192])
    return store


def run(quick: bool, baseline: int | None = None, sizes: list[int] | None = None) -> dict[str, float]:
    """The figures named in the module's docstring; ``baseline`` default: 1k when ``quick``, else 2k; ``sizes``:
    10k when ``quick``, else 100k (``bench/run.py --quick`` runs every section in 5 minutes)."""
    out: dict[str, float] = {}
    baseline = (1000 if quick else 2000) if baseline is None else baseline
    if baseline:
        b = f"{baseline // 1000}k"
        small = synthetic(baseline, seed=1)
        store = _store(small)
        start = time.perf_counter()
        old = per_image_search(store, THRESHOLD)
        out[f"duplicates_per_image_{b}_s"] = time.perf_counter() - start
        ids = store.image_ids()
        start = time.perf_counter()
        new = duplicate_groups(ids, store.vectors_for, THRESHOLD)
        out[f"duplicates_summary_{b}_s"] = time.perf_counter() - start
        assert new == old, "the summary candidates missed a group the exact search found"
        out[f"duplicates_{b}_groups"] = float(len(new))
        out["duplicates_speedup"] = out[f"duplicates_per_image_{b}_s"] / out[f"duplicates_summary_{b}_s"]
    for n in sizes or ([10_000] if quick else [100_000]):
        k = f"{n // 1000}k"
        vectors = synthetic(n)
        ids = np.arange(n)
        read = lambda wanted: vectors[wanted]  # noqa: E731
        start = time.perf_counter()
        old, flat_s = before(ids, read, THRESHOLD)
        out[f"duplicates_before_{k}_s"] = time.perf_counter() - start
        out[f"duplicates_before_{k}_flat_search_s"] = flat_s
        start = time.perf_counter()
        groups = duplicate_groups(ids, read, THRESHOLD)
        out[f"duplicates_summary_{k}_s"] = time.perf_counter() - start
        out[f"duplicates_{k}_groups"] = float(len(groups))
        both = {tuple(g) for g in groups} & {tuple(g) for g in old}
        out[f"duplicates_{k}_same_groups"] = 1.0 if groups == old else len(both) / max(len(groups), len(old))
        out[f"duplicates_{k}_speedup"] = out[f"duplicates_before_{k}_s"] / out[f"duplicates_summary_{k}_s"]
        del vectors
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k images instead of 100k, 1k for the first way")
    parser.add_argument("--sizes", type=int, nargs="+", help="library sizes for before/after [default: 100000, or 10000 with --quick]")
    parser.add_argument("--baseline", type=int, help="images for the first way's comparison [default: 2000, 1000 with --quick; 0: skip it]")
    args = parser.parse_args(argv)
    print("# command: python bench/duplicates.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])), flush=True)
    for name, value in run(args.quick, args.baseline, args.sizes).items():
        print(f"{name}: {value:.4g}")


if __name__ == "__main__":
    main()
