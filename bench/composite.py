"""Recall of composite queries (terms with negative weights) past the exact-scoring limit.

A query of several terms is scored exactly on every image up to EXACT_COMPOSITE_LIMIT; beyond it (and
always with the compact index) only candidates are scored. Side by side in one run, on a demo library
(rendered scenes, demo models, compact index): recall@10 against scoring every image, for candidates
from the positive terms' top lists alone, and with the list of the query's combined direction added
(what `SearchEngine._first_stage` does). Queries: 60 "a" - W:"b" and 20 "a" + "b" - "c" from the
scene captions, and the review's '"a red circle on the left" - "a red circle on the top"'.

    python bench/composite.py                 # 1,100 photos (rendered and indexed once, ~6 min on 2 cores)
    python bench/composite.py --photos 1500 --lists 100
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_search.demo import ALL_CAPTIONS  # noqa: E402
from blip2_search.demo.scenes import ALL_SCENES, encode, render  # noqa: E402
from blip2_search.library import Library  # noqa: E402
from blip2_search.search.engine import COMPOSITE_CANDIDATES, composite_itc  # noqa: E402
from blip2_search.search.query import parse_query  # noqa: E402


def build(folder: Path, photos: int) -> Path:
    lib_dir = folder / "library"
    if (lib_dir / "metadata.sqlite").exists():
        return lib_dir
    rng = np.random.default_rng(0)
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    for i in range(photos):
        data, ext = encode(render(ALL_SCENES[i % len(ALL_SCENES)], rng), rng)
        (folder / "photos" / f"scene_{i:05d}{ext}").write_bytes(data)
    with Library.open(lib_dir, model="demo", captioner=False, create=True, vector_index="compact") as lib:
        lib.index([folder / "photos"])
    return lib_dir


def queries() -> list[str]:
    rnd = random.Random(0)
    caps = list(ALL_CAPTIONS)
    out = ['"a red circle on the left" - "a red circle on the top"']
    out += [f'"{a}" - {rnd.choice(["0.5", "1", "2"])}:"{b}"' for a, b in (rnd.sample(caps, 2) for _ in range(60))]
    out += [f'"{a}" + "{b}" - "{c}"' for a, b, c in (rnd.sample(caps, 3) for _ in range(20))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=1100)
    ap.add_argument("--lists", type=int, default=COMPOSITE_CANDIDATES, help="candidates a list (the engine: max(4 x depth, 200))")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "blip2-search-bench-composite")
    args = ap.parse_args()
    with Library.open(build(args.dir, args.photos)) as lib:
        assert not lib.vectors.holds_vectors, "the library should use the compact index"
        ids = np.array(sorted(k.id for k in lib.metadata.known_files().values() if k.status == "indexed"), dtype=np.int64)
        every = lib.metadata.vectors_for(ids)  # the truth: every image scored exactly
        recalls: dict[str, list[float]] = {"positive_lists": [], "with_combined": []}
        for text in queries():
            q = parse_query(text)
            emb = lib.encoder.embed_texts([t.text for t in q.terms])
            w = np.array([t.weight for t in q.terms], dtype=np.float32)
            truth = set(ids[np.lexsort((ids, -composite_itc(every, emb, w)))[:10]].tolist())
            combined = (w[:, None] * emb).sum(axis=0)
            for name, lists in (("positive_lists", emb[w > 0]),
                                ("with_combined", np.vstack([emb[w > 0], combined / np.linalg.norm(combined)]))):
                found, _ = lib.vectors.search(lists, args.lists)
                cand = np.unique(found[found >= 0])
                scores = composite_itc(lib.vectors.vectors_for(cand), emb, w)
                top = cand[np.lexsort((cand, -scores))[:10]]
                recalls[name].append(len(truth & set(top.tolist())) / 10)
    print(f"images: {len(ids)}, queries: {len(recalls['with_combined'])}, candidates a list: {args.lists}")
    for name, values in recalls.items():
        print(f"composite_recall_at_10_{name}: {np.mean(values):.3f} (worst query {min(values):.1f})")
    missed = {name: round(10 * sum(1 - v for v in values)) for name, values in recalls.items()}
    print(f"true top-10 hits missed, of {10 * len(recalls['with_combined'])}: positive lists {missed['positive_lists']}, "
          f"with the combined list {missed['with_combined']}")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
