"""The stateless model API: rerank images against a text (ITM logit + ITC), caption images."""

from __future__ import annotations

import os
import reprlib
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .errors import Blip2SearchError, InvalidInputError
from .models.captioner import Blip2Captioner, CaptionSettings
from .models.encoder import Blip2Encoder
from .models.loading import DEFAULT_CAPTIONER, DEFAULT_EMBEDDER

ImageLike = Union[str, os.PathLike, Image.Image, BinaryIO]
"""A path, a PIL image, or a binary file object (read from its start, e.g. an upload)."""


@dataclass(frozen=True)
class RerankHit:
    """One scored image. `path` is None for a PIL image or a file object; `index` is its position in the input."""

    index: int
    path: str | None
    score: float
    itc: float
    itm_logit: float
    match_probability: float


@dataclass(frozen=True)
class ImageFailure:
    """An input image that could not be scored, with a one-line reason."""

    index: int
    path: str | None
    error: str


@dataclass(frozen=True)
class Ranking:
    """Images sorted by `score`, descending (ties keep input order); iterating yields the hits. `notes`: what
    the caller should know about the scoring, e.g. a query longer than BLIP-2 reads."""

    query: str
    hits: tuple[RerankHit, ...]
    errors: tuple[ImageFailure, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())

    def __iter__(self) -> Iterator[RerankHit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i: int) -> RerankHit:
        return self.hits[i]


@dataclass(frozen=True)
class CaptionResult:
    """The caption of one input image."""

    index: int
    path: str | None
    caption: str


@dataclass(frozen=True)
class Captions:
    """Captions in input order, and the images that could not be read."""

    results: tuple[CaptionResult, ...]
    errors: tuple[ImageFailure, ...] = field(default=())


_MODELS: dict[tuple, object] = {}
_LOADS: dict[tuple, "_Load"] = {}  # the models loading now: their other callers wait for the one load
_MODELS_LOCK = threading.Lock()  # guards the two dicts; never held while a model loads (a hub download: minutes)


