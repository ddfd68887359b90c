"""Benchmark the indexing pipeline against the model alone, the decode paths and a naive loop (issue 6).

Figures, measured side by side in one run (this machine is shared and noisy: compare ratios):

- pipeline_efficiency: `Library.index` img/s on generated 3-12 MP JPEGs (the product path: scan, read +
  hash + fast decode in worker threads, batched embedding, one commit per batch, FAISS save) over
  model-only img/s (the same encoder, batch size and device running ViT + Q-Former on pixel tensors
  already made). The random BLIP-2 config is sized so that its forward costs >= 10x our decode per
  image: on a CPU, decode and model share the cores, so a cheaper model would measure decode, not stalls.
  Both costs are printed as wall ms and as CPU ms (core-ms taken from the shared cores, which other
  jobs on the machine disturb far less), with `pipeline_cpu_efficiency` (model CPU / index CPU per image)
  and the share of `Library.index`'s wall time spent in the model, in batch writes and elsewhere.
- decode_speedup: 12 MP JPEG -> 224 px model input, PIL full decode + the checkpoint's HF image processor
  over our fast JPEG path + normalisation (`bench/decode.py`'s `hf_vs_fast`).
- decode_cosine (+ _min): cosine between the embeddings of the two decode paths with the demo model,
  mean (and minimum) over images and query vectors.
- naive_speedup: our pipeline's img/s over a newcomer's loop with the same model: PIL full decode, HF
  processor, one image per forward, one SQLite row per commit.

To resist drift (other jobs starting or stopping), the photos are split into chunks, and each chunk runs
model-only batches, the naive loop on a few of its photos, a sequential decode sample, then
`Library.index` on its folder. Photos and the random model are cached under /tmp/blip2_search_bench.

    python bench/pipeline.py --quick     # ~1-2 min: 64 photos of 3-6 MP, batch 16, 6 ViT layers
    python bench/pipeline.py             # ~15-20 min: 1,024 photos of 3-12 MP, batch 32, 8 ViT layers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import hf_vs_fast, synthetic_photo

CACHE = Path(os.environ.get("BLIP2_BENCH_CACHE", Path(tempfile.gettempdir()) / "blip2_search_bench"))
PHOTO_VERSION = 1  # bump when synthetic_photo or the size mix changes, so old caches are not reused
ASPECTS = ((4, 3), (3, 2), (16, 9), (1, 1))


@dataclass(frozen=True)
class BenchModel:
    """A random `Blip2ForImageTextRetrieval`: real HF classes and files, BLIP-2's shapes at a smaller width."""

    vit_width: int
    vit_layers: int
    image_size: int = 224
    patch_size: int = 14
    qformer_width: int = 256
    qformer_layers: int = 4

    @property
    def vit_heads(self) -> int:
        return self.vit_width // 64

    def describe(self) -> str:
        tokens = (self.image_size // self.patch_size) ** 2 + 1
        return (f"ViT {self.vit_layers} x {self.vit_width} (heads {self.vit_heads}, MLP {4 * self.vit_width}, "
                f"{self.image_size} px, patch {self.patch_size}, {tokens} tokens), Q-Former {self.qformer_layers} x "
                f"{self.qformer_width}, 32 queries, 256-d, fp32 random weights")


@dataclass(frozen=True)
class Mode:
    """What one run measures. `chunks` folders of `images / chunks` photos each."""

    name: str
    images: int
    min_mp: float
    max_mp: float
    chunks: int
    batch_size: int
    model: BenchModel
    model_only_batches: int  # per chunk
    naive_images: int  # per chunk
    decode_sample: int  # per chunk, photos decoded one at a time to price our decode
    decode_photos: int  # 12 MP photos for decode_speedup and decode_cosine
    decode_repeats: int


QUICK = Mode("quick", images=64, min_mp=3, max_mp=6, chunks=2, batch_size=16, model=BenchModel(768, 6),
             model_only_batches=1, naive_images=2, decode_sample=6, decode_photos=3, decode_repeats=3)
FULL = Mode("full", images=1024, min_mp=3, max_mp=12, chunks=8, batch_size=32, model=BenchModel(768, 8),
            model_only_batches=1, naive_images=4, decode_sample=4, decode_photos=8, decode_repeats=5)

# ---------------------------------------------------------------------------- photos
def photo_dims(index: int, seed: int, min_mp: float, max_mp: float) -> tuple[int, int]:
    """(width, height) of photo `index`: megapixels uniform in [min_mp, max_mp], a common aspect, 30% portrait."""
    rng = np.random.default_rng((seed, index))
    mp = rng.uniform(min_mp, max_mp)
    a, b = ASPECTS[int(rng.integers(len(ASPECTS)))]
    width = round((mp * 1e6 * a / b) ** 0.5)
    height = round(width * b / a)
    return (height, width) if rng.random() < 0.3 else (width, height)


def _write_photo(job: tuple[str, int, int, int, int]) -> None:
    path, width, height, seed, quality = job
    tmp = path + ".part"
    synthetic_photo(width, height, seed).save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)


