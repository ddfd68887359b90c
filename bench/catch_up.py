"""Opening a vector index file behind the database: brought up to date from the change journal, against the
rebuild from the database that every such open did before, side by side in one run.

The case: an `index` run killed (SIGKILL, power loss) after committing ``--changed`` photos past its last save,
or a `search` beside a run that is still going. The next process found the file stale and rebuilt the whole index
from the database; now it loads the file and reads the journal's photos only.

- ``rebuild``: the journal emptied past the file (as a library from before the journal), so ``open_vectors``
  rebuilds from the database and saves;
- ``journal``: ``open_vectors`` loads the file and applies the changes, then saves: a process that does not
  hold the library's lock (a `search`) writes the file whole; with ``--lazy``, as the next `index` run opens it
  (lazily, holding the lock), it reads the row ids only and appends.

Each measurement runs on a fresh copy of the library folder (the copy is not timed), alternating the two ways,
``--reps`` times each; the files are in the page cache for both. ``--kind exact`` (the default kind below 125k
photos) or ``compact`` (trained codes; the threshold lowered to half the photos, as a 1M library has them: its
rebuild retrains).

    python bench/catch_up.py --quick                    # 5,000 photos (160 MB of vectors), 200 changed
    python bench/catch_up.py --images 20000             # 655 MB of vectors
    python bench/catch_up.py --images 20000 --kind compact
    python bench/catch_up.py --images 20000 --lazy      # as the next index run opens it
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_search.store import EmbedderInfo, IndexedImage, ModelRef, index_choice, open_metadata, open_vectors
from blip2_search.store.index_files import saved_generation
from exact_files import D, Q, _unit  # noqa: E402 - this folder is on the path (python bench/..., bench/run.py)

CHUNK = 1000


def _images(rng: np.random.Generator, first: int, count: int) -> list[IndexedImage]:
    vectors = _unit(rng, count)
    return [IndexedImage(f"/photos/{first + i}.jpg", 1, 1, f"hash{first + i}", vectors=vectors[i]) for i in range(count)]


def build(folder: Path, n: int, changed: int, kind: str) -> int:
    """A library of n photos whose exact index was saved, then ``changed`` photos added (80%) and deleted (20%) in
    batches of 50, as an index run commits them; return the database's generation."""
    rng = np.random.default_rng(0)
    meta = open_metadata(folder, create=True, embedder=EmbedderInfo(ModelRef("bench"), Q, D))
    ids: list[int] = []
    for start in range(0, n, CHUNK):
        ids += meta.upsert_indexed(_images(rng, start, min(CHUNK, n - start)))
    open_vectors(meta, folder / "vectors.faiss", kind=kind, use_gpu=False)
    added = changed - changed // 5
    for start in range(0, added, 50):
        meta.upsert_indexed(_images(rng, n + start, min(50, added - start)))
    meta.mark_deleted(rng.choice(ids, changed // 5, replace=False).tolist())
    generation = meta.vectors_generation()
    meta.close()
    return generation


def measure(way: str, source: Path, scratch: Path, generation: int, kind: str, lazy: bool) -> float:
    target = scratch / way
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    meta = open_metadata(target, create=False)
    if way == "rebuild":
        meta.forget_vector_changes(generation)
    started = time.perf_counter()
    opened = open_vectors(meta, target / "vectors.faiss", kind=kind, use_gpu=False, lazy=lazy)
    took = time.perf_counter() - started
    assert (opened.rebuilt_because is None) == (way == "journal"), opened.rebuilt_because
    assert opened.generation == generation == saved_generation(target / "vectors.faiss")
    meta.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--changed", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kind", choices=["exact", "compact"], default="exact")
    parser.add_argument("--lazy", action="store_true", help="open as an index run does (lazily, holding the library's lock)")
    parser.add_argument("--quick", action="store_true", help="5,000 photos, 200 changed")
    args = parser.parse_args()
    if args.quick:
        args.images, args.changed = 5000, 200
    if args.kind == "compact":
        index_choice.COMPACT_MIN_IMAGES = args.images // 2
    with tempfile.TemporaryDirectory(prefix="catch_up_") as tmp:
        source, scratch = Path(tmp) / "lib", Path(tmp) / "runs"
        scratch.mkdir()
        started = time.perf_counter()
        generation = build(source, args.images, args.changed, args.kind)
        print(f"built {args.images} photos + {args.changed} changes in {time.perf_counter() - started:.1f} s")
        times: dict[str, list[float]] = {"rebuild": [], "journal": []}
        for _ in range(args.reps):
            for way in times:
                times[way].append(measure(way, source, scratch, generation, args.kind, args.lazy))
    rebuild, journal = (statistics.median(times[way]) for way in ("rebuild", "journal"))
    print(f"{args.kind} index, {args.images} photos, {args.changed} changed{', opened lazily' if args.lazy else ''}")
    print(f"catch_up_rebuild_s: {rebuild:.3f}  (runs: {', '.join(f'{t:.3f}' for t in times['rebuild'])})")
    print(f"catch_up_journal_s: {journal:.3f}  (runs: {', '.join(f'{t:.3f}' for t in times['journal'])})")
    print(f"catch_up_speedup: {rebuild / journal:.1f}")
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))


if __name__ == "__main__":
    main()
