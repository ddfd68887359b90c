"""Reading every caption vector (fusion's first search in a process): inside the 32 KB embeddings
rows (schema v1) against their own table (v2), side by side on the same SQLite file.

The rows are BLIP-2 shaped (32 x 256 float32 image vectors, a 256-d caption vector); the two
layouts hold the same data. Prints the seconds of the same join both ways and their ratio.

    python bench/captions.py --rows 50000
"""

from __future__ import annotations

import argparse
import shlex
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

V1 = ("SELECT images.id, emb_v1.caption_vector FROM images JOIN emb_v1 ON images.content_hash = emb_v1.content_hash "
      "WHERE images.status = 'indexed' AND emb_v1.caption_vector IS NOT NULL ORDER BY images.id")
V2 = ("SELECT images.id, caption_vectors.vector FROM images JOIN caption_vectors "
      "ON images.content_hash = caption_vectors.content_hash WHERE images.status = 'indexed' ORDER BY images.id")


def build(path: Path, rows: int) -> None:
    c = sqlite3.connect(path)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, content_hash TEXT, status TEXT)")
    c.execute("CREATE TABLE emb_v1 (content_hash TEXT PRIMARY KEY, image_vectors BLOB NOT NULL, caption_vector BLOB, created_at TEXT)")
    c.execute("CREATE TABLE emb_v2 (content_hash TEXT PRIMARY KEY, image_vectors BLOB NOT NULL, created_at TEXT)")
    c.execute("CREATE TABLE caption_vectors (content_hash TEXT PRIMARY KEY, vector BLOB NOT NULL)")
    rng = np.random.default_rng(0)
    for start in range(0, rows, 5000):
        part = [(f"h{i}", rng.standard_normal((32, 256)).astype("<f4").tobytes(), rng.standard_normal(256).astype("<f4").tobytes())
                for i in range(start, min(rows, start + 5000))]
        c.executemany("INSERT INTO images (content_hash, status) VALUES (?, 'indexed')", [(h,) for h, _, _ in part])
        c.executemany("INSERT INTO emb_v1 VALUES (?, ?, ?, 'x')", part)
        c.executemany("INSERT INTO emb_v2 VALUES (?, ?, 'x')", [(h, v) for h, v, _ in part])
        c.executemany("INSERT INTO caption_vectors VALUES (?, ?)", [(h, v) for h, _, v in part])
        c.commit()
    c.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args(argv)
    print("# command: python bench/captions.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layouts.sqlite"
        build(path, args.rows)
        c = sqlite3.connect(path)
        best = {"v1": float("inf"), "v2": float("inf")}
        for _ in range(3):
            for name, sql in (("v1", V1), ("v2", V2)):
                start = time.perf_counter()
                got = c.execute(sql).fetchall()
                best[name] = min(best[name], time.perf_counter() - start)
                assert len(got) == args.rows
        c.close()
    print(f"caption_vectors_in_embeddings_rows_s: {best['v1']:.3f}")
    print(f"caption_vectors_own_table_s: {best['v2']:.3f}")
    print(f"caption_vectors_speedup: {best['v1'] / best['v2']:.2f}")


if __name__ == "__main__":
    main()
