"""The embed stage: a batch of decoded images -> image vectors, and captions with their text vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.captioner import Blip2Captioner
from ..models.encoder import Blip2Encoder


@dataclass(frozen=True, eq=False)
class EmbeddedBatch:
    """`vectors [n, Q, D] float32` (L2-normalised per query); captions and `caption_vectors [n, D]` or None;
    `vit [n, T, W]` the ViT tokens (for the optional token store)."""

    vectors: np.ndarray
    captions: list[str] | None
    caption_vectors: np.ndarray | None
    vit: object = None


def embed_batch(
    encoder: Blip2Encoder, captioner: Blip2Captioner | None, pixels: dict[int, np.ndarray], *, shared_vit: bool = False
) -> EmbeddedBatch:
    """Run the models on `pixels` (size -> `[n, S, S, 3] uint8`, one entry per model input size).

    `shared_vit` (see `models.sharing.share_vit`): the ViT blocks run once for both models.
    """
    x = encoder.pixels_from_uint8(pixels[encoder.image_size], device=encoder.device)
    if captioner is not None and shared_vit:
        blocks = encoder.vit_blocks(x)
        vit = encoder.post_layernorm(blocks)
        captions = captioner.caption_vit(blocks)
    else:
        vit = encoder.vit_tokens(x)
        captions = None
        if captioner is not None:
            captions = captioner.caption_pixels(captioner.pixels_from_uint8(pixels[captioner.image_size], device=captioner.device))
    vectors = encoder.embed_vit_tokens(vit)
    if captions is None:
        return EmbeddedBatch(vectors, None, None, vit)
    return EmbeddedBatch(vectors, captions, encoder.embed_texts(captions), vit)
