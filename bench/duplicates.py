"""Near-duplicate groups (`blip2-search duplicates`): summary candidates + exact scores, against the
per-image exact search it replaced, side by side in one run.

Synthetic BLIP-2-shaped vectors (32 x 256, a direction shared by each query slot, topics, noise)
with near-duplicate groups of 2-5 images (copies plus a little noise). ``duplicates_per_image_s``
is the old way: one exact image-to-image search over the whole store per image (n^2); it runs on
the first ``--baseline`` images only and the ratio is taken at that size, where both must give the
same groups. ``duplicates_summary_<n>_s`` is the new way at the full size.

    python bench/duplicates.py --quick    # 2k side by side, 20k new only (~1 minute)
    python bench/duplicates.py            # 2k side by side, 100k new only (3.3 GB of vectors)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_search.search.duplicates import duplicate_groups
from blip2_search.store import FaissVectorStore

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


def _store(vectors: np.ndarray) -> FaissVectorStore:
    store = FaissVectorStore(Q, D, use_gpu=False)
    for start in range(0, len(vectors), 8192):
        store.add(np.arange(start, min(len(vectors), start + 8192)), vectors[start : start + 8192])
    return store


def run(quick: bool, baseline: int = 2000) -> dict[str, float]:
    out: dict[str, float] = {}
    small = synthetic(baseline, seed=1)
    store = _store(small)
    start = time.perf_counter()
    old = per_image_search(store, THRESHOLD)
    out[f"duplicates_per_image_{baseline // 1000}k_s"] = time.perf_counter() - start
    ids = store.image_ids()
    start = time.perf_counter()
    new = duplicate_groups(ids, store.vectors_for, THRESHOLD)
    out[f"duplicates_summary_{baseline // 1000}k_s"] = time.perf_counter() - start
    assert new == old, "the summary candidates missed a group the exact search found"
    out[f"duplicates_{baseline // 1000}k_groups"] = float(len(new))
    out["duplicates_speedup"] = out[f"duplicates_per_image_{baseline // 1000}k_s"] / out[f"duplicates_summary_{baseline // 1000}k_s"]
    n = 20_000 if quick else 100_000
    vectors = synthetic(n)
    start = time.perf_counter()
    groups = duplicate_groups(np.arange(n), lambda wanted: vectors[wanted], THRESHOLD)
    out[f"duplicates_summary_{n // 1000}k_s"] = time.perf_counter() - start
    out[f"duplicates_{n // 1000}k_groups"] = float(len(groups))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k images instead of 100k")
    parser.add_argument("--baseline", type=int, default=2000, help="images for the side-by-side comparison")
    args = parser.parse_args(argv)
    print("# command: python bench/duplicates.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    for name, value in run(args.quick, args.baseline).items():
        print(f"{name}: {value:.4g}")


if __name__ == "__main__":
    main()
