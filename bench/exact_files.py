"""An `index` run's cost on the exact vector index when a few photos changed, against the way it replaced,
side by side in one run.

- ``before``: the older layout, one FAISS file (``IDMap2,Flat``) read whole, changed, written whole: what
  every run that changed anything did (at 100k photos: 61 s and 7.1 GB of RAM for a few hundred changes).
- ``now``: the row files (``exact_files``): the store opened lazily reads the row ids only, and its save
  appends the new rows to the data file and writes a new ids file and sidecar.

Each measurement runs in a fresh process on a fresh copy of the index (the copy is not timed), so the peak
RSS is that process's; the files are in the page cache for both ways. The change: ``--added`` new images
and ``--removed`` removed ones. ``exact_load_*``: a search process's full load (a server's start), both
layouts, to show the new one costs no more.

    python bench/exact_files.py --quick            # 20k images (655 MB of vectors), ~1 minute
    python bench/exact_files.py --images 100000    # 3.3 GB of vectors
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_search.store import FaissVectorStore
from blip2_search.store.index_files import read_index_files, save_vector_index

Q, D = 32, 256
CHUNK = 4096


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, Q, D), dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build(folder: Path, n: int) -> None:
    """The same n images saved in both layouts: ``folder/before`` and ``folder/now``."""
    rng = np.random.default_rng(0)
    store = FaissVectorStore(Q, D, use_gpu=False)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        store.add(np.arange(start + 1, start + count + 1, dtype=np.int64), _unit(rng, count))
    (folder / "before").mkdir()
    save_vector_index(store._index, folder / "before" / "vectors.faiss", factory="IDMap2,Flat", num_query_tokens=Q, dim=D,
                      images=n, vectors=n * Q, generation=1, params={"store": "exact"})
    store.save(folder / "now" / "vectors.faiss", generation=1)


def child(way: str, folder: Path, n: int, added: int, removed: int, task: str) -> None:
    """One measurement in this process: prints seconds and peak RSS (MB) as JSON."""
    rng = np.random.default_rng(1)
    new = _unit(rng, added)
    path = folder / "vectors.faiss"
    started = time.perf_counter()
    if way == "before":
        read = read_index_files(path, expected_generation=1, factory="IDMap2,Flat", num_query_tokens=Q, dim=D)
        store = FaissVectorStore.from_index(read.index, Q, D, use_gpu=False)
    else:
        store = FaissVectorStore.load(path, expected_generation=1, num_query_tokens=Q, dim=D, use_gpu=False,
                                      lazy=task == "update").store
    if task == "update":
        store.remove(np.arange(1, removed + 1, dtype=np.int64))
        store.add(np.arange(n + 1, n + added + 1, dtype=np.int64), new)
        if way == "before":
            save_vector_index(store._index, path, factory="IDMap2,Flat", num_query_tokens=Q, dim=D, images=len(store),
                              vectors=store.ntotal, generation=2, params={"store": "exact"})
        else:
            store.save(path, generation=2)
    seconds = time.perf_counter() - started
    assert len(store) == (n - removed + added if task == "update" else n)
    print(json.dumps({"seconds": seconds, "peak_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(base: Path, work: Path, way: str, args, task: str) -> dict:
    target = work / way
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(base / way, target)
    os.sync()  # the copy's dirty pages written out: the measured save's fsync waits for its own writes only
    out = subprocess.run([sys.executable, __file__, "--child", way, str(target), "--images", str(args.images),
                          "--added", str(args.added), "--removed", str(args.removed), "--task", task],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k images, 3 repetitions")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--added", type=int, default=300)
    parser.add_argument("--removed", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("WAY", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--task", default="update", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.images, args.added, args.removed, args.task)
        return
    if args.quick:
        args.images = 20_000
    with tempfile.TemporaryDirectory(prefix="bench-exact-") as scratch:
        base, work = Path(scratch) / "base", Path(scratch) / "work"
        base.mkdir()
        work.mkdir()
        build(base, args.images)
        results: dict[str, dict[str, list[float]]] = {}
        for task in ("update", "load"):
            for _ in range(args.reps):
                for way in ("before", "now"):  # alternated: the machine is shared and noisy
                    got = measure(base, work, way, args, task)
                    for key, value in got.items():
                        results.setdefault(f"{task}_{way}_{key}", {}).setdefault("v", []).append(value)
        median = {key: float(np.median(value["v"])) for key, value in results.items()}
    k = f"{args.images // 1000}k"
    print(f"command: python bench/exact_files.py {shlex.join(sys.argv[1:])}")
    print(f"change: +{args.added} images, -{args.removed} images, on {args.images} images of {Q}x{D} "
          f"({args.images * Q * D * 4 / 2**20:.0f} MB of vectors); medians of {args.reps}")
    print(f"exact_update_{k}_before_s: {median['update_before_seconds']:.3f}")
    print(f"exact_update_{k}_now_s: {median['update_now_seconds']:.3f}")
    print(f"exact_update_{k}_speedup: {median['update_before_seconds'] / median['update_now_seconds']:.1f}")
    print(f"exact_update_{k}_before_peak_mb: {median['update_before_peak_mb']:.0f}")
    print(f"exact_update_{k}_now_peak_mb: {median['update_now_peak_mb']:.0f}")
    print(f"exact_load_{k}_before_s: {median['load_before_seconds']:.3f}")
    print(f"exact_load_{k}_now_s: {median['load_now_seconds']:.3f}")
    print(f"exact_load_{k}_ratio: {median['load_now_seconds'] / median['load_before_seconds']:.2f}")
    print(f"exact_load_{k}_before_peak_mb: {median['load_before_peak_mb']:.0f}")
    print(f"exact_load_{k}_now_peak_mb: {median['load_now_peak_mb']:.0f}")


if __name__ == "__main__":
    main()
