"""ITM reranking of search candidates: score = ITM positive logit + ITC (the LAVIS protocol).

ITM needs each candidate's ViT tokens. `RecomputeVit` re-reads the source image and reruns the ViT:
no storage, and correct as long as the file is still on disk as it was indexed.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Protocol, Sequence

import torch

from ..errors import PRUNE_MISSING, STORE_VIT, Blip2SearchError, Note, Spelled
from ..images import model_image
from ..models.encoder import Blip2Encoder
from .results import Hit


class VitSource(Protocol):
    """Where a reranker gets ViT tokens: `[n, T, W]` for the readable hits, and which hits those are."""

    missing_reason: str  # why some hits got no tokens, and the fix (for the search's note)

    def tokens(self, hits: Sequence[Hit]) -> tuple[torch.Tensor, list[int]]: ...


AsIndexed = Callable[[list[int]], dict[int, tuple[int | None, int | None, str | None]]]
"""Image ids -> `{id: (size, mtime_ns, content_hash)}` of each file as it was indexed."""


class RecomputeVit:
    """Re-decode each hit's file as `index` did (`model_image`: the tokens equal the stored ones) and rerun the ViT.

    With `as_indexed`, a file whose content is not the indexed one's is not read: its vectors are of the picture it
    was, and ITM would score another one (a photo edited since, a link pointed elsewhere). Size and modification
    time tell, as for `index`; where they differ the content is hashed, so a file only touched or copied back
    from a backup is still read."""

    missing_reason = Note("file missing, unreadable or changed since it was indexed; index its folder again to refresh it, or forget "
                          "photos whose files are gone for good with `{prune}`", prune=PRUNE_MISSING)

    def __init__(self, encoder: Blip2Encoder, as_indexed: AsIndexed | None = None):
        self.encoder = encoder
        self.as_indexed = as_indexed

    def tokens(self, hits: Sequence[Hit]) -> tuple[torch.Tensor, list[int]]:
        images, ok = [], []
        model_input = self.encoder.image_input  # outside the loop: a checkpoint that cannot say it is a model error, not a missing file
        indexed = self.as_indexed([h.id for h in hits]) if self.as_indexed is not None and hits else {}
        for i, h in enumerate(hits):
            if not _as_indexed(h.path, indexed.get(h.id)):
                continue  # keeps its first-stage rank, as a file gone
            try:
                images.append(model_image(h.path, *model_input))  # model-sized: 128 hits are not 128 full photos
                ok.append(i)
            except Blip2SearchError:
                continue  # gone or unreadable since indexing: it keeps its first-stage rank
        if not images:
            return torch.zeros((0,)), []
        bs = self.encoder.batch_size
        vit = torch.cat([self.encoder.vit_tokens(self.encoder.preprocess(images[s : s + bs])) for s in range(0, len(images), bs)])
        return vit, ok


def _as_indexed(path: str, indexed: tuple[int | None, int | None, str | None] | None) -> bool:
    """Whether the file at `path` holds what was indexed: its size and modification time, else its content hash
    (True when unrecorded; False when it cannot be read: it is skipped either way)."""
    if indexed is None or None in indexed[:2]:
        return True
    size, mtime_ns, digest = indexed
    try:
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
            return True
        if digest is None or st.st_size != size:
            return False
        from ..indexing.read import content_hash  # here: a search that reranks no touched file need not import indexing

        with open(path, "rb") as f:
            return content_hash(f.read()) == digest
    except OSError:
        return False


class StoredVit:
    """ViT tokens from the library's token store, recomputing those not stored (`stored_only` refuses that)."""

    def __init__(self, encoder: Blip2Encoder, store, hash_of, *, stored_only: bool = False, as_indexed: AsIndexed | None = None):
        self.encoder = encoder
        self.store = store
        self.hash_of = hash_of
        self.recompute = RecomputeVit(encoder, as_indexed)
        self.stored_only = stored_only
        self.missing_reason = (Note("no ViT tokens stored for them; run {store_vit} to store the missing ones, or pass {auto}",
                                    store_vit=STORE_VIT, auto=Spelled("rerank_source='auto'", "--rerank-source auto"))
                               if stored_only else RecomputeVit.missing_reason)

    def tokens(self, hits: Sequence[Hit]) -> tuple[torch.Tensor, list[int]]:
        hashes = self.hash_of([h.id for h in hits])
        found = {i: self.store.get(hashes.get(h.id)) for i, h in enumerate(hits)}
        missing = [i for i, t in found.items() if t is None]
        extra, ok_extra = (self.recompute.tokens([hits[i] for i in missing]) if missing and not self.stored_only else (None, []))
        dtype = self.encoder.full_model.vision_model.embeddings.patch_embedding.weight.dtype
        rows, ok = [], []
        recomputed = {missing[j]: extra[n] for n, j in enumerate(ok_extra)} if ok_extra else {}
        for i in range(len(hits)):
            if found[i] is not None:
                rows.append(torch.from_numpy(found[i]).to(self.encoder.device, dtype))
            elif i in recomputed:
                rows.append(recomputed[i].to(dtype))
            else:
                continue
            ok.append(i)
        return (torch.stack(rows) if rows else torch.zeros((0,))), ok


def rerank_hits(encoder: Blip2Encoder, source: VitSource, text: str, hits: Sequence[Hit]) -> tuple[list[Hit], int]:
    """Rescore `hits` by ITM logit + ITC; returns (reranked best-first, then unreadable ones in their
    previous order) and how many could not be reranked."""
    if not hits:
        return [], 0
    vit, ok = source.tokens(hits)
    scored: list[Hit] = []
    if ok:
        tok = encoder.tokenize([text])
        bs = encoder.batch_size
        logits = torch.cat([
            encoder.itm_logits(vit[s : s + bs], tok["input_ids"].expand(len(vit[s : s + bs]), -1), tok["attention_mask"].expand(len(vit[s : s + bs]), -1))[:, 1]
            for s in range(0, len(vit), bs)
        ]).cpu().numpy()
        for j, i in enumerate(ok):
            h = hits[i]
            scored.append(replace(h, itm_logit=float(logits[j]), score=float(logits[j]) + h.itc))
        scored.sort(key=lambda h: (-h.score, h.id))
    missing = [h for i, h in enumerate(hits) if i not in set(ok)]
    return scored + missing, len(missing)
