"""The embed stage: a batch of decoded images -> image vectors, and captions with their text vectors.

On a GPU, `embed_batch` only queues the batch: the image path reads nothing back until the copy of its
results to the host, which is queued right behind it and awaited in `QueuedBatch.collect`. The indexer
queues the next batch before it collects (and writes) this one, so the card always has the next batch
waiting (see `indexing.pipeline`). On the CPU everything has run by the time `embed_batch` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..models.captioner import Blip2Captioner
from ..models.encoder import Blip2Encoder
from ..models.text import has_words


class HostCopy:
    """A copy of a device tensor to the host, queued now, awaited in `numpy()`.

    From a GPU the copy goes into pinned memory behind the work queued so far, with an event after it:
    waiting for the event waits for this batch only, not for batches queued after it. A CPU tensor is
    taken as it is.
    """

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


@dataclass(frozen=True, eq=False)
class EmbeddedBatch:
    """`vectors [n, Q, D] float32` (L2-normalised per query); captions and their `caption_vectors` (see
    `embed_captions`), or None; `vit [n, T, W] float16` the ViT tokens, or None when they were not asked for (the
    token store is off)."""

    vectors: np.ndarray
    captions: list[str] | None
    caption_vectors: list[np.ndarray | None] | None
    vit: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class QueuedBatch:
    """A batch whose model work is queued (on a GPU) or done (on the CPU); `collect()` waits for its results."""

    vectors: HostCopy
    captions: list[str] | None
    caption_vectors: list[np.ndarray | None] | None
    vit: HostCopy | None

    def collect(self) -> EmbeddedBatch:
        return EmbeddedBatch(self.vectors.numpy(), self.captions, self.caption_vectors, self.vit.numpy() if self.vit else None)


def embed_batch(
    encoder: Blip2Encoder,
    captioner: Blip2Captioner | None,
    pixels: dict[tuple[int, int], np.ndarray],
    *,
    shared_vit: bool = False,
    keep_vit: bool = False,
) -> QueuedBatch:
    """Queue the models on `pixels` (`image_input` -> `[n, S, S, 3] uint8`, one entry per model input).

    `shared_vit` (see `models.sharing.share_vit`): the ViT blocks run once for both models. `keep_vit`:
    also bring back the ViT tokens (for the token store). Captioning reads tokens back as it generates,
    so with a captioner the batch has run when this returns.
    """
    x = encoder.pixels_from_uint8(pixels[encoder.image_input], device=encoder.device)
    if captioner is not None and shared_vit:
        blocks = encoder.vit_blocks(x)
        vit = encoder.post_layernorm(blocks)
        captions = captioner.caption_vit(blocks)
    else:
        vit = encoder.vit_tokens(x)
        captions = None
        if captioner is not None:
            captions = captioner.caption_pixels(captioner.pixels_from_uint8(pixels[captioner.image_input], device=captioner.device))
    vectors = HostCopy(encoder.image_embeds(vit).float())
    vit_copy = HostCopy(vit.half()) if keep_vit else None  # the token store keeps float16
    caption_vectors = embed_captions(encoder, captions) if captions is not None else None
    return QueuedBatch(vectors, captions, caption_vectors, vit_copy)


def embed_captions(encoder: Blip2Encoder, captions: Sequence[str]) -> list[np.ndarray | None]:
    """Each caption's text embedding (`[D] float32`, L2-normalised), None for a caption of no words ("", or only
    marks BLIP-2's normalisation drops): its embedding is that of an empty text, alike for every photo, which
    caption fusion would rank as a match of any query."""
    worded = [i for i, text in enumerate(captions) if has_words(text)]
    out: list[np.ndarray | None] = [None] * len(captions)
    if worded:
        for i, vector in zip(worded, encoder.embed_texts([captions[i] for i in worded])):
            out[i] = vector
    return out
