"""Rerank latency (stored ViT tokens vs recomputing them) and the saving of one shared ViT pass.

    python bench/rerank.py [--quick]

Both through the product's code, side by side in one run:
- Rerank: ``search.rerank.rerank_hits`` over K hits (JPEG files on disk, 1600 x 1200) with
  ``StoredVit`` (fp16 tokens read from a ``VitTokenStore``) against ``RecomputeVit`` (decode + ViT per
  hit). The model is a random BLIP-2 retrieval checkpoint: full size (ViT-g 39 x 1408 + Q-Former
  12 x 768) in the full run; a ViT-B-sized ViT (12 x 768) with the full-size Q-Former in ``--quick``,
  so that it fits the quick run's time (ratios grow with the ViT's size).
- ViT sharing: ``indexing.embed.embed_batch`` with the demo ITM model and demo captioner (whose ViT
  blocks are byte-identical) on scene renders, one shared ViT pass against two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERY = "a woman and her dog sitting on a beach"
WORDS = "a an the photo of woman her dog sitting on in beach and with red cat two".split()
CACHE = Path(tempfile.gettempdir()) / "blip2-search-bench"


def random_checkpoint(full: bool) -> Path:
    """A random Blip2ForImageTextRetrieval checkpoint with tokenizer and 224 px processor (cached in /tmp)."""
    from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    path = CACHE / ("itm-vit-g" if full else "itm-vit-b")
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path
    if full:
        vision = Blip2VisionConfig()
    else:
        vision = Blip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    qformer = Blip2QFormerConfig(use_qformer_text_input=True, encoder_hidden_size=vision.hidden_size)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=32, image_text_hidden_size=256)
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(path)
    BlipImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def photos(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"photo{i:03d}.jpg"
        if not p.exists():
            base = np.linspace(0, 255, 1600, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, 3)
            noise = rng.normal(0, 20, (1200, 1600, 3))
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(p, quality=90)
        out.append(p)
    return out


def best(fn, reps: int) -> float:
    """Median wall time of `reps` calls."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_rerank(quick: bool) -> dict[str, float]:
    from blip2_search.models.encoder import Blip2Encoder
    from blip2_search.search.rerank import RecomputeVit, StoredVit, rerank_hits
    from blip2_search.search.results import Hit
    from blip2_search.store.vit_tokens import VitTokenStore

    out: dict[str, float] = {}
    enc = Blip2Encoder.load(str(random_checkpoint(full=not quick)), device="cpu", batch_size=32)
    enc.full_model
    ks = (32,) if quick else (32, 128)
    files = photos(CACHE / "photos", max(ks))
    with tempfile.TemporaryDirectory() as tmp:
        store = VitTokenStore(Path(tmp))
        store.enable()
        hashes = {i: f"{i:064x}" for i in range(len(files))}
        tokens, _ = RecomputeVit(enc).tokens([Hit(i, str(f), 0.0, 0.0, None, None, None) for i, f in enumerate(files)])
        for i, t in enumerate(tokens):
            store.put(hashes[i], t.float().numpy())
        stored = StoredVit(enc, store, lambda ids: {i: hashes[i] for i in ids}, stored_only=True)
        recompute = RecomputeVit(enc)
        for k in ks:
            hits = [Hit(i, str(files[i]), 0.3, 0.3, None, None, None) for i in range(k)]
            rerank_hits(enc, stored, QUERY, hits[:2])  # warm-up
            t_stored = best(lambda: rerank_hits(enc, stored, QUERY, hits), 3 if quick else 2)
            t_recompute = best(lambda: rerank_hits(enc, recompute, QUERY, hits), 1)
            out[f"rerank_k{k}_stored_ms"] = round(1000 * t_stored, 1)
            out[f"rerank_k{k}_recompute_ms"] = round(1000 * t_recompute, 1)
            out[f"rerank_k{k}_recompute_over_stored"] = round(t_recompute / t_stored, 2)
    out["rerank_model_vit"] = "ViT-g (39 x 1408)" if not quick else "ViT-B size (12 x 768)"
    return out


def bench_vit_sharing(quick: bool) -> dict[str, float]:
    from blip2_search.demo.scenes import ALL_SCENES, render
    from blip2_search.indexing.embed import embed_batch
    from blip2_search.models.captioner import Blip2Captioner
    from blip2_search.models.encoder import Blip2Encoder
    from blip2_search.models.sharing import share_vit

    enc, cap = Blip2Encoder.load("demo", device="cpu"), Blip2Captioner.load("demo", device="cpu")
    rng = np.random.default_rng(0)
    n = 64 if quick else 256
    size = enc.image_size
    pixels = {enc.image_input: np.stack([np.array(render(ALL_SCENES[i % 72], rng).resize((size, size), enc.resample)) for i in range(n)])}
    separate_caps = embed_batch(enc, cap, pixels).captions
    assert share_vit(enc, cap), "the demo models' ViT blocks are expected to be byte-identical"
    assert embed_batch(enc, cap, pixels, shared_vit=True).captions == separate_caps
    two, one, vit = [], [], []
    for _ in range(3 if quick else 5):  # interleaved, so drift in the machine's load hits both alike
        two.append(best(lambda: embed_batch(enc, cap, pixels), 1))
        one.append(best(lambda: embed_batch(enc, cap, pixels, shared_vit=True), 1))
        vit.append(best(lambda: enc.vit_blocks(enc.pixels_from_uint8(pixels[size])), 1))
    t_two, t_one, t_vit = min(two), min(one), min(vit)
    return {
        "vit_sharing_two_passes_ms_per_image": round(1000 * t_two / n, 3),
        "vit_sharing_one_pass_ms_per_image": round(1000 * t_one / n, 3),
        "vit_sharing_saving": round(1 - t_one / t_two, 3),
        "vit_share_of_embed_and_caption": round(t_vit / t_two, 3),
    }


def run(quick: bool) -> dict[str, float]:
    out = bench_rerank(quick)
    out.update(bench_vit_sharing(quick))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    for name, value in run(args.quick).items():
        print(f"{name}: {value}")
    print(f"# command: python bench/rerank.py {' '.join(sys.argv[1:])} ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