def photo_set(count: int, min_mp: float, max_mp: float, *, parts: int = 1, seed: int = 0) -> list[list[Path]]:
    """`count` generated JPEGs (quality 85-95) in `parts` sub-folders, cached under CACHE by these parameters."""
    folder = CACHE / f"photos-v{PHOTO_VERSION}-n{count}-mp{min_mp:g}-{max_mp:g}-p{parts}-s{seed}"
    per_part = -(-count // parts)
    jobs, paths = [], [[] for _ in range(parts)]
    for i in range(count):
        part = folder / f"part{i // per_part}"
        path = part / f"IMG_{i:05d}.jpg"
        paths[i // per_part].append(path)
        if not path.exists():
            part.mkdir(parents=True, exist_ok=True)
            width, height = photo_dims(i, seed, min_mp, max_mp)
            quality = int(np.random.default_rng((seed, i, 1)).integers(85, 96))
            jobs.append((str(path), width, height, seed * 1_000_003 + i, quality))
    if jobs:
        with ProcessPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            list(pool.map(_write_photo, jobs, chunksize=4))
    return paths


# ---------------------------------------------------------------------------- model
def bench_model_dir(spec: BenchModel, *, seed: int = 0) -> Path:
    """Save (once, cached) a random checkpoint of `spec` with a BERT tokenizer and BLIP image processor."""
    folder = CACHE / (f"model-vit{spec.vit_layers}x{spec.vit_width}-qf{spec.qformer_layers}x{spec.qformer_width}"
                      f"-{spec.image_size}px-p{spec.patch_size}-s{seed}")
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import (
        BertTokenizerFast,
        Blip2Config,
        Blip2ForImageTextRetrieval,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix="model-"))
    words = ["a", "an", "the", "photo", "of", "cat", "dog", "woman", "beach", "red", "green", "blue", "on", "left", "right", "and", "with"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "[DEC]"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(tmp)
    vision = Blip2VisionConfig(hidden_size=spec.vit_width, intermediate_size=4 * spec.vit_width, num_hidden_layers=spec.vit_layers,
                               num_attention_heads=spec.vit_heads, image_size=spec.image_size, patch_size=spec.patch_size)
    qformer = Blip2QFormerConfig(vocab_size=len(vocab), hidden_size=spec.qformer_width, num_hidden_layers=spec.qformer_layers,
                                 num_attention_heads=max(1, spec.qformer_width // 64), intermediate_size=4 * spec.qformer_width,
                                 max_position_embeddings=64, use_qformer_text_input=True, encoder_hidden_size=spec.vit_width)
    text = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=32)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=32, image_text_hidden_size=256)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    # As tests/tiny_models.py: fan-in scaled weights, so activations stay O(1) (HF's 1e-10 ViT init would
    # make subnormal floats, which are slow on a CPU and would distort the timing).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name.lower():
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0.0, 0.1)
            elif p.dim() >= 2:
                p.normal_(0.0, 1.5 / p[0].numel() ** 0.5)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(tmp)
    BlipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size}).save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------- measurements
@dataclass
class _Tally:
    """Wall and CPU seconds (this process, all its threads) spent on `images` images of one kind of work."""

    wall: float = 0.0
    cpu: float = 0.0
    images: int = 0

    @contextmanager
    def timing(self, images: int) -> Iterator[None]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        yield
        self.wall += time.perf_counter() - wall
        self.cpu += _cpu_seconds() - cpu
        self.images += images

    @property
    def per_s(self) -> float:
        return self.images / self.wall

    @property
    def wall_ms(self) -> float:
        return 1000 * self.wall / self.images

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.images


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _model_only(encoder, pixel_values, batches: int) -> None:
    """`batches` forward passes (ViT + Q-Former) on a ready `[B, 3, S, S]` tensor."""
    for _ in range(batches):
        encoder.embed_vit_tokens(encoder.vit_tokens(pixel_values))


