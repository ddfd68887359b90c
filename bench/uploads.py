"""The server's image searches with many clients at once: uploads decoded before their turn with the model
(what the server does) against decoded in it (what it did until 2026-11-28), side by side in one run.

    python bench/uploads.py [--quick]

A demo-model library of rendered scenes is served in-process (FastAPI's TestClient); N threads each post
one 12 MP JPEG to ``POST /api/search`` at once, and the wall time until all have answered is measured,
the two ways alternated (best of R each). ``in_turn`` wraps the server's decode so that it hands the
upload on undecoded and ``Library.similar`` decodes it, inside the model's turn, as the server did.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _library(folder: Path, photos: int) -> Path:
    from blip2_search.demo.scenes import ALL_SCENES, render
    from blip2_search.library import Library

    rng = np.random.default_rng(0)
    (folder / "photos").mkdir()
    for i in range(photos):
        render(ALL_SCENES[i % len(ALL_SCENES)], rng).save(folder / "photos" / f"{i:04d}.jpg", quality=90)
    with Library.open(folder / "lib", model="demo", captioner=False, create=True) as lib:
        lib.index([folder / "photos"])
    return folder / "lib"


def _uploads(n: int) -> list[bytes]:
    """n distinct 4000 x 3000 JPEGs (smooth content, ~0.9 MB each, as a camera's)."""
    rng, out = np.random.default_rng(1), []
    for _ in range(n):
        im = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((4000, 3000), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _Undecoded:
    def __init__(self, source, *model_input):
        self.source, self.model_input = source, model_input


@contextmanager
def _decoded_in_turn(lib):
    """The earlier server: the upload is decoded by the call that runs in the model's turn."""
    from blip2_search.server import app as app_module

    real_decode, real_similar = app_module.model_image, lib.similar
    app_module.model_image = _Undecoded
    lib.similar = lambda image, *a, **kw: real_similar(real_decode(image.source, *image.model_input), *a, **kw)
    try:
        yield
    finally:
        app_module.model_image, lib.similar = real_decode, real_similar


def _burst(client, uploads: list[bytes]) -> float:
    answers, threads = [], []
    for data in uploads:
        post = lambda d=data: answers.append(client.post("/api/search", files={"image": ("q.jpg", d, "image/jpeg")}).status_code)
        threads.append(threading.Thread(target=post))
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    assert answers == [200] * len(uploads), answers
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 clients, best of 3 (default: 16 clients, best of 5)")
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    from blip2_search.library import Library
    from blip2_search.server import create_app

    clients, reps = (8, 3) if args.quick else (16, 5)
    uploads = _uploads(clients)
    with tempfile.TemporaryDirectory() as tmp:
        with Library.open(_library(Path(tmp), 200)) as lib, TestClient(create_app(lib), base_url="http://127.0.0.1") as client:
            _burst(client, uploads[:2])  # the ViT loads
            before, in_turn = [], []
            for _ in range(reps):  # alternated, so drift in the machine's load hits both alike
                before.append(_burst(client, uploads))
                with _decoded_in_turn(lib):
                    in_turn.append(_burst(client, uploads))
    print(f"upload_clients: {clients}")
    print(f"uploads_decoded_before_turn_s: {min(before):.3f}")
    print(f"uploads_decoded_in_turn_s: {min(in_turn):.3f}")
    print(f"uploads_speedup: {min(in_turn) / min(before):.2f}")
    print(f"command: python bench/uploads.py {shlex.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
