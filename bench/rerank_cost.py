"""What ITM reranking costs with BLIP-2's real dimensions (ViT-g + Q-Former, random weights).

Measures, side by side in one run on this machine: the ViT forward per image (what recomputing
ViT tokens costs per candidate) and ITM from stored tokens for K = 16 and 32 candidates.

    python bench/rerank_cost.py [--threads N] [--images 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def full_size_model():
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

    config = Blip2Config(vision_config=Blip2VisionConfig().to_dict(), qformer_config=Blip2QFormerConfig(use_qformer_text_input=True).to_dict(),
                         num_query_tokens=32, image_text_hidden_size=256)
    return Blip2ForImageTextRetrieval(config).eval().requires_grad_(False)


def best_of(fn, n=2):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--images", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    m = full_size_model()
    print(f"# built ViT-g + Q-Former ({sum(p.numel() for p in m.parameters()) / 1e9:.2f} B params) in {time.perf_counter() - t0:.0f} s, "
          f"{torch.get_num_threads()} threads", flush=True)
    px = torch.randn(args.images, 3, 224, 224)
    with torch.inference_mode():
        vit = m.vision_model(pixel_values=px[:1]).last_hidden_state  # warm-up
        vit_s = best_of(lambda: m.vision_model(pixel_values=px).last_hidden_state) / args.images
        ids = torch.randint(1000, 2000, (1, 12))
        mask = torch.ones_like(ids)

        def itm(k):
            tokens = vit.expand(k, -1, -1)
            q = m.query_tokens.expand(k, -1, -1)
            emb = m.embeddings(input_ids=ids.expand(k, -1), query_embeds=q)
            att = torch.cat([torch.ones(k, 32, dtype=torch.long), mask.expand(k, -1)], 1)
            h = m.qformer(query_embeds=emb, query_length=32, attention_mask=att, encoder_hidden_states=tokens,
                          encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long)).last_hidden_state
            return m.itm_head(h[:, :32]).mean(1)

        itm16 = best_of(lambda: itm(16))
        itm32 = best_of(lambda: itm(32))
    print(f"vit_forward_per_image_s: {vit_s:.2f}")
    print(f"rerank_k16_stored_s: {itm16:.2f}")
    print(f"rerank_k16_recompute_s: {16 * vit_s + itm16:.2f}")
    print(f"rerank_k32_stored_s: {itm32:.2f}")
    print(f"rerank_k32_recompute_s: {32 * vit_s + itm32:.2f}")
    print(f"recompute_over_stored_k16: {(16 * vit_s + itm16) / itm16:.1f}")
    print(f"# command: python bench/rerank_cost.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
