"""Search latency and RAM per image: the exact store, a plain numpy scan, and the compact store.

Synthetic BLIP-2-shaped data (32 L2-normalised 256-d vectors an image), written to an on-disk
``np.memmap`` (the compact store rescores from it, as a library rescores from its database):

- clustered (like real embeddings): images drawn around topic centres (500 images a topic), each
  image's 32 vectors = per-slot direction (shared by all images) + the image's content direction
  (its topic centre plus noise) + per-vector noise; text queries near topic centres. Top ITC
  scores come out near 0.5, the median near 0.1, the 10th best within ~0.002 of the 9th.
- isotropic (the compact store's worst case): every vector and query uniform on the sphere.

Measured side by side in one run, single queries, k = 10: ``search_exact_*`` (FaissVectorStore:
a numpy matrix product over its flat storage), ``search_numpy_*`` (one ``flat @ q``, max over
the 32, ``argpartition``), ``search_exact_*_filtered`` (13% of the images allowed, as a date
filter) against ``search_copy_*_filtered`` (one copy of the allowed images, then the numpy scan), ``search_compact_*`` (CompactVectorStore: 4-bit PQ candidates, exact
rescoring from the memmap) with its recall@10 against the exact top 10. RAM per image is the
growth of the process's anonymous memory (``RssAnon``) while a store is built; for the compact
store also ``compact_bytes_per_image`` (its structures: codes in blocks, ids, quantisers).

    python bench/search.py --quick     # 10k and 100k exact; compact at 100k (isotropic: 10k)
    python bench/search.py             # adds 1M (compact only: exact float32 needs 32 GiB)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_search.store import CompactVectorStore, FaissVectorStore

Q, D, K = 32, 256, 10
IMAGES_PER_TOPIC = 500
CHUNK = 8192  # images generated, added or scanned at a time
SLOT, CONTENT, NOISE = 0.6, 0.6, 0.5  # weights of the three parts of a vector


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Synthetic:
    """``n`` images of ``[Q, D]`` unit vectors, generated chunk by chunk into a memmap.

    The data depends only on (n, clustered, seed): with ``keep`` a complete file from an earlier
    run (``.done`` beside it) is reused, and ``close`` leaves it for the next run.
    """

    def __init__(self, n: int, folder: Path, *, clustered: bool, seed: int = 0, keep: bool = False):
        self.n, self.clustered, self.seed, self.keep = n, clustered, seed, keep
        rng = np.random.default_rng([seed, 0])
        self.centres = _unit(rng.standard_normal((max(8, n // IMAGES_PER_TOPIC), D)))
        self.slots = _unit(rng.standard_normal((Q, D)))
        self.path = folder / f"{'clustered' if clustered else 'isotropic'}_{n}_seed{seed}.f32"
        self._descriptor: int | None = None
        done = self.path.with_name(self.path.name + ".done")
        if keep and done.exists():
            self.vectors = np.load(self.path, mmap_mode="r")
            return
        self.vectors = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n, Q, D))
        for start in range(0, n, CHUNK):
            self.vectors[start : start + CHUNK] = self._chunk(start, min(n, start + CHUNK))
        self.vectors.flush()
        done.touch()

    def _chunk(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, start])
        m = stop - start
        vectors = rng.standard_normal((m, Q, D), dtype=np.float32)  # per-vector noise, in place below
        if self.clustered:
            topics = rng.integers(0, len(self.centres), m)
            content = _unit(self.centres[topics] + rng.standard_normal((m, D), dtype=np.float32) / np.sqrt(D))
            vectors *= np.float32(NOISE / np.sqrt(D))
            vectors += (SLOT * self.slots)[None]
            vectors += (CONTENT * content)[:, None, :]
        vectors /= np.sqrt(np.einsum("nqd,nqd->nq", vectors, vectors))[..., None]
        return vectors

    def queries(self, m: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2])
        if not self.clustered:
            return _unit(rng.standard_normal((m, D), dtype=np.float32))
        topics = rng.integers(0, len(self.centres), m)
        return _unit(self.centres[topics] + rng.standard_normal((m, D), dtype=np.float32) / np.sqrt(D))

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Full vectors by image id (ids are row numbers), read from the file: ``[c, Q, D]``.

        One ``pread`` of 32 KB an image, in file order: indexing the memmap instead faults the
        row in 4 KB page by page, 512 rows in 1.4-2.3 s on this machine's disk against 75-82 ms.
        """
        if self._descriptor is None:
            self._descriptor = os.open(self.path, os.O_RDONLY)
        row = Q * D * 4
        out = np.empty((len(ids), Q, D), dtype=np.float32)
        for position in np.argsort(ids):
            offset = self.vectors.offset + int(ids[position]) * row
            out[position] = np.frombuffer(os.pread(self._descriptor, row, offset), dtype=np.float32).reshape(Q, D)
        return out

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
        del self.vectors
        if not self.keep:
            self.path.unlink(missing_ok=True)
            self.path.with_name(self.path.name + ".done").unlink(missing_ok=True)