class _Load:
    """One model's load: held while it runs; then the model, for the callers that waited for it (another model of
    its kind may have taken its place in the cache meanwhile)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.model = None


def _cached(kind: type, name: str, **kwargs):
    """Reuse a loaded model across calls; keep one per kind in memory (BLIP-2 checkpoints are GBs).

    Threads asking for the same model share one load; different models load at once."""
    key = (kind, name, tuple(sorted(kwargs.items())))
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        load = _LOADS.setdefault(key, _Load())
    with load.lock:
        if load.model is not None:  # loaded by the thread this one waited for
            return load.model
        load.model = kind.load(name, **kwargs)
        with _MODELS_LOCK:
            for k in [k for k in _MODELS if k[0] is kind]:
                del _MODELS[k]
            _MODELS[key] = load.model
            if _LOADS.get(key) is load:
                del _LOADS[key]
        return load.model


def get_encoder(model: str | Blip2Encoder = DEFAULT_EMBEDDER, *, device: str = "auto", dtype: str = "auto") -> Blip2Encoder:
    """An encoder for `model` (hub id, directory or "demo"), reused across calls with the same arguments."""
    if isinstance(model, Blip2Encoder):
        return _loaded(model, "model", device, dtype)
    return _cached(Blip2Encoder, _model_name(model, "model"), device=device, dtype=dtype)


def _model_name(model, what: str) -> str:
    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
        raise InvalidInputError(f"{what} {model!r} is not a checkpoint name; pass a hub id, a local folder or 'demo'")
    return os.fspath(model)


def _loaded(checkpoint, what: str, device: str, dtype: str):
    """A model passed loaded runs where it was placed: a device or dtype asked for as well must be that one."""
    if device == "auto" and dtype == "auto":
        return checkpoint
    from .models.policy import detect_placement

    wanted, placed = detect_placement(device, dtype), checkpoint.placement  # a device or dtype that cannot be is said first
    if (device != "auto" and wanted.device != placed.device) or (dtype != "auto" and wanted.dtype != placed.dtype):
        raise InvalidInputError(f"device={device!r}, dtype={dtype!r} cannot move the {what} passed in (it runs on {placed.device} in "
                                f"{placed.dtype}); pass the {what}'s name with them, or load it with that device and dtype")
    return checkpoint


def _caption_settings(settings) -> CaptionSettings | None:
    if isinstance(settings, dict):  # the fields of CaptionSettings
        try:
            settings = CaptionSettings(**settings)
        except TypeError:
            raise InvalidInputError(f"caption settings {settings!r} name unknown fields; use num_beams, max_new_tokens, min_new_tokens, prompt") from None
    if settings is not None and not isinstance(settings, CaptionSettings):
        raise InvalidInputError(f"caption settings {_short(settings)} are not CaptionSettings; pass CaptionSettings(num_beams=5) or a dict of its fields")
    return settings


def get_captioner(captioner: str | Blip2Captioner = DEFAULT_CAPTIONER, *, device: str = "auto", dtype: str = "auto", settings: CaptionSettings | dict | None = None) -> Blip2Captioner:
    """A captioner for `captioner` (hub id, directory or "demo"), reused across calls with the same arguments.

    With `settings`, a captioner whose captions use them by default; it shares the weights of the one
    without (other settings load nothing again)."""
    settings = _caption_settings(settings)
    if isinstance(captioner, Blip2Captioner):
        model = _loaded(captioner, "captioner", device, dtype)
    else:
        model = _cached(Blip2Captioner, _model_name(captioner, "captioner"), device=device, dtype=dtype)
    return model if settings is None or settings == model.settings else model.with_settings(settings)


def _short(value) -> str:
    """A value named in a one-line message: its type, and a short repr (a numpy array by its shape)."""
    if isinstance(value, np.ndarray):
        return f"a numpy array {value.shape} of {value.dtype}"
    return f"{reprlib.repr(value)}, of type {type(value).__name__}"


def _is_image_like(item) -> bool:
    return isinstance(item, (str, os.PathLike, Image.Image)) or (hasattr(item, "read") and not isinstance(item, type))


def _inputs(images: Sequence[ImageLike]) -> list[ImageLike]:
    """`images` as a list of paths, PIL images and binary files; InvalidInputError for anything else."""
    if _is_image_like(images):  # one picture (a file object is iterable too, by lines)
        images = [images]
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise InvalidInputError(f"images is one numpy array {images.shape}, not a list of pictures; pass [Image.fromarray(a)]")
    if isinstance(images, (bytes, dict)) or not isinstance(images, Iterable):
        raise InvalidInputError(f"images ({_short(images)}) are not a list of paths, PIL images or binary files; pass e.g. ['a.jpg', pil_image]")
    images = list(images)
    odd = next((i for i, item in enumerate(images) if not _is_image_like(item)), None)
    if odd is not None:
        fix = "convert it with Image.fromarray(a)" if isinstance(images[odd], np.ndarray) else "pass a path, a PIL image or a file opened with 'rb'"
        raise InvalidInputError(f"image {odd} ({_short(images[odd])}) is not a path, a PIL image or a binary file; {fix}")
    return images


def _pixel_batches(checkpoint, images: list[ImageLike], size: int) -> Iterator[tuple[list[tuple[int, str | None]], torch.Tensor | None, list[ImageFailure]]]:
    """`size` inputs at a time: (index, path) of those read, their pixel_values, and the failures.

    A file is decoded as `index` decodes a photo (`model_image`: the same input, so the same scores as a library
    that holds it) straight to the model's size, so one full-size picture is in memory at a time whatever the number
    of inputs (while it decodes: a 24 MP photo takes 72 MB, a 160 MP one about 480 MB); a PIL image goes to the
    checkpoint's processor as it is.
    """
    from .images import model_image, upright_rgb

    model_input = checkpoint.image_input  # here, not in the loop: a checkpoint that cannot say it is a model error, not each image's
    for start in range(0, len(images), size):
        read, pixels, failed = [], [], []
        for i in range(start, min(start + size, len(images))):
            item = images[i]
            path = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
            try:
                if isinstance(item, Image.Image):
                    picture = upright_rgb(item, f"<image {i}>")
                else:
                    picture = model_image(item if path is None else Path(path), *model_input)  # as `index` decodes it
            except Blip2SearchError as exc:
                failed.append(ImageFailure(i, path, str(exc)))
                continue
            pixels.append(checkpoint.preprocess([picture]))
            del picture  # before the next decode, not after it
            read.append((i, path))
        yield read, (torch.cat(pixels) if pixels else None), failed


def rerank(
    query: str,
    images: Sequence[ImageLike],
    model: str | Blip2Encoder = DEFAULT_EMBEDDER,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> Ranking:
    """Score `images` (paths, PIL images or binary files) against `query`; best first, by ITM logit + ITC, as `search`
    reranks: the query syntax of docs/queries.md (weights, negatives) shapes the ITC, and ITM scores
    the positive terms.

    Unreadable images are reported in `Ranking.errors` and the others are still scored.
    """
    from .search.engine import composite_itc, query_notes
    from .search.query import parse_query

    if not isinstance(query, str):
        raise InvalidInputError(f"rerank query ({_short(query)}) is not text; pass the text to match the images against")
    if not query.strip():
        raise InvalidInputError("rerank query is empty; pass the text to match the images against")
    parsed = parse_query(query)
    encoder = get_encoder(model, device=device, dtype=dtype)
    images = _inputs(images)
    terms = None
    if not parsed.is_simple:
        terms = (encoder.embed_texts([t.text for t in parsed.terms]), np.array([t.weight for t in parsed.terms], dtype=np.float32))
    hits, errors = [], []
    for read, pixels, failed in _pixel_batches(encoder, images, encoder.batch_size):
        errors += failed
        if not read:
            continue
        vit = encoder.vit_tokens(pixels)
        embeds = encoder.embed_vit_tokens(vit)
        scores = encoder.match(parsed.itm_text, vit, embeds)
        if terms is not None:
            scores = replace(scores, itc=composite_itc(embeds, *terms))
        hits += [
            RerankHit(i, path, float(scores.score[j]), float(scores.itc[j]), float(scores.itm_logit[j]), float(scores.match_probability[j]))
            for j, (i, path) in enumerate(read)
        ]
    hits.sort(key=lambda h: (-h.score, h.index))
    return Ranking(parsed.raw, tuple(hits), tuple(errors), tuple(query_notes(encoder, parsed, reranked=True)))


def caption(
    images: Sequence[ImageLike],
    captioner: str | Blip2Captioner = DEFAULT_CAPTIONER,
    *,
    device: str = "auto",
    dtype: str = "auto",
    settings: CaptionSettings | dict | None = None,
) -> Captions:
    """Caption `images` (paths, PIL images or binary files) in input order; unreadable ones go to `Captions.errors`.

    `settings` (CaptionSettings or a dict of its fields) apply to this call, also with a loaded captioner
    (whose own settings apply otherwise)."""
    settings = _caption_settings(settings)
    model = get_captioner(captioner, device=device, dtype=dtype)
    results, errors = [], []
    for read, pixels, failed in _pixel_batches(model, _inputs(images), model.batch_size):
        errors += failed
        if read:
            results += [CaptionResult(i, path, text) for (i, path), text in zip(read, model.caption_pixels(pixels, settings))]
    return Captions(tuple(results), tuple(errors))