def _decode(paths: list[Path], model_input: tuple[int, int]) -> None:
    """Read, hash and fast-decode `paths` one at a time in this thread (the pipeline's read stage)."""
    from blip2_search.indexing.read import read_and_decode
    from blip2_search.indexing.scan import FoundFile

    for p in paths:
        st = p.stat()
        result = read_and_decode(FoundFile(str(p), st.st_size, st.st_mtime_ns), (model_input,))
        if result.error:
            raise RuntimeError(f"bench photo {p} did not decode: {result.error}")


class _Naive:
    """A newcomer's loop: PIL full decode, HF processor, one image per forward, one SQLite commit per row."""

    def __init__(self, encoder, model_dir: Path, db: Path):
        from transformers import AutoImageProcessor

        self.encoder = encoder
        self.processor = AutoImageProcessor.from_pretrained(model_dir)  # what from_pretrained gives a newcomer
        self.connection = sqlite3.connect(db)
        self.connection.execute("CREATE TABLE IF NOT EXISTS images (path TEXT PRIMARY KEY, vectors BLOB)")

    def index(self, paths: list[Path]) -> None:
        from PIL import Image

        for p in paths:
            with Image.open(p) as im:
                pixel_values = self.processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
            vectors = self.encoder.embed_pixels(pixel_values)
            self.connection.execute("INSERT OR REPLACE INTO images VALUES (?, ?)", (str(p), vectors.tobytes()))
            self.connection.commit()


@contextmanager
def _pipeline_clock() -> Iterator[dict[str, float]]:
    """Accumulate, inside `Indexer`, seconds spent embedding and writing batches (the rest is waiting on
    decode, scanning and the final save)."""
    from blip2_search.indexing import pipeline

    spent = {"embed_s": 0.0, "write_batch_s": 0.0}
    embed, write = pipeline.embed_batch, pipeline.Indexer._write_batch

    def timed_embed(*a, **k):
        start = time.perf_counter()
        try:
            return embed(*a, **k)
        finally:
            spent["embed_s"] += time.perf_counter() - start

    def timed_write(self, *a, **k):
        start = time.perf_counter()
        try:
            return write(self, *a, **k)
        finally:
            spent["write_batch_s"] += time.perf_counter() - start

    pipeline.embed_batch, pipeline.Indexer._write_batch = timed_embed, timed_write
    try:
        yield spent
    finally:
        pipeline.embed_batch, pipeline.Indexer._write_batch = embed, write


def _embedding_cosines(encoder, paths: list[Path]) -> np.ndarray:
    """Per image and query vector, cosine of the fast-path embedding with the reference (PIL + processor) one."""
    from PIL import Image

    from blip2_search.images import decode_for_model

    out = []
    for p in paths:
        with Image.open(p) as im:
            reference = encoder.embed_pixels(encoder.preprocess([im.convert("RGB")]))
        fast = encoder.embed_pixels(encoder.pixels_from_uint8(decode_for_model(p, *encoder.image_input).pixels[None]))
        out.append((reference * fast).sum(-1).ravel())  # both L2-normalised per query
    return np.concatenate(out)


def run(quick: bool) -> dict[str, float]:
    """Measure the issue-6 figures (see the module docstring) in the quick or full mode; returns name -> value."""
    return measure(QUICK if quick else FULL)


