"""BLIP-2's retrieval evaluation protocol (LAVIS `compute_sim_matrix` + `_report_metrics`).

ITC for all image-text pairs (max over the query vectors), then for every query the top `rerank_k`
candidates are rescored with ITM positive logit + ITC; candidates outside the top k rank below all
reranked ones. Text retrieval (txt_r*) ranks texts per image; image retrieval (img_r*) ranks images per
text. Recall is in percent; an image counts as found at rank r if ANY of its captions is within r.

Images are read as LAVIS's retrieval datasets read them (`Image.open(path).convert("RGB")`): the pixels as
stored, EXIF orientation NOT applied, where indexing a library applies it (right for photos, but not what
the published figures were made from).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from PIL import Image

from .errors import ImageDecodeError, InvalidInputError
from .models.encoder import Blip2Encoder
from .store.scoring import max_scores


@dataclass(frozen=True)
class EvalSplit:
    """Images (paths) and captions; `text_image[t]` is the index of caption t's image."""

    images: tuple[Path, ...]
    texts: tuple[str, ...]
    text_image: tuple[int, ...]


@dataclass(frozen=True)
class Recall:
    """Recall@1/5/10 in percent for both directions and their mean (LAVIS `r_mean`)."""

    txt_r1: float
    txt_r5: float
    txt_r10: float
    img_r1: float
    img_r5: float
    img_r10: float

    @property
    def r_mean(self) -> float:
        return ((self.txt_r1 + self.txt_r5 + self.txt_r10) / 3 + (self.img_r1 + self.img_r5 + self.img_r10) / 3) / 2

    def as_dict(self) -> dict[str, float]:
        return {**{k: getattr(self, k) for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")}, "r_mean": self.r_mean}


@dataclass(frozen=True)
class EvalReport:
    """Reranked figures (the paper's), ITC-only figures, and where the time went (seconds)."""

    reranked: Recall
    itc: Recall
    rerank_k: int
    n_images: int
    n_texts: int
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {**self.reranked.as_dict(), "itc": self.itc.as_dict(), "rerank_k": self.rerank_k, "images": self.n_images,
                "texts": self.n_texts, "seconds": round(sum(self.timings.values()), 3), "timings": self.timings}


def load_annotations(path: Path, images_dir: Path, *, split: str = "test") -> EvalSplit:
    """Read a Karpathy `dataset_*.json` (rows of `split`) or a LAVIS annotation list.

    LAVIS: `[{"image": "relative/path.jpg", "caption": ["...", ...] or "..."}]`; captions of the same image
    in several rows are merged. Karpathy: `{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}`.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"annotations {path}: cannot read JSON ({exc}); pass a Karpathy dataset_*.json or a LAVIS annotation list") from exc
    rows: list[tuple[str, list[str]]] = []
    karpathy = isinstance(data, dict) and isinstance(data.get("images"), list)
    if karpathy:
        for i, item in enumerate(data["images"]):
            if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
                raise InvalidInputError(f"annotations {path}: images[{i}] has no 'filename' string; each image must be "
                                        "{\"filename\": \"x.jpg\", \"split\": \"test\", \"sentences\": [{\"raw\": \"...\"}]}")
            if item.get("split", split) != split and not (split == "train" and item.get("split") == "restval"):
                continue
            sentences = item.get("sentences", [])
            raws = [s.get("raw") if isinstance(s, dict) else s for s in sentences] if isinstance(sentences, list) else [None]
            if not all(isinstance(r, str) for r in raws):
                raise InvalidInputError(f"annotations {path}: images[{i}] ({item['filename']}) has a sentence without a 'raw' "
                                        "string; each sentence must be {\"raw\": \"a caption\"}")
            rows.append((str(Path(str(item.get("filepath") or "")) / item["filename"]), raws))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "image" not in item or "caption" not in item:
                raise InvalidInputError(f"annotations {path}: row {i} lacks 'image' or 'caption'; each row must be {{\"image\": \"rel/path.jpg\", \"caption\": [...]}}")
            caps = item["caption"]
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(item["image"], str) or not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise InvalidInputError(f"annotations {path}: row {i} needs an 'image' path string and a 'caption' string or list of "
                                        "strings; each row must be {\"image\": \"rel/path.jpg\", \"caption\": [...]}")
            rows.append((item["image"], caps))
    else:
        raise InvalidInputError(f"annotations {path}: neither a Karpathy dataset (object with 'images') nor a LAVIS list; pass one of those formats")

    order: dict[str, int] = {}
    texts: list[str] = []
    owner: list[int] = []
    for rel, caps in rows:
        if not all(c.strip() for c in caps):
            raise InvalidInputError(f"annotations {path}: image {rel} has an empty caption; remove it or write the caption")
        idx = order.setdefault(rel, len(order))
        for c in caps:
            texts.append(c)
            owner.append(idx)
    uncaptioned = sorted(set(range(len(order))) - set(owner))
    if texts and uncaptioned:  # it would count as found at rank 1 (the argmax of no match)
        rel = list(order)[uncaptioned[0]]
        raise InvalidInputError(f"annotations {path}: {len(uncaptioned)} image{'s' if len(uncaptioned) != 1 else ''} without captions, "
                                f"e.g. {rel}; give each image at least one caption, or remove it")
    if not order or not texts:
        where = " in split {given!r}; check {argument} or the file" if karpathy else "; check the file"
        raise InvalidInputError("annotations {path}: no images with captions" + where, argument="split", path=path, given=split)
    images = tuple(Path(images_dir) / rel for rel in order)
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise InvalidInputError("{n} annotated images are missing under {folder}, e.g. {first}; pass {argument} with the folder the annotation "
                                "paths are relative to", argument="images_dir", n=len(missing), folder=images_dir, first=missing[0])
    return EvalSplit(images, tuple(texts), tuple(owner))


def recall_at(scores_i2t: np.ndarray, text_image: np.ndarray) -> Recall:
    """LAVIS `_report_metrics` from score matrices; `scores_i2t` is `[n_images, n_texts]`, higher is better."""
    n_img, _ = scores_i2t.shape
    order_i2t = np.argsort(-scores_i2t, axis=1, kind="stable")
    # rank of the best-ranked caption that belongs to the image
    belongs = text_image[order_i2t] == np.arange(n_img)[:, None]
    if not belongs.any(axis=1).all():
        raise InvalidInputError(f"image {int(np.flatnonzero(~belongs.any(axis=1))[0])} has no caption to rank; every image needs one")
    txt_rank = belongs.argmax(axis=1)
    order_t2i = np.argsort(-scores_i2t.T, axis=1, kind="stable")
    img_rank = (order_t2i == text_image[:, None]).argmax(axis=1)

    def pct(ranks, r):
        return float(100.0 * np.mean(ranks < r))

    return Recall(pct(txt_rank, 1), pct(txt_rank, 5), pct(txt_rank, 10), pct(img_rank, 1), pct(img_rank, 5), pct(img_rank, 10))


def evaluate(encoder: Blip2Encoder, data: EvalSplit, *, rerank_k: int = 128, batch_size: int | None = None) -> EvalReport:
    """Run the protocol; returns reranked and ITC-only recalls."""
    if rerank_k < 1:
        raise InvalidInputError("{argument:{given}} must be >= 1; pass {argument:128} (the paper's value)", argument="rerank_k", given=rerank_k)
    bs = batch_size or encoder.batch_size
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    vits, embeds = [], []
    for s in range(0, len(data.images), bs):
        px = encoder.preprocess([protocol_image(p) for p in data.images[s : s + bs]])
        vit = encoder.vit_tokens(px)
        vits.append(vit)
        embeds.append(encoder.embed_vit_tokens(vit))
    vit_all = torch.cat(vits)
    image_embeds = np.concatenate(embeds)
    timings["embed_images"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_embeds = encoder.embed_texts(list(data.texts))
    tokens = encoder.tokenize(list(data.texts))
    timings["embed_texts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    itc = max_scores(text_embeds, image_embeds).T  # [n_img, n_txt], a block of images at a time (not [i, t, Q] at once)
    timings["itc"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    k_i2t = min(rerank_k, itc.shape[1])
    k_t2i = min(rerank_k, itc.shape[0])
    i2t = np.full_like(itc, -100.0)
    for i in range(itc.shape[0]):
        cand = np.argsort(-itc[i], kind="stable")[:k_i2t]
        logits = _itm(encoder, vit_all[i : i + 1].expand(len(cand), -1, -1), ids[cand], mask[cand], bs)
        i2t[i, cand] = logits + itc[i, cand]
    t2i = np.full_like(itc.T, -100.0)
    for t in range(itc.shape[1]):
        cand = np.argsort(-itc[:, t], kind="stable")[:k_t2i]
        n = len(cand)
        logits = _itm(encoder, vit_all[cand], ids[t : t + 1].expand(n, -1), mask[t : t + 1].expand(n, -1), bs)
        t2i[t, cand] = logits + itc[cand, t]
    timings["rerank"] = time.perf_counter() - t0

    text_image = np.asarray(data.text_image)
    itc_recall = recall_at(itc, text_image)
    txt = recall_at(i2t, text_image)
    img = recall_at(t2i.T, text_image)
    reranked = Recall(txt.txt_r1, txt.txt_r5, txt.txt_r10, img.img_r1, img.img_r5, img.img_r10)
    timings = {k: round(v, 3) for k, v in timings.items()}
    return EvalReport(reranked, itc_recall, rerank_k, len(data.images), len(data.texts), timings)


def protocol_image(path: Path) -> Image.Image:
    """An eval image as LAVIS reads it, `Image.open(path).convert("RGB")`: as stored (no EXIF rotation), alpha
    dropped rather than composited. Raises ImageDecodeError naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # what Pillow's decoders raise
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ImageDecodeError(f"cannot read eval image {path} ({reason}); replace it with the dataset's original file") from exc


def _itm(encoder: Blip2Encoder, vit: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, bs: int) -> np.ndarray:
    """ITM positive logits `[n]` for n pairs, in batches."""
    out = [encoder.itm_logits(vit[s : s + bs], ids[s : s + bs], mask[s : s + bs])[:, 1] for s in range(0, len(vit), bs)]
    return torch.cat(out).cpu().numpy()
