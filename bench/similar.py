"""More like this: photos like a library photo from its stored vectors (`Library.similar(image_id)`, what the
web page's button asks since 2026-11-28) against searching by the photo's own file (`Library.similar(path)`,
what the page did before: it downloaded the file and uploaded it back), side by side in one run.

    python bench/similar.py [--reps 10]

A demo-model library of rendered scenes plus one 4000x3000 photo-like JPEG is indexed in a temporary folder;
the two ways are alternated for that photo, medians printed. With the demo model the file's way is mostly its
decode; with ViT-g it also reruns the ViT (seconds an image on a CPU), which the stored vectors skip.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--photos", type=int, default=64, help="rendered scenes beside the large photo")
    args = ap.parse_args()
    from blip2_search.demo.scenes import ALL_SCENES, render
    from blip2_search.library import Library

    with tempfile.TemporaryDirectory(prefix="blip2-similar-bench-") as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.photos):
            render(ALL_SCENES[i % len(ALL_SCENES)], rng).save(photos / f"{i:04d}.jpg", quality=90)
        big = photos / "big.jpg"  # a scene upscaled to 12 MP, with sensor-like noise (JPEG size like a phone's)
        scene = np.asarray(render(ALL_SCENES[0], rng).resize((4000, 3000), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(scene + rng.normal(0, 6, scene.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(big, quality=90)
        with Library.open(Path(tmp) / "lib", model="demo", captioner=False, create=True) as lib:
            lib.index([photos])
        with Library.open(Path(tmp) / "lib") as lib:
            image_id = next(r.id for r in lib.metadata.get_records(k.id for k in lib.metadata.known_files().values())
                            if r.path == str(big))
            by_id, by_file = lib.similar(image_id, 10), lib.similar(big, 10)  # warm-up, and the answers compared
            same = [h.id for h in by_id.hits] == [h.id for h in by_file.hits]
            times = {"by_id": [], "by_file": []}
            for _ in range(args.reps):
                for way, arg in (("by_id", image_id), ("by_file", big)):
                    started = time.perf_counter()
                    lib.similar(arg, 10)
                    times[way].append(time.perf_counter() - started)
    id_ms, file_ms = (1000 * statistics.median(times[w]) for w in ("by_id", "by_file"))
    print(f"similar_by_id_ms: {id_ms:.2f}")
    print(f"similar_by_file_12mp_ms: {file_ms:.2f}")
    print(f"similar_speedup: {file_ms / id_ms:.1f}")
    print(f"same_top10: {same}")
    print("command: python " + shlex.join(["bench/similar.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