def measure(mode: Mode) -> dict[str, float]:
    """Measure the figures of `mode`; returns name -> value."""
    wall = time.perf_counter()
    chunks = photo_set(mode.images, mode.min_mp, mode.max_mp, parts=mode.chunks)
    photos12 = photo_set(mode.decode_photos, 12, 12, seed=1)[0]  # 12 MP: 4000x3000 and the like
    generated_s = time.perf_counter() - wall
    model_dir = bench_model_dir(mode.model)

    import torch

    from blip2_search.images import decode_for_model
    from blip2_search.library import Library
    from blip2_search.models.encoder import Blip2Encoder

    with tempfile.TemporaryDirectory(prefix="blip2-bench-") as tmp:
        lib = Library.open(Path(tmp) / "library", model=str(model_dir), captioner=False, create=True, batch_size=mode.batch_size, device="cpu")
        encoder = lib.encoder
        _ = encoder.full_model  # load the weights before any clock starts
        size = encoder.image_size
        ready = encoder.pixels_from_uint8(np.stack([decode_for_model(p, *encoder.image_input).pixels for p in chunks[0][: mode.batch_size]]))
        _model_only(encoder, ready, 1)  # warm-up: allocator and oneDNN kernels
        naive = _Naive(encoder, model_dir, Path(tmp) / "naive.sqlite")

        model, index, naive_t, decode = _Tally(), _Tally(), _Tally(), _Tally()
        chunk_efficiency = []
        with _pipeline_clock() as spent:
            for k, paths in enumerate(chunks):
                before = (model.wall, model.images, index.wall, index.images)
                with model.timing(mode.model_only_batches * mode.batch_size):
                    _model_only(encoder, ready, mode.model_only_batches)
                naive_paths = paths[k:: max(1, len(paths) // mode.naive_images)][: mode.naive_images]
                with naive_t.timing(len(naive_paths)):
                    naive.index(naive_paths)
                sample = paths[k + 1:: max(1, len(paths) // mode.decode_sample)][: mode.decode_sample]
                with decode.timing(len(sample)):
                    _decode(sample, encoder.image_input)
                with index.timing(len(paths)):
                    report = lib.index([paths[0].parent])
                if report.indexed != len(paths):
                    raise RuntimeError(f"indexed {report.indexed} of {len(paths)} photos in {paths[0].parent}: {report}")
                chunk_index = (index.images - before[3]) / (index.wall - before[2])
                chunk_model = (model.images - before[1]) / (model.wall - before[0])
                chunk_efficiency.append(chunk_index / chunk_model)
        naive.connection.close()
        lib.close()

        hf = hf_vs_fast(photos12, size, mode.decode_repeats, processor=encoder.image_processor)
        demo = Blip2Encoder.load("demo", device="cpu")
        cos = _embedding_cosines(demo, photos12 + [c[len(c) // 2] for c in chunks])
        cos_bench = _embedding_cosines(encoder, photos12[: max(1, mode.decode_photos // 4)])
        figures = {
            "pipeline_efficiency": index.per_s / model.per_s,
            "decode_speedup": hf["speedup"],
            "decode_cosine": float(cos.mean()),
            "naive_speedup": index.per_s / naive_t.per_s,
            "index_img_per_s": index.per_s,
            "model_only_img_per_s": model.per_s,
            "naive_img_per_s": naive_t.per_s,
            # cost per image: wall ms (the model on all torch threads, decode on one thread) and CPU ms
            # (core-milliseconds, what each takes from the shared cores; less sensitive to other jobs)
            "model_ms_per_img": model.wall_ms,
            "decode_ms_per_img": decode.wall_ms,
            "model_to_decode_cost_ratio": model.wall_ms / decode.wall_ms,
            "model_cpu_ms_per_img": model.cpu_ms,
            "decode_cpu_ms_per_img": decode.cpu_ms,
            "model_to_decode_cpu_ratio": model.cpu_ms / decode.cpu_ms,
            "index_cpu_ms_per_img": index.cpu_ms,
            "pipeline_cpu_efficiency": model.cpu_ms / index.cpu_ms,
            "pipeline_efficiency_chunk_median": statistics.median(chunk_efficiency),
            "pipeline_efficiency_chunk_min": min(chunk_efficiency),
            "pipeline_efficiency_chunk_max": max(chunk_efficiency),
            # where Library.index spends its wall time: the model, the batch writes (SQLite + FAISS), the rest
            # (waiting on decode, scan, opening and saving the index)
            "index_embed_share": spent["embed_s"] / index.wall,
            "index_write_share": (spent["write_batch_s"] - spent["embed_s"]) / index.wall,
            "index_other_share": 1 - spent["write_batch_s"] / index.wall,
            "index_embed_ms_per_img": 1000 * spent["embed_s"] / index.images,
            "decode_hf_ms": hf["hf_ms"],
            "decode_fast_ms": hf["fast_ms"],
            "decode_cosine_min": float(cos.min()),
            "decode_cosine_images": float(len(cos) // demo.num_query_tokens),
            "decode_cosine_bench_model": float(cos_bench.mean()),
            "images_indexed": float(index.images),
            "model_only_images": float(model.images),
            "naive_images": float(naive_t.images),
            "torch_threads": float(torch.get_num_threads()),
            "generate_s": generated_s,
            "total_s": time.perf_counter() - wall,
        }
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 photos of 3-6 MP in 2 folders, batch 16, 6 ViT layers (~1-2 min)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    print("command: python bench/pipeline.py" + (" --quick" if args.quick else ""))
    print(f"mode: {mode.name}: {mode.images} JPEGs of {mode.min_mp:g}-{mode.max_mp:g} MP (q85-95) in {mode.chunks} folders, "
          f"batch {mode.batch_size}, CPU fp32" + (" (quick: fewer, smaller photos, a smaller batch and model than the full run)" if args.quick else ""))
    print(f"model: random Blip2ForImageTextRetrieval, {mode.model.describe()}")
    figures = run(args.quick)
    for name, value in figures.items():
        print(f"{name}: {value:.4g}")
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "mode": asdict(mode), "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
