"""GPU figures in one run: ViT-g + Q-Former embedding img/s, text-query latency, rerank K=128, exact 1M search.

    python bench/gpu.py [--out results.json] [--budget-s 420]    # on a CUDA machine (the device tool)
    python bench/gpu.py --small                                  # the same code path on CPU, tiny sizes

Everything goes through the product's code: a random full-size BLIP-2 retrieval checkpoint (ViT-g
39 x 1408, Q-Former 12 x 768, 32 queries, 224 px; weights saved in bf16) is written to a temporary
folder and loaded with ``Blip2Encoder.load`` (bf16 ViT and Q-Former: transformers keeps the Q-Former fp32 under fp16 only; SDPA
attention); search uses ``blip2_search.store.torch_search.max_sim_topk``. Figures:
- ``embed_img_s_b{B}``: images/s through ``embed_pixels`` on pixel tensors already on the GPU, and
  ``embed_uint8_img_s_b{B}``: from uint8 host arrays (``pixels_from_uint8(..., device=cuda)``) as
  the indexing pipeline feeds it; ``vit_only_img_s_b{B}`` isolates the ViT.
- ``vit_{variant}_img_s_b512_r{round}``: the ViT blocks alone under HF's forward and the
  ``models/fast_vit`` variants (GELU epilogue or not, cuDNN or flash attention, residual add +
  LayerNorm as two torch kernels, torch.compile's kernel or ours in Triton), interleaved in two rounds, each with ``_token_cosine_mean_min`` against a
  float32 reference of the same weights; ``profile_*_ms_by_kind``: GPU kernel time by kind.
- ``embed_hf_vit_img_s_b{B}``: ``embed_pixels`` with the encoder's fast ViT path turned off.
- ``text_query_p50_ms`` / ``p95``: one text query -> its 256-d vector on the host.
- ``rerank_k128_{stored_gpu,stored_host,recompute}_p50_ms``: ITC + ITM for 128 candidates from ViT
  tokens resident on the GPU, from host memory (bf16, copied per query), or recomputed from pixels.
- ``search_1m_p50_ms`` / ``p95``: exact top-10 over 1M images x 32 vectors (fp16 on the GPU), one
  query at a time; ``search_1m_batch32_per_query_ms``; ``search_1m_recall_at_10`` against a float32
  brute force over the same stored vectors (should be 1.0).
Results are written after each step, so a run cut short still returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_search.models import fast_vit  # noqa: E402
from blip2_search.models.encoder import Blip2Encoder  # noqa: E402


def _load_torch_search():
    """blip2_search.store.torch_search without the store package's __init__ (FAISS and SQLAlchemy are not
    installed on the lent GPU machine, and this module needs neither)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "blip2_search" / "store" / "torch_search.py"
    spec = importlib.util.spec_from_file_location("torch_search", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.max_sim_topk


max_sim_topk = _load_torch_search()

QUERY = "a woman and her dog sitting on a beach"
WORDS = "a an the photo of woman her dog sitting on in beach and with red cat two".split()


class Recorder:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget_s, self.results = out, time.perf_counter(), budget_s, {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def __setitem__(self, name, value):
        self.results[name] = value
        print(f"{name}: {value}", flush=True)
        self.out.write_text(json.dumps(self.results, indent=1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def p(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def write_checkpoint(path: Path, small: bool, device: torch.device) -> str:
    """A random BLIP-2 retrieval checkpoint (full size unless small) with a BERT tokenizer and a 224 px processor."""
    from transformers import (
        BertTokenizerFast,
        Blip2Config,
        Blip2ForImageTextRetrieval,
        Blip2QFormerConfig,
        Blip2VisionConfig,
    )
    try:
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import BlipImageProcessor as Processor

    if small:
        vision = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=14)
        qformer = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, encoder_hidden_size=64, use_qformer_text_input=True)
    else:
        vision = Blip2VisionConfig()  # ViT-g: 39 layers, 1408 wide, 16 heads, 224 px, patch 14
        qformer = Blip2QFormerConfig(use_qformer_text_input=True)  # 12 layers, 768 wide
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=32, image_text_hidden_size=256)
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForImageTextRetrieval(config)
    # HF initialises the ViT with std 1e-10 (its weights always come from a checkpoint), which leaves the
    # blocks doing nothing; give it a trained ViT's scales so accuracy checks and power draw are realistic.
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            elif param.dim() >= 2:
                param.normal_(0.0, 0.02)
            else:
                param.normal_(0.0, 0.02)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(path)
    Processor(size={"height": 224, "width": 224}).save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    return f"{params / 1e9:.3f} B params"


def embed_backends(rec: Recorder, enc: Blip2Encoder, device: torch.device, batch: int) -> None:
    """Embedding img/s under each SDPA backend (the ViT's attention), side by side."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enc.batch_size = batch
    px = torch.randn(batch, 3, 224, 224, device=device)
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                t = timed(lambda: enc.embed_pixels(px), device, 3)
            rec[f"embed_img_s_b{batch}_{name.lower()}"] = round(batch / statistics.median(t), 1)
        except Exception as exc:
            rec[f"embed_b{batch}_{name.lower()}_error"] = f"{type(exc).__name__}: {str(exc)[:150]}"


def _kernel_kind(name: str) -> str:
    n = name.lower()
    for kind, keys in (
        ("attention", ("flash", "fmha", "cudnn_generated", "attention", "sdpa", "mha")),
        ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90", "triton_tem")),
        ("layer_norm", ("layer_norm", "layernorm")),
        ("gelu", ("gelu",)),
        ("conv", ("conv", "implicit")),
        ("copy", ("copy", "cat", "transpose")),
        ("elementwise", ("elementwise", "add", "mul", "triton_poi", "triton_per", "triton_red")),
    ):
        if any(k in n for k in keys):
            return kind
    return "other"


def profile_blocks(rec: Recorder, name: str, fn, device: torch.device) -> None:
    """GPU kernel time of one call of `fn`, by kind (gemm, attention, layer_norm, gelu, ...), in ms."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    kinds: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us <= 0 or event.key.startswith("aten::") or event.key.startswith("cuda"):
            continue
        kinds[_kernel_kind(event.key)] = kinds.get(_kernel_kind(event.key), 0.0) + us / 1000
        top.append((us / 1000, event.key[:90]))
    rec[f"profile_{name}_ms_by_kind"] = {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    rec[f"profile_{name}_top_kernels"] = [[round(ms, 2), key] for ms, key in sorted(top, reverse=True)[:8]]


def bench_vit_kernels(rec: Recorder, enc: Blip2Encoder, device: torch.device, small: bool) -> None:
    """The ViT blocks (the cost of an embedding) under HF's forward and models/fast_vit variants, side by side,
    with each variant's ViT tokens compared to a float32 (no TF32) reference of the same weights."""
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel

    vm = enc.full_model.vision_model
    dtype = vm.embeddings.patch_embedding.weight.dtype
    # Which GELU the fused epilogue computes here (cuBLASLt: tanh approximation; CPU kernel: exact).
    a, w, b = (torch.randn(512, 256, device=device, dtype=dtype), torch.randn(1024, 256, device=device, dtype=dtype), torch.randn(1024, device=device, dtype=dtype))
    fused = torch._addmm_activation(b, a, w.t(), use_gelu=True).float()
    ref = torch.nn.functional.linear(a, w, b).float()
    rec["gelu_epilogue_max_diff_to_exact"] = round((fused - torch.nn.functional.gelu(ref)).abs().max().item(), 5)
    rec["gelu_epilogue_max_diff_to_tanh"] = round((fused - torch.nn.functional.gelu(ref, approximate="tanh")).abs().max().item(), 5)

    if device.type == "cuda":  # our Triton add+LayerNorm against torch's two kernels, on one ViT-g-sized tensor
        try:
            from blip2_search.models.triton_kernels import add_layer_norm as triton_add_norm

            xx, yy = (torch.randn(64, 257, vm.config.hidden_size, device=device).to(dtype) for _ in range(2))
            ln = vm.encoder.layers[0].layer_norm1
            s1, h1 = triton_add_norm(xx, yy, ln.weight, ln.bias, ln.eps)
            s2, h2 = fast_vit.add_layer_norm(xx, yy, ln.weight, ln.bias, ln.eps)
            rec["triton_add_norm_sum_mismatches"] = int((s1 != s2).sum())
            rec["triton_add_norm_norm_mismatch_share"] = round((h1 != h2).float().mean().item(), 6)
            rec["triton_add_norm_norm_max_diff"] = round((h1.float() - h2.float()).abs().max().item(), 5)
            # Tile sweep over one batch-512 activation ([512 x 257, W]): GB/s moved (2 reads + 2 writes).
            from blip2_search.models import triton_kernels

            xx, yy = (torch.randn(512 * 257, vm.config.hidden_size, device=device).to(dtype) for _ in range(2))
            moved = 4 * xx.numel() * xx.element_size() / 1e9
            t = timed(lambda: fast_vit.add_layer_norm(xx, yy, ln.weight, ln.bias, ln.eps), device, 10, warmup=2)
            rec["eager_add_norm_gb_s"] = round(moved / statistics.median(t))
            sweep = {}
            for rows in (1, 2, 4, 8, 16):
                for warps in (2, 4, 8, 16):
                    try:
                        t = timed(lambda: triton_add_norm(xx, yy, ln.weight, ln.bias, ln.eps, rows=rows, warps=warps), device, 10, warmup=2)
                        sweep[f"{rows}x{warps}"] = round(moved / statistics.median(t))
                    except Exception as exc:
                        sweep[f"{rows}x{warps}"] = type(exc).__name__
            rec["triton_add_norm_gb_s_by_rows_x_warps"] = sweep
            best = max((k for k, v in sweep.items() if isinstance(v, int)), key=sweep.get)
            triton_kernels.ROWS, triton_kernels.WARPS = (int(v) for v in best.split("x"))
            rec["triton_add_norm_tile_used"] = best
            del xx, yy, s1, h1, s2, h2
        except Exception as exc:
            rec["triton_add_norm_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"

    def hf(x):
        return vm.encoder(inputs_embeds=vm.embeddings(x)).last_hidden_state

    def hf_backend(backend):
        def run(x):
            with sdpa_kernel(backend):
                return hf(x)
        return run

    def fast(**kw):
        kernels = fast_vit.VitKernels(**kw)
        return lambda x: fast_vit.vit_blocks(vm, x, kernels)

    variants = {
        "hf": hf,
        "hf_cudnn": hf_backend(SDPBackend.CUDNN_ATTENTION),
        "fast_unfused_cudnn": fast(fused_gelu=False, attention="cudnn", add_norm="eager"),
        "fast_gelu_cudnn": fast(attention="cudnn", add_norm="eager"),
        "fast_gelu_cudnn_compile": fast(attention="cudnn", add_norm="compile"),
        "fast_gelu_flash_triton": fast(attention="flash", add_norm="triton"),
        "fast_gelu_cudnn_triton": fast(attention="cudnn", add_norm="triton"),  # the default
    }
    # Accuracy: ViT tokens (post_layernorm) of 16 images against a float32 copy with TF32 off.
    gen = torch.Generator(device=device).manual_seed(1)
    x16 = torch.randn(16, 3, 224, 224, device=device, generator=gen)
    reference_model = copy.deepcopy(vm).float()
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        reference = reference_model(pixel_values=x16).last_hidden_state.float()
    torch.backends.cuda.matmul.allow_tf32 = True
    del reference_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with torch.inference_mode():
        for name, fn in variants.items():
            try:
                t0 = time.perf_counter()
                tokens = vm.post_layernorm(fn(x16.to(dtype))).float()
                if name.endswith(("compile", "triton")):
                    rec[f"vit_{name}_first_call_s"] = round(time.perf_counter() - t0, 1)
                cos = torch.nn.functional.cosine_similarity(tokens, reference, dim=-1)
                rec[f"vit_{name}_token_cosine_mean_min"] = [round(cos.mean().item(), 6), round(cos.min().item(), 6)]
            except Exception as exc:
                rec[f"vit_{name}_error"] = f"{type(exc).__name__}: {str(exc)[:150]}"
    batch = 16 if small else 512
    x = torch.randn(batch, 3, 224, 224, device=device, generator=gen).to(dtype)
    with torch.inference_mode():
        if not small:
            profile_blocks(rec, "hf_b256", lambda: hf(x[:256]), device)
            profile_blocks(rec, "fast_default_b256", lambda: variants["fast_gelu_cudnn_triton"](x[:256]), device)
        for rnd in range(2):  # two rounds, interleaved, so drift shows
            for name, fn in variants.items():
                if f"vit_{name}_error" in rec.results or rec.left() < 60:
                    continue
                t = timed(lambda: fn(x), device, 2 if small else 3)
                rec[f"vit_{name}_img_s_b{batch}_r{rnd}"] = round(batch / statistics.median(t), 1)
    del x, x16, reference


def masked_qformer(enc: Blip2Encoder, vit: torch.Tensor, to_host: bool = True):
    """The image path with an all-ones encoder mask, as HF's own forward passes it (transformers reads it on
    the host to skip it): the side-by-side reference for `Blip2Encoder.image_embeds`."""
    m = enc.full_model
    ones = torch.ones(vit.shape[:-1], dtype=torch.long, device=vit.device)
    with torch.inference_mode():
        hidden = m.qformer(query_embeds=m.query_tokens.expand(len(vit), -1, -1), encoder_hidden_states=vit, encoder_attention_mask=ones).last_hidden_state
        proj = m.vision_projection(hidden.to(m.vision_projection.weight.dtype))
        out = torch.nn.functional.normalize(proj, dim=-1)
        return out.float().cpu().numpy() if to_host else out


def queued_batches(enc: Blip2Encoder, u8: np.ndarray, n: int, write=None, ahead: bool = True) -> None:
    """`n` batches through `embed_batch`, each collected (and given to `write`) after the next one is queued,
    as the indexer does; `ahead=False`: collected and written before the next one is queued."""
    from blip2_search.indexing.embed import embed_batch

    previous = None
    for _ in range(n):
        queued = embed_batch(enc, None, {enc.image_input: u8})
        if not ahead:
            queued, previous = None, queued
        if previous is not None:
            vectors = previous.collect().vectors
            if write is not None:
                write(vectors)
        previous = queued
    if previous is not None:
        vectors = previous.collect().vectors
        if write is not None:
            write(vectors)


class BlobWriter:
    """Rows of float32 vectors into SQLite (WAL, synchronous=NORMAL, one transaction a batch), like the
    metadata store's embedding rows; `seconds` holds each batch's write time."""

    def __init__(self, path: Path):
        import sqlite3

        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, vectors BLOB)")
        self.seconds: list[float] = []

    def write(self, vectors: np.ndarray) -> None:
        start = time.perf_counter()
        with self.db:
            self.db.executemany("INSERT INTO rows (vectors) VALUES (?)", [(v.tobytes(),) for v in vectors])
        self.seconds.append(time.perf_counter() - start)


def embed_batch_queued(enc: Blip2Encoder, u8: np.ndarray):
    from blip2_search.indexing.embed import embed_batch

    return embed_batch(enc, None, {enc.image_input: u8})


def count_syncs(fn) -> int | str:
    """How many host syncs `fn` makes on CUDA (torch's sync debug mode, "warn"): 0 = it only queues work."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_model(rec: Recorder, enc: Blip2Encoder, device: torch.device, small: bool, batches=None) -> None:
    batches = batches or ((8,) if small else (256, 512))
    m = enc.full_model
    rec["attn_implementation"] = str(getattr(m.config.vision_config, "_attn_implementation", "?"))
    rec["vit_dtype"] = str(m.vision_model.embeddings.patch_embedding.weight.dtype)
    rec["qformer_dtype"] = str(next(m.qformer.parameters()).dtype)
    for b in batches:
        if rec.left() < 60:
            break
        enc.batch_size = b
        reps = 2 if small else int(os.environ.get("GPU_BENCH_REPS", "3"))
        px = torch.randn(b, 3, 224, 224, device=device)
        t = timed(lambda: enc.embed_pixels(px), device, reps)
        rec[f"embed_img_s_b{b}"] = round(b / statistics.median(t), 1)
        kernels, enc.vit_kernels = enc.vit_kernels, None  # HF's own ViT forward, side by side
        t = timed(lambda: enc.embed_pixels(px), device, reps)
        rec[f"embed_hf_vit_img_s_b{b}"] = round(b / statistics.median(t), 1)
        enc.vit_kernels = kernels
        t = timed(lambda: enc.vit_tokens(px), device, reps)
        rec[f"vit_only_img_s_b{b}"] = round(b / statistics.median(t), 1)
        # The Q-Former alone (ViT tokens ready): ours (no encoder mask, no host read) against the call with an
        # all-ones encoder mask that transformers checks on the host (what embed_vit_tokens did until 2026-11-27).
        vit = enc.vit_tokens(px)
        t = timed(lambda: enc.embed_vit_tokens(vit), device, reps)
        rec[f"qformer_img_s_b{b}"] = round(b / statistics.median(t), 1)
        t = timed(lambda: masked_qformer(enc, vit), device, reps)
        rec[f"qformer_masked_img_s_b{b}"] = round(b / statistics.median(t), 1)
        with fast_vit._attention_order("cudnn"):
            t = timed(lambda: enc.embed_vit_tokens(vit), device, reps)
        rec[f"qformer_cudnn_first_img_s_b{b}"] = round(b / statistics.median(t), 1)
        if device.type == "cuda" and b == batches[0]:
            rec["embed_host_syncs_before_copy"] = count_syncs(lambda: enc.image_embeds(enc.vit_tokens(px)))
            u8_once = np.random.default_rng(1).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
            enc.pixels_from_uint8(u8_once[:1], device=device)  # the normalisation constants are made once, before
            # what the indexer queues for a batch: pinned copy in, ViT, Q-Former, copy out (expected 0)
            rec["indexer_queue_host_syncs"] = count_syncs(lambda: embed_batch_queued(enc, u8_once))
            rec["embed_masked_host_syncs_before_copy"] = count_syncs(lambda: masked_qformer(enc, enc.vit_tokens(px), to_host=False))
        del vit
        u8 = np.random.default_rng(0).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
        t = timed(lambda: enc.pixels_from_uint8(u8, device=device), device, reps)
        rec[f"uint8_to_pixels_ms_b{b}"] = round(1000 * statistics.median(t), 2)
        t = timed(lambda: enc.embed_pixels(enc.pixels_from_uint8(u8, device=device)), device, reps)
        rec[f"embed_uint8_img_s_b{b}"] = round(b / statistics.median(t), 1)
        # As the indexer drives it: host uint8 batches through pinned memory, each batch queued before the
        # previous one's results are collected (indexing.embed / indexing.pipeline), 4 batches a rep.
        loop_reps = min(reps, 3)  # 4 batches a rep
        t = timed(lambda: queued_batches(enc, u8, 4), device, loop_reps)
        rec[f"indexer_uint8_img_s_b{b}"] = round(4 * b / statistics.median(t), 1)
        # The same with each batch written to SQLite (32 KB of vectors an image, as the metadata store
        # writes them), queued one ahead against written before the next batch starts.
        with tempfile.TemporaryDirectory() as folder:
            db = BlobWriter(Path(folder) / "vectors.sqlite")
            t = timed(lambda: queued_batches(enc, u8, 4, write=db.write), device, loop_reps)
            rec[f"indexer_write_img_s_b{b}"] = round(4 * b / statistics.median(t), 1)
            t = timed(lambda: queued_batches(enc, u8, 4, write=db.write, ahead=False), device, loop_reps)
            rec[f"serial_write_img_s_b{b}"] = round(4 * b / statistics.median(t), 1)
            rec[f"sqlite_write_ms_per_img_b{b}"] = round(1000 * statistics.median(db.seconds) / b, 3)
        del px

    if rec.left() > 60:
        qformer_precision(rec, enc, device, batches[0], 2 if small else int(os.environ.get("GPU_BENCH_REPS", "3")))

    # Text query latency (tokenise, Q-Former text path, projection, copy to host).
    t = timed(lambda: enc.embed_texts([QUERY]), device, 10 if small else 50, warmup=3)
    rec["text_query_p50_ms"], rec["text_query_p95_ms"] = p(t, 0.5), p(t, 0.95)

    # Rerank K = 128.
    k = 16 if small else 128
    enc.batch_size = k
    px = torch.randn(k, 3, 224, 224, device=device)
    vit = enc.vit_tokens(px)
    embeds = enc.embed_vit_tokens(vit)
    host = vit.to("cpu").pin_memory() if device.type == "cuda" else vit.cpu()
    reps = 3 if small else 10
    rec[f"vit_tokens_mb_per_image"] = round(vit[0].numel() * vit.element_size() / 2**20, 3)
    t = timed(lambda: enc.match(QUERY, vit, embeds), device, reps, warmup=2)
    rec[f"rerank_k{k}_stored_gpu_p50_ms"] = p(t, 0.5)
    t = timed(lambda: enc.match(QUERY, host.to(device, non_blocking=True), embeds), device, reps, warmup=1)
    rec[f"rerank_k{k}_stored_host_p50_ms"] = p(t, 0.5)
    t = timed(lambda: enc.match(QUERY, enc.vit_tokens(px)), device, reps, warmup=1)
    rec[f"rerank_k{k}_recompute_p50_ms"] = p(t, 0.5)
    del vit, host, px


def qformer_precision(rec: Recorder, enc: Blip2Encoder, device: torch.device, b: int, reps: int) -> None:
    """The Q-Former in float32 (as LAVIS ran it for retrieval: BLIP2_FACTS) against bfloat16 (what transformers
    gives under bf16: it keeps the Q-Former float32 only under fp16). Speed with the ViT tokens ready and end to
    end, with and without TF32 matmuls, and how far bf16's embeddings and ITM logits are from float32's on the
    same ViT tokens (random weights: real checkpoints may differ). Decides whether the library should cast it."""
    import copy

    m = enc.full_model
    if next(m.qformer.parameters()).dtype == torch.float32:
        rec["qformer_precision"] = "skipped: the Q-Former is already float32 in this placement"
        return
    px = torch.randn(b, 3, 224, 224, device=device)
    vit = enc.vit_tokens(px)
    ids = enc.tokenize([QUERY] * b)
    low_embeds, low_itm = enc.image_embeds(vit), enc.itm_logits(vit, ids["input_ids"], ids["attention_mask"])
    qformer, tokens = m.qformer, m.query_tokens
    m.qformer = copy.deepcopy(qformer).float()
    m.query_tokens = torch.nn.Parameter(tokens.detach().float(), requires_grad=False)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        embeds, itm = enc.image_embeds(vit), enc.itm_logits(vit, ids["input_ids"], ids["attention_mask"])
        rec["qformer_bf16_vs_fp32_embed_max_abs"] = round(float((low_embeds - embeds).abs().max()), 5)
        rec["qformer_bf16_vs_fp32_itm_logit_max_abs"] = round(float((low_itm[:, 1] - itm[:, 1]).abs().max()), 4)
        for allow in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = allow
            label = "tf32" if allow else "fp32"
            t = timed(lambda: enc.embed_vit_tokens(vit), device, reps)
            rec[f"qformer_{label}_img_s_b{b}"] = round(b / statistics.median(t), 1)
            t = timed(lambda: enc.embed_pixels(px), device, reps)
            rec[f"embed_qformer_{label}_img_s_b{b}"] = round(b / statistics.median(t), 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        m.qformer, m.query_tokens = qformer, tokens
    del vit, px


def bench_search(rec: Recorder, device: torch.device, small: bool) -> None:
    n, q, d = (20_000 if small else 1_000_000), 32, 256
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    vectors = torch.empty((n * q, d), dtype=dtype, device=device)
    step = 65536 * q
    for s in range(0, n * q, step):
        x = torch.randn((min(step, n * q - s), d), generator=g, device=device)
        vectors[s : s + len(x)] = torch.nn.functional.normalize(x, dim=-1).to(dtype)
    rec["search_images"] = n
    rec["search_vector_gib"] = round(vectors.numel() * vectors.element_size() / 2**30, 2)
    queries = torch.nn.functional.normalize(torch.randn((64, d), generator=g, device=device), dim=-1)
    # Queries near a stored vector, so the top hits are not all equally random.
    queries[:32] = torch.nn.functional.normalize(vectors[torch.randint(0, n * q, (32,), generator=g, device=device)].float() + 0.5 * queries[:32], dim=-1)
    calls = []

    def one_query():
        row = len(calls) % len(queries)
        calls.append(row)
        max_sim_topk(vectors, queries[row : row + 1], 10, num_query_tokens=q)

    t = timed(one_query, device, 5 if small else 30, warmup=2)
    rec["search_1m_p50_ms" if not small else "search_small_p50_ms"] = p(t, 0.5)
    rec["search_1m_p95_ms" if not small else "search_small_p95_ms"] = p(t, 0.95)
    t = timed(lambda: max_sim_topk(vectors, queries[:32], 10, num_query_tokens=q), device, 3, warmup=1)
    rec["search_1m_batch32_per_query_ms" if not small else "search_small_batch32_per_query_ms"] = round(1000 * statistics.median(t) / 32, 3)
    # Recall against an independent float32 brute force over the same stored vectors.
    hits = 0
    for row in range(4):
        ids, _ = max_sim_topk(vectors, queries[row : row + 1], 10, num_query_tokens=q)
        best = torch.empty(n, device=device)
        for s in range(0, n, 65536):
            e = min(n, s + 65536)
            best[s:e] = (vectors[s * q : e * q].float() @ queries[row]).view(-1, q).amax(1)
        truth = best.topk(10).indices
        hits += len(set(ids[0].tolist()) & set(truth.tolist()))
    rec["search_1m_recall_at_10" if not small else "search_small_recall_at_10"] = hits / 40
    del vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny model and 20k images, runs on CPU")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_results.json"))
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-search", action="store_true", help="skip the exact 1M search figures")
    ap.add_argument("--skip-kernels", action="store_true", help="skip the ViT kernel variants (bench_vit_kernels)")
    ap.add_argument("--backends-only", type=int, default=0, metavar="B", help="only compare SDPA backends at batch B (and B=1024 default)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rec = Recorder(Path(args.out), args.budget_s)
    import transformers

    rec["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    rec["torch"], rec["transformers"] = torch.__version__, transformers.__version__
    rec["command"] = "python bench/gpu.py " + " ".join(sys.argv[1:])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not args.skip_model:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            rec["model"] = write_checkpoint(Path(tmp), args.small, device)
            enc = Blip2Encoder.load(tmp, device="cuda" if device.type == "cuda" else "cpu")
            enc.full_model
            rec["model_build_and_load_s"] = round(time.perf_counter() - t0, 1)
            try:
                if args.backends_only:
                    embed_backends(rec, enc, device, args.backends_only)
                    enc.batch_size = 1024
                    px = torch.randn(1024, 3, 224, 224, device=device)
                    t = timed(lambda: enc.embed_pixels(px), device, 2)
                    rec["embed_img_s_b1024"] = round(1024 / statistics.median(t), 1)
                    return
                if not args.skip_kernels:
                    bench_vit_kernels(rec, enc, device, args.small)
                bench_model(rec, enc, device, args.small)
            except Exception as exc:  # keep going to the search figures; the error is in the results
                import traceback

                rec["model_error"] = "".join(traceback.format_exception(exc))[-1500:]
            finally:
                del enc
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if not args.skip_search and (rec.left() > 30 or args.small):
        bench_search(rec, device, args.small)
    rec["total_s"] = round(time.perf_counter() - rec.t0, 1)


if __name__ == "__main__":
    main()
