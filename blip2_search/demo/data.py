"""Training and evaluation images for the demo models.

Training pool: each image goes through the full render variety (random canvas size and aspect, light
noisy background, jitter, JPEG 60-95 or lossless) but is drawn on a canvas scaled down to a long side of
96-320 px before being resized to the model's input size with PIL bicubic, as the BLIP image processor
does. Drawing small keeps a pool of tens of thousands of images to about a minute; the scaled canvas
leaves the shape as many or more pixels than the 64 px model input has, and its JPEG artefacts and
noise are coarser than those of a full-size render, so it is at least as hard. The final metrics are
measured on full-size renders (``render_eval_images``), which shows the pool is a fair stand-in.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from .scenes import ALL_SCENES, SIZE_RANGE, encode, render, render_encoded, sample_canvas

__all__ = ["render_eval_images", "render_pool"]

_RENDER_LONG_SIDE = (96, 320)
SMALL_MAX = 0.22  # "small" shapes: 15-22% of the canvas' shorter side (the full range is 15-35%)
_CHUNK = 1000


def _pool_chunk(args: tuple[np.random.SeedSequence, int, int, float]) -> tuple[np.ndarray, np.ndarray]:
    seed_seq, n, image_size, small_share = args
    rng = np.random.default_rng(seed_seq)
    scene_ids = rng.integers(len(ALL_SCENES), size=n)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for i, sid in enumerate(scene_ids):
        width, height = sample_canvas(rng)
        scale = min(1.0, rng.uniform(*_RENDER_LONG_SIDE) / max(width, height))
        size = (max(16, round(width * scale)), max(16, round(height * scale)))
        # A share of the pool draws its shape from the small end of the size range, where shapes are
        # hardest to tell apart (a small circle and square differ by a few pixels at 64 px).
        small = rng.random() < small_share
        fraction = rng.uniform(SIZE_RANGE[0], SMALL_MAX) if small else rng.uniform(*SIZE_RANGE)
        img = render_encoded(ALL_SCENES[sid], rng, size=size, shape_fraction=fraction)
        images[i] = np.asarray(img.resize((image_size, image_size), Image.BICUBIC))
    return images, scene_ids


def _map(fn, jobs, workers: int):
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, jobs))


def render_pool(
    n: int, seed: int, image_size: int, workers: int = 1, small_share: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` training images: (uint8 [n, S, S, 3] already resized to S = image_size, scene ids int64 [n]).

    ``small_share``: the fraction of images whose shape size is drawn from 15-22% of the shorter side
    instead of the full 15-35%.

    Deterministic for (n, seed, image_size) whatever ``workers`` is (each 1,000-image chunk has its own
    spawned seed).
    """
    sizes = [min(_CHUNK, n - start) for start in range(0, n, _CHUNK)]
    seeds = np.random.SeedSequence(seed).spawn(len(sizes))
    parts = _map(_pool_chunk, [(s, k, image_size, small_share) for s, k in zip(seeds, sizes)], workers)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)


def _eval_chunk(args: tuple[np.random.SeedSequence, int]) -> list[tuple[bytes, int]]:
    seed_seq, n = args
    rng = np.random.default_rng(seed_seq)
    out = []
    for _ in range(n):
        sid = int(rng.integers(len(ALL_SCENES)))
        data, _ = encode(render(ALL_SCENES[sid], rng), rng)
        out.append((data, sid))
    return out


def render_eval_images(n: int, seed: int, workers: int = 1) -> tuple[list[Image.Image], np.ndarray]:
    """``n`` full-variety renders (canvas 64-1024 px, JPEG/PNG bytes decoded again): (RGB images, scene ids)."""
    sizes = [min(250, n - start) for start in range(0, n, 250)]
    seeds = np.random.SeedSequence(seed).spawn(len(sizes))
    items = [item for part in _map(_eval_chunk, list(zip(seeds, sizes)), workers) for item in part]
    images = []
    for data, _ in items:
        with Image.open(io.BytesIO(data)) as im:
            images.append(im.convert("RGB"))
    return images, np.array([sid for _, sid in items], dtype=np.int64)
