"""All CPU benchmarks in one run: one `name: value` line per figure.

    python bench/run.py --quick          # <= 5 minutes on 2 cores: smaller sizes, same code paths
    python bench/run.py                  # full sizes (see each module's docstring), much longer
    python bench/run.py --only search    # one section: pipeline, search, rerank, duplicates
    python bench/run.py --json out.json  # also write the figures as JSON

Sections (each a module here with `run(quick) -> dict`): `pipeline.py` (indexing efficiency, decode
speed-up and cosine, naive speed-up), `search.py` (exact and compact search latency, memory and
recall), `rerank.py` (stored vs recomputed ViT tokens, one shared ViT pass), `duplicates.py`
(near-duplicate groups against the per-image exact search they replaced). The GPU figures are a
separate script, `gpu.py`, for a CUDA machine. Results and machines: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ("pipeline", "search", "rerank", "duplicates")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: the whole run takes <= 5 minutes on 2 cores")
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(HERE.parent))
    import torch

    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}", flush=True)
    figures: dict[str, object] = {}
    start = time.perf_counter()
    for name in args.only or SECTIONS:
        t = time.perf_counter()
        section = importlib.import_module(name).run(args.quick)
        for key, value in section.items():
            print(f"{key}: {value}", flush=True)
        figures.update(section)
        print(f"# {name}: {time.perf_counter() - t:.0f} s", flush=True)
    figures["total_s"] = round(time.perf_counter() - start, 1)
    print(f"total_s: {figures['total_s']}")
    print(f"# command: python bench/run.py {' '.join(sys.argv[1:])}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
