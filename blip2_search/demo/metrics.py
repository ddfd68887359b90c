"""Quality of the demo models, measured through the public HF API on fresh full-variety renders.

Definitions (n images, each with its own scene):
- ``itc_r1``: for each image, rank the 72 captions by ITC score (max over the 32 query vectors of the
  cosine, ``Blip2ForImageTextRetrieval.forward(use_image_text_matching_head=False)``); the fraction of
  images whose own caption ranks first.
- ``rerank_r1``: the ITC top ``rerank_k`` captions of each image re-scored with ITM positive-class logit
  + ITC cosine (the LAVIS protocol); the fraction whose own caption ranks first.
- ``itm_pairwise``: for each image, 3 hard negatives (its caption with one attribute changed: colour,
  shape, position, each to a random other value); the fraction of (positive, negative) pairs where the
  positive gets the higher match probability (softmax of the ITM head's 2 logits, index 1).
- ``itm_threshold``: the fraction of the same pairs where BOTH sides of 0.5 are right (positive > 0.5,
  negative < 0.5). Stricter than ``itm_pairwise``.
- ``caption_exact``: greedy ``generate(pixel_values=...)`` then ``batch_decode(skip_special_tokens=True)``
  equals the caption string exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
)

from .scenes import ALL_CAPTIONS, ALL_SCENES, COLORS, POSITIONS, SHAPES

__all__ = ["DemoMetrics", "evaluate_captioner", "evaluate_itm", "hard_negatives"]

_ATTRS = {"color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS}


@dataclass(frozen=True)
class DemoMetrics:
    """Fractions in [0, 1] over ``n_images`` renders; see the module docstring. None: not measured."""

    n_images: int
    itc_r1: float | None = None
    itc_color: float | None = None  # top-1 ITC caption has the right colour
    itc_shape: float | None = None
    itc_position: float | None = None
    rerank_r1: float | None = None
    rerank_k: int | None = None
    itm_pairwise: float | None = None
    itm_threshold: float | None = None
    caption_exact: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def merge(self, other: DemoMetrics) -> DemoMetrics:
        values = self.as_dict()
        values.update(other.as_dict())
        return DemoMetrics(**values)


def hard_negatives(scene_ids: np.ndarray, seed: int) -> np.ndarray:
    """[n, 3] scene ids: each scene with its colour, shape, position (in that order) changed at random."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(scene_ids), 3), np.int64)
    for i, sid in enumerate(scene_ids):
        scene = ALL_SCENES[int(sid)]
        for j, (attr, values) in enumerate(_ATTRS.items()):
            others = [v for v in values if v != getattr(scene, attr)]
            out[i, j] = scene.replace(**{attr: others[int(rng.integers(len(others)))]}).index
    return out


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def _itm_match_logits(model, pixel_values, tok, image_idx: np.ndarray, scene_ids: np.ndarray, batch: int):
    """[len(image_idx), 2] ITM logits of pairs (image image_idx[k], caption of scene_ids[k])."""
    out = []
    for sl in _batches(len(image_idx), batch):
        text = tok([ALL_CAPTIONS[s] for s in scene_ids[sl]], padding=True, return_tensors="pt")
        res = model(
            pixel_values=pixel_values[image_idx[sl]],
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            use_image_text_matching_head=True,
        )
        out.append(res.logits_per_image)
    return torch.cat(out)


@torch.no_grad()
def evaluate_itm(
    itm_dir: str | Path,
    images: list[Image.Image],
    scene_ids: np.ndarray,
    *,
    rerank_k: int = 16,
    negatives_seed: int = 0,
    batch: int = 128,
) -> DemoMetrics:
    """ITC R@1, ITC->ITM rerank R@1 and ITM hard-negative accuracy of the model saved in ``itm_dir``."""
    model = Blip2ForImageTextRetrieval.from_pretrained(itm_dir).eval()
    tok = AutoTokenizer.from_pretrained(itm_dir)
    processor = AutoImageProcessor.from_pretrained(itm_dir)
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    text = tok(list(ALL_CAPTIONS), padding=True, return_tensors="pt")
    n = len(images)

    itc = torch.cat(
        [
            model(
                pixel_values=pixel_values[sl],
                input_ids=text.input_ids,
                attention_mask=text.attention_mask,
                use_image_text_matching_head=False,
            ).logits_per_image
            for sl in _batches(n, batch)
        ]
    )  # [n, 72] cosine
    truth = torch.as_tensor(scene_ids)
    top1 = itc.argmax(dim=1)
    attr_ok = {
        attr: float(np.mean([getattr(ALL_SCENES[int(p)], attr) == getattr(ALL_SCENES[int(t)], attr) for p, t in zip(top1, truth)]))
        for attr in _ATTRS
    }

    k = min(rerank_k, itc.shape[1])
    cand = itc.topk(k, dim=1).indices  # [n, k]
    image_idx = np.repeat(np.arange(n), k)
    itm = _itm_match_logits(model, pixel_values, tok, image_idx, cand.reshape(-1).numpy(), batch).reshape(n, k, 2)
    rerank_score = itm[..., 1] + itc.gather(1, cand)
    rerank_top1 = cand.gather(1, rerank_score.argmax(dim=1, keepdim=True)).squeeze(1)

    negs = hard_negatives(scene_ids, negatives_seed)  # [n, 3]
    pair_scenes = np.concatenate([scene_ids[:, None], negs], axis=1)  # [n, 4]: positive, 3 negatives
    logits = _itm_match_logits(model, pixel_values, tok, np.repeat(np.arange(n), 4), pair_scenes.reshape(-1), batch)
    prob = logits.softmax(dim=1)[:, 1].reshape(n, 4)
    pos, neg = prob[:, :1], prob[:, 1:]
    return DemoMetrics(
        n_images=n,
        itc_r1=float((top1 == truth).float().mean()),
        itc_color=attr_ok["color"],
        itc_shape=attr_ok["shape"],
        itc_position=attr_ok["position"],
        rerank_r1=float((rerank_top1 == truth).float().mean()),
        rerank_k=k,
        itm_pairwise=float((pos > neg).float().mean()),
        itm_threshold=float(((pos > 0.5) & (neg < 0.5)).float().mean()),
    )


@torch.no_grad()
def evaluate_captioner(
    captioner_dir: str | Path, images: list[Image.Image], scene_ids: np.ndarray, *, batch: int = 128
) -> DemoMetrics:
    """Exact-caption rate of the captioner saved in ``captioner_dir`` (greedy decoding)."""
    model = Blip2ForConditionalGeneration.from_pretrained(captioner_dir).eval()
    processor = AutoProcessor.from_pretrained(captioner_dir)
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    texts = []
    for sl in _batches(len(images), batch):
        ids = model.generate(pixel_values=pixel_values[sl], max_new_tokens=10)
        texts += processor.batch_decode(ids, skip_special_tokens=True)
    exact = [t == ALL_CAPTIONS[int(s)] for t, s in zip(texts, scene_ids)]
    return DemoMetrics(n_images=len(images), caption_exact=float(np.mean(exact)))
