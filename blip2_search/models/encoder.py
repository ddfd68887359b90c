"""BLIP-2 stage-1 encoders over HF's Blip2 classes: ITC embeddings, ITM from stored ViT tokens.

Shapes (Q = num_query_tokens, 32 for real checkpoints; D = image_text_hidden_size, 256;
T = ViT tokens, 257 at 224 px; W = ViT width, 1408 for ViT-g):
- image embeddings `[n, Q, D] float32`, each query vector L2-normalised;
- text embeddings `[n, D] float32` from the [CLS] token, L2-normalised;
- ViT tokens `[n, T, W]` (after `post_layernorm`), in the model's dtype;
- ITC score = max over the Q query vectors of the cosine; ITM logits `[n, 2]`, index 1 = match.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ModelLoadError
from .checkpoint import LOADING, Checkpoint
from .fast_vit import DEFAULT_KERNELS, VitKernels, use_fast_vit
from .fast_vit import vit_blocks as fast_vit_blocks
from .loading import DEFAULT_EMBEDDER, ModelSource, check_embedder_config, resolve_model
from .policy import Placement, detect_placement
from .text import MAX_TOKENS, pre_caption

@dataclass(frozen=True)
class MatchScores:
    """Scores of one text against n images, each `[n] float32`; `score` = ITM logit + ITC (LAVIS)."""

    itc: np.ndarray
    itm_logit: np.ndarray
    match_probability: np.ndarray

    @property
    def score(self) -> np.ndarray:
        return self.itm_logit + self.itc


class Blip2Encoder(Checkpoint):
    """ITC embeddings and ITM scores from a `Blip2ForImageTextRetrieval` checkpoint.

    Parts load on first use: a text-only task loads the Q-Former text path (`Blip2TextModelWithProjection`,
    no ViT); anything with images loads the whole retrieval model, which then serves text too.
    """

    role = "model"

    def __init__(self, source: ModelSource, placement: Placement, *, batch_size: int = 32):
        super().__init__(source, placement)
        self.batch_size = batch_size
        config = check_embedder_config(source)
        self.num_query_tokens: int = int(config.get("num_query_tokens", 32))
        vision = config.get("vision_config") or {}
        h, i, n = vision.get("hidden_size", 1408), vision.get("intermediate_size", 6144), vision.get("num_hidden_layers", 39)
        self.vit_params: int = int(n * (4 * h * h + 2 * h * i))  # attention + MLP weights: the ViT's cost per token
        self.embed_dim: int = int(config.get("image_text_hidden_size", 256))
        # the 35 tokens LAVIS reads, fewer where the Q-Former has fewer text positions (past them it fails with a RuntimeError)
        positions = (config.get("qformer_config") or {}).get("max_position_embeddings", MAX_TOKENS)
        self.max_tokens: int = min(MAX_TOKENS, int(positions))
        self._tokenizer = None
        # HF's fast tokenizer keeps the truncation it was last called with (set, then encode): threads tokenizing at
        # once with other lengths (tokenize, cut_short) got each other's, e.g. 36 tokens where the Q-Former has 35
        self._tokenizing = threading.Lock()
        self._text_model = None
        self._full_model = None
        # The ViT's kernels on a GPU in half precision (models/fast_vit.py); None: HF's own forward everywhere.
        self.vit_kernels: VitKernels | None = DEFAULT_KERNELS

    @classmethod
    def load(
        cls, name: str | ModelSource = DEFAULT_EMBEDDER, *, device: str = "auto", dtype: str = "auto", batch_size: int = 32
    ) -> "Blip2Encoder":
        """Resolve `name` (hub id, directory or "demo"; or an already resolved `ModelSource`) and pick the
        device/dtype; weights load lazily."""
        source = name if isinstance(name, ModelSource) else resolve_model(name, role="embedder")
        return cls(source, detect_placement(device, dtype), batch_size=batch_size)

    # ---------------------------------------------------------------- lazy parts
    @property
    def tokenizer(self):
        return self._load_once("_tokenizer", self._load_bert_tokenizer)

    def _load_bert_tokenizer(self):
        tok = self._load_tokenizer()
        probe = tok("a", add_special_tokens=True)["input_ids"]
        if tok.cls_token_id is None or probe[0] != tok.cls_token_id:
            raise ModelLoadError(f"tokenizer of {self.name!r} does not start texts with [CLS]; BLIP-2 text embeddings are read from token 0, so use the checkpoint's BERT tokenizer")
        tok.padding_side = "right"
        tok.truncation_side = "right"
        return tok

    @property
    def loaded_parts(self) -> tuple[str, ...]:
        """Which parts are in memory: "text" (Q-Former text path only) and/or "full" (ViT too)."""
        return tuple(p for p, m in (("text", self._text_model), ("full", self._full_model)) if m is not None)

    @property
    def full_model(self):
        return self._load_once("_full_model", self._load_full_model)

    def _load_full_model(self):
        from transformers import Blip2ForImageTextRetrieval

        model = self._from_pretrained(Blip2ForImageTextRetrieval)
        self._text_model = None  # the full model has the same text path: keep one copy
        return model

    def _text_parts(self):
        if self._full_model is not None:
            return self._full_model
        if self._text_model is not None:
            return self._text_model
        with LOADING:
            if self._full_model is not None:
                return self._full_model
            if self._text_model is None:
                self._text_model = self._from_pretrained(_text_path_class())
            return self._text_model

    # ---------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """LAVIS-normalised, right-truncated to `max_tokens` (35), padded to the longest: input_ids, attention_mask `[n, L]`."""
        enc = self._tokens(  # split_special_tokens: a query's "<image>" or "[sep]" is text, not a control token
            [pre_caption(t) for t in texts], padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt",
            split_special_tokens=True,
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def cut_short(self, text: str) -> str | None:
        """None when `text` fits the `max_tokens` (35) BLIP-2 reads; else the last words it reads (`tokenize` cuts there),
        or "" when the tokenizer cannot say where that is."""
        clean = pre_caption(text)
        limit = self.max_tokens
        if len(self._tokens(clean, truncation=True, max_length=limit + 1, split_special_tokens=True)["input_ids"]) <= limit:
            return None
        if not self.tokenizer.is_fast:  # no character offsets
            return ""
        ends = [end for _, end in self._tokens(clean, truncation=True, max_length=limit, return_offsets_mapping=True,
                                               split_special_tokens=True)["offset_mapping"]]
        return " ".join(clean[: max(ends)].split()[-4:])  # special tokens have (0, 0)

    def _tokens(self, texts, **settings):
        """`self.tokenizer(texts, **settings)`, one thread at a time (see `_tokenizing`)."""
        tokenizer = self.tokenizer  # loaded outside the lock: loading takes LOADING
        with self._tokenizing:
            return tokenizer(texts, **settings)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings `[n, D] float32`, L2-normalised, from the [CLS] token."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            out.append(self._text_embeds(self.tokenize(texts[start : start + self.batch_size])))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    @torch.inference_mode()
    def _text_embeds(self, tokens: dict[str, torch.Tensor]) -> np.ndarray:
        m = self._text_parts()
        hidden = m.qformer(query_embeds=m.embeddings(input_ids=tokens["input_ids"]), query_length=0, attention_mask=tokens["attention_mask"]).last_hidden_state
        cls = hidden[:, 0, :].to(m.text_projection.weight.dtype)
        return torch.nn.functional.normalize(m.text_projection(cls).float(), dim=-1).cpu().numpy()  # unit length in float32

    # ---------------------------------------------------------------- images
    @torch.inference_mode()
    def vit_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT output after post_layernorm, `[n, T, W]` in the model dtype, on the model's device."""
        return self.post_layernorm(self.vit_blocks(pixel_values))

    @torch.inference_mode()
    def vit_blocks(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT blocks' output BEFORE post_layernorm, `[n, T, W]`: what a captioner with the same blocks can share.

        `post_layernorm(vit_blocks(x))` equals `vit_tokens(x)`. On CUDA in half precision the blocks run
        through `models.fast_vit` (fused kernels, measured in bench/gpu.py) unless `vit_kernels` is None.
        """
        vm = self.full_model.vision_model
        pixel_values = pixel_values.to(self.device, vm.embeddings.patch_embedding.weight.dtype)
        if self.vit_kernels is not None and use_fast_vit(self.device.type, vm.embeddings.patch_embedding.weight.dtype):
            return fast_vit_blocks(vm, pixel_values, self.vit_kernels)
        return vm.encoder(inputs_embeds=vm.embeddings(pixel_values)).last_hidden_state

    @torch.inference_mode()
    def post_layernorm(self, blocks: torch.Tensor) -> torch.Tensor:
        """This model's own ViT post_layernorm over shared block outputs `[n, T, W]`."""
        return self.full_model.vision_model.post_layernorm(blocks)

    @torch.inference_mode()
    def image_embeds(self, vit: torch.Tensor) -> torch.Tensor:
        """Image embeddings `[n, Q, D]` from ViT tokens, on the model's device in its dtype, each query vector
        L2-normalised; no host round trip, so on a GPU the Q-Former queues behind the ViT.

        The Q-Former gets no encoder mask: every ViT token is attended to, and an all-ones mask would make
        transformers check it with `.all()`, a GPU-to-host sync in the middle of the batch.
        """
        m = self.full_model
        vit = vit.to(self.device)
        queries = m.query_tokens.expand(vit.shape[0], -1, -1)
        hidden = m.qformer(query_embeds=queries, encoder_hidden_states=vit).last_hidden_state
        proj = m.vision_projection(hidden.to(m.vision_projection.weight.dtype))
        return torch.nn.functional.normalize(proj.float(), dim=-1)  # in float32: bf16 left norms off by up to 0.5%

    def embed_vit_tokens(self, vit: torch.Tensor) -> np.ndarray:
        """Image embeddings `[n, Q, D] float32` (each query vector L2-normalised) from ViT tokens, on the host."""
        return self.image_embeds(vit).float().cpu().numpy()

    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """pixel_values `[n, 3, S, S]` -> image embeddings `[n, Q, D] float32`, L2-normalised per query."""
        out = [
            self.embed_vit_tokens(self.vit_tokens(pixel_values[s : s + self.batch_size]))
            for s in range(0, len(pixel_values), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.num_query_tokens, self.embed_dim), np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> image embeddings `[n, Q, D] float32`, L2-normalised per query."""
        out = [self.embed_pixels(self.preprocess(images[s : s + self.batch_size])) for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_query_tokens, self.embed_dim), np.float32)

    # ---------------------------------------------------------------- ITM
    @torch.inference_mode()
    def itm_logits(self, vit: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits `[n, 2] float32` for n (image, text) pairs from stored ViT tokens `[n, T, W]`.

        Queries and text go through the Q-Former together, cross-attending to the ViT tokens; the ITM head's
        two logits are averaged over the query positions, as HF's `forward(use_image_text_matching_head=True)`.
        """
        m = self.full_model
        vit = vit.to(self.device)
        n = vit.shape[0]
        queries = m.query_tokens.expand(n, -1, -1)
        q = queries.shape[1]
        mask = torch.cat([torch.ones((n, q), dtype=attention_mask.dtype, device=self.device), attention_mask.to(self.device)], dim=1)
        embeds = m.embeddings(input_ids=input_ids.to(self.device), query_embeds=queries)
        hidden = m.qformer(
            query_embeds=embeds,
            query_length=q,
            attention_mask=mask,
            encoder_hidden_states=vit,  # no encoder mask: all tokens count (see image_embeds)
        ).last_hidden_state
        return m.itm_head(hidden[:, :q, :].to(m.itm_head.weight.dtype)).mean(dim=1).float()

    @torch.inference_mode()
    def match(self, text: str, vit: torch.Tensor, image_embeds: np.ndarray | None = None) -> MatchScores:
        """Score one text against n images given their ViT tokens `[n, T, W]` (embeddings recomputed if absent)."""
        if image_embeds is None:
            image_embeds = np.concatenate(
                [self.embed_vit_tokens(vit[s : s + self.batch_size]) for s in range(0, len(vit), self.batch_size)]
            ) if len(vit) else np.zeros((0, self.num_query_tokens, self.embed_dim), np.float32)
        tokens = self.tokenize([text])
        itc = itc_scores(image_embeds, self._text_embeds(tokens)[0])
        logits = []
        for s in range(0, len(vit), self.batch_size):
            chunk = vit[s : s + self.batch_size]
            n = chunk.shape[0]
            logits.append(self.itm_logits(chunk, tokens["input_ids"].expand(n, -1), tokens["attention_mask"].expand(n, -1)))
        logits_t = torch.cat(logits) if logits else torch.zeros((0, 2))
        prob = torch.softmax(logits_t, dim=-1)[:, 1]
        return MatchScores(itc=itc, itm_logit=logits_t[:, 1].cpu().numpy(), match_probability=prob.cpu().numpy())

    def score_images(self, text: str, images: Sequence[Image.Image]) -> MatchScores:
        """ITC, ITM logit and match probability of `text` against each PIL image (one ViT pass each)."""
        if not images:
            empty = np.zeros((0,), np.float32)
            return MatchScores(empty, empty, empty)
        return self.match(text, *self.encode_images(images))

    def encode_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, np.ndarray]:
        """ViT tokens `[n, T, W]` (model dtype, on the device) and embeddings `[n, Q, D] float32` of PIL images."""
        vits, embeds = [], []
        for s in range(0, len(images), self.batch_size):
            vit = self.vit_tokens(self.preprocess(images[s : s + self.batch_size]))
            vits.append(vit)
            embeds.append(self.embed_vit_tokens(vit))
        return torch.cat(vits), np.concatenate(embeds)


def _text_path_class():
    """HF's `Blip2TextModelWithProjection`, told that a retrieval checkpoint's ViT, vision projection, ITM head
    and query tokens are left out on purpose (otherwise transformers prints them as a load report)."""
    from transformers import Blip2TextModelWithProjection

    class Blip2TextPath(Blip2TextModelWithProjection):
        _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^vision_projection\.", r"^itm_head\.", r"^query_tokens$"]

    return Blip2TextPath


def itc_scores(image_embeds: np.ndarray, text_embed: np.ndarray) -> np.ndarray:
    """BLIP-2 ITC: max over query vectors of the cosine. `[n, Q, D]`, `[D]` -> `[n] float32`."""
    if len(image_embeds) == 0:
        return np.zeros((0,), np.float32)
    return (image_embeds @ text_embed).max(axis=1).astype(np.float32)