def _rss_anon() -> int:
    """Anonymous resident memory of this process (excludes the memmapped data), in bytes, after
    handing freed heap memory back to the OS (else new structures reuse it and look free)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _exact_truth(data: Synthetic, queries: np.ndarray) -> list[np.ndarray]:
    """The exact top K per query, streaming the memmap: ``[m] x [K]`` image ids."""
    scores = np.empty((len(queries), data.n), dtype=np.float32)
    for start in range(0, data.n, CHUNK):
        part = np.asarray(data.vectors[start : start + CHUNK])
        sims = part.reshape(-1, D) @ queries.T
        scores[:, start : start + len(part)] = sims.reshape(len(part), Q, -1).max(axis=1).T
    ids = np.arange(data.n)
    return [np.lexsort((ids, -row))[:K] for row in scores]


def numpy_search(flat: np.ndarray, query: np.ndarray, k: int = K) -> np.ndarray:
    """The plain numpy baseline: one matrix product, max over the Q vectors, argpartition."""
    scores = (flat @ query).reshape(-1, Q).max(axis=1)
    top = np.argpartition(-scores, k)[:k]
    return top[np.lexsort((top, -scores[top]))]


def _percentiles(prefix: str, seconds: list[float], out: dict[str, float]) -> None:
    out[f"{prefix}_p50_ms"] = float(np.percentile(seconds, 50) * 1e3)
    out[f"{prefix}_p95_ms"] = float(np.percentile(seconds, 95) * 1e3)


def _label(n: int) -> str:
    return f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"


def measure_exact(data: Synthetic, n: int, n_queries: int, out: dict[str, float]) -> None:
    """FaissVectorStore against the numpy scan over the first ``n`` images, query by query."""
    label = _label(n)
    before = _rss_anon()
    store = FaissVectorStore(Q, D, use_gpu=False)
    for start in range(0, n, CHUNK):
        store.add(np.arange(start, min(n, start + CHUNK)), data.vectors[start : min(n, start + CHUNK)])
    out[f"exact_{label}_bytes_per_image"] = (_rss_anon() - before) / n
    flat = np.array(data.vectors[:n]).reshape(-1, D)  # the numpy baseline's own copy in RAM
    exact_s, numpy_s = [], []
    for query in data.queries(n_queries):
        start = time.perf_counter()
        got, _ = store.search(query[None], K)
        exact_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        want = numpy_search(flat, query)
        numpy_s.append(time.perf_counter() - start)
        assert got[0].tolist() == want.tolist(), "exact store and numpy disagree"
    _percentiles(f"search_exact_{label}", exact_s, out)
    _percentiles(f"search_numpy_{label}", numpy_s, out)
    out["numpy_bytes_per_image"] = float(Q * D * 4)
    measure_filtered(store, flat.reshape(n, Q, D), data.queries(n_queries), label, out)


def measure_filtered(store: FaissVectorStore, stored: np.ndarray, queries: np.ndarray, label: str,
                     out: dict[str, float], fraction: float = 0.13) -> None:
    """A filter keeping ``fraction`` of the images (a date range, say): the store against the same
    scores computed after one fancy-index copy of the allowed images (the naive way), query by query."""
    allowed = np.sort(np.random.default_rng(1).choice(len(stored), int(len(stored) * fraction), replace=False))
    store_s, copy_s = [], []
    for query in queries:
        start = time.perf_counter()
        got, _ = store.search(query[None], K, allowed_ids=allowed)
        store_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        chosen = stored[allowed]  # one copy of every allowed image
        scores = (chosen.reshape(-1, D) @ query).reshape(-1, Q).max(axis=1)
        top = np.argpartition(-scores, K)[:K]
        want = allowed[top[np.lexsort((top, -scores[top]))]]
        copy_s.append(time.perf_counter() - start)
        assert got[0].tolist() == want.tolist(), "filtered store and numpy disagree"
    _percentiles(f"search_exact_{label}_filtered", store_s, out)
    _percentiles(f"search_copy_{label}_filtered", copy_s, out)
    out[f"search_exact_{label}_filtered_vs_unfiltered"] = (
        out[f"search_exact_{label}_filtered_p50_ms"] / out[f"search_exact_{label}_p50_ms"])


def measure_compact(data: Synthetic, n_queries: int, out: dict[str, float], *, suffix: str = "") -> None:
    """CompactVectorStore: build (train on a random sample, add), latency, recall@10, RAM."""
    label = _label(data.n) + suffix
    reads = [0]

    def vectors_of(ids: np.ndarray) -> np.ndarray:
        reads[0] += len(ids)
        return data.read(ids)

    started, before = time.perf_counter(), _rss_anon()
    store = CompactVectorStore(Q, D, vectors_of=vectors_of, train_at=None)
    rng = np.random.default_rng(1)
    picks = np.sort(rng.choice(data.n, min(data.n, -(-store.sample_size(data.n) // Q)), replace=False))
    store.train(data.read(picks).reshape(-1, D), expected_images=data.n)
    for start in range(0, data.n, CHUNK):
        store.add(np.arange(start, min(data.n, start + CHUNK)), data.vectors[start : start + CHUNK])
    out[f"compact_{label}_build_s"] = time.perf_counter() - started
    out[f"compact_{label}_rss_building_bytes_per_image"] = (_rss_anon() - before) / data.n
    path = data.path.with_suffix(".faiss")
    store.save(path, generation=1)  # a library opens its index from this file: tight allocations
    del store
    before = _rss_anon()
    store = CompactVectorStore.load(path, expected_generation=1, num_query_tokens=Q, dim=D, vectors_of=vectors_of).store
    out[f"compact_{label}_rss_bytes_per_image"] = (_rss_anon() - before) / data.n
    out[f"compact_{label}_bytes_per_image"] = store.memory_bytes() / data.n
    queries = data.queries(n_queries)
    truth = _exact_truth(data, queries)
    seconds, hits = [], 0
    reads[0] = 0
    for query, want in zip(queries, truth):
        start = time.perf_counter()
        got, _ = store.search(query[None], K)
        seconds.append(time.perf_counter() - start)
        hits += len(set(got[0].tolist()) & set(want.tolist()))
    _percentiles(f"search_compact_{label}", seconds, out)
    out[f"compact_recall_at_10_{label}"] = hits / (K * len(queries))
    out[f"compact_rescored_per_query_{label}"] = reads[0] / len(queries)
    path.unlink()
    path.with_name(path.name + ".json").unlink()


def run(quick: bool, folder: Path | None = None, log: Callable[[str], None] = lambda _: None) -> dict[str, float]:
    """All figures: exact and numpy at 10k and 100k, compact at 100k (and 1M unless ``quick``),
    compact on isotropic vectors (10k quick, 100k full). The data files go to a temporary folder,
    or to ``folder``, where they are kept and reused by later runs."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work, keep = (folder, True) if folder is not None else (Path(tmp), False)
        work.mkdir(parents=True, exist_ok=True)
        data = Synthetic(100_000, work, clustered=True, keep=keep)  # its first 10k images: the 10k library
        log("100k ready")
        for n, n_queries in ((10_000, 30), (100_000, 6 if quick else 20)):
            measure_exact(data, n, n_queries, out)
            log(f"exact {n} done")
        measure_compact(data, 20 if quick else 100, out)
        log("compact 100k done")
        data.close()
        if not quick:
            log("exact and numpy at 1M skipped: 1M x 32 x 256 float32 is 32 GiB (34 GiB with the id map), "
                "more than this machine's RAM; bench/gpu.py measures exact 1M on a GPU")
            data = Synthetic(1_000_000, work, clustered=True, keep=keep)
            log("1M ready")
            measure_compact(data, 100, out)
            data.close()
        iso = Synthetic(10_000 if quick else 100_000, work, clustered=False, keep=keep)
        measure_compact(iso, 10 if quick else 50, out, suffix="_isotropic")
        iso.close()
    largest = "100k" if quick else "1m"
    out["search_compact_p50_ms"] = out[f"search_compact_{largest}_p50_ms"]
    out["compact_bytes_per_image"] = out[f"compact_{largest}_bytes_per_image"]
    out["compact_recall_at_10"] = out[f"compact_recall_at_10_{largest}"]
    out["exact_bytes_per_image"] = out["exact_100k_bytes_per_image"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k only (~90 s)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the data files here and reuse them in later runs (1M: 32 GiB) [default: a temporary folder]")
    args = parser.parse_args(argv)
    print("# command: python bench/search.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    started = time.perf_counter()
    figures = run(args.quick, args.workdir, log=lambda text: print(f"# {text} ({time.perf_counter() - started:.0f} s)", flush=True))
    for name, value in figures.items():
        print(f"{name}: {value:.4g}")
    print(f"# {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
