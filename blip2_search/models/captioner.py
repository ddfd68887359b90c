"""Captions from a `Blip2ForConditionalGeneration` checkpoint, batched; greedy by default, beam optional."""

from __future__ import annotations

import copy
import numbers

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from ..errors import InvalidInputError, ModelLoadError
from .checkpoint import Checkpoint
from .loading import DEFAULT_CAPTIONER, ModelSource, check_captioner_config, resolve_model
from .policy import Placement, detect_placement


@dataclass(frozen=True)
class CaptionSettings:
    """Decoding settings. LAVIS used beam 5; greedy (beam 1) costs ~2.4x less and is the default here."""

    num_beams: int = 1
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    prompt: str = ""

    def __post_init__(self):
        for name in ("num_beams", "max_new_tokens", "min_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InvalidInputError(f"caption setting {name}={value!r} is not a whole number; pass e.g. {name}=5")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.prompt, str):
            raise InvalidInputError(f"caption prompt {self.prompt!r} is not text; pass e.g. prompt='a photo of'")
        if self.num_beams < 1:
            raise InvalidInputError("{argument:{given}} must be >= 1; pass {argument:1} for greedy decoding", argument="num_beams", given=self.num_beams)
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidInputError(f"caption length limits min={self.min_new_tokens}, max={self.max_new_tokens} are inconsistent; use 1 <= min <= max")


class Blip2Captioner(Checkpoint):
    """Writes captions with BLIP-2's generation model; weights load on first use."""

    role = "captioner"

    def __init__(self, source: ModelSource, placement: Placement, *, batch_size: int = 8, settings: CaptionSettings | None = None):
        config = check_captioner_config(source)
        super().__init__(source, placement)
        self.batch_size = batch_size
        self.settings = settings or CaptionSettings()
        self.num_query_tokens = int(config.get("num_query_tokens", 32))
        self._model = None
        self._tokenizer = None

    @classmethod
    def load(cls, name: str = DEFAULT_CAPTIONER, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8, settings: CaptionSettings | None = None) -> "Blip2Captioner":
        """Resolve `name` and choose device/dtype (Flan-T5 never runs in fp16)."""
        source = resolve_model(name, role="captioner")
        text_type = (source.config().get("text_config") or {}).get("model_type", "")
        placement = detect_placement(device, dtype, is_t5=text_type == "t5")
        return cls(source, placement, batch_size=batch_size, settings=settings)

    @property
    def tokenizer(self):
        return self._load_once("_tokenizer", self._load_tokenizer)

    @property
    def model(self):
        return self._load_once("_model", self._load_model)

    def _load_model(self):
        from transformers import Blip2ForConditionalGeneration

        model = self._from_pretrained(Blip2ForConditionalGeneration)
        if model.config.image_token_index is None:
            raise ModelLoadError(f"captioner {self.name!r} has no image_token_index in its config, which transformers 5 needs to place the image queries; use a checkpoint converted for transformers >= 4.47")
        return model

    def with_settings(self, settings: CaptionSettings) -> "Blip2Captioner":
        """This captioner with other decoding settings, sharing its weights (loaded now if not yet)."""
        other = copy.copy(self)
        other.settings = settings
        other._model, other._tokenizer = self.model, self.tokenizer
        return other

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per PIL image, in order."""
        out: list[str] = []
        for s in range(0, len(images), self.batch_size):
            out.extend(self.caption_pixels(self.preprocess(images[s : s + self.batch_size])))
        return out

    @torch.inference_mode()
    def caption_pixels(self, pixel_values: torch.Tensor, settings: CaptionSettings | None = None) -> list[str]:
        """pixel_values `[n, 3, S, S]` -> n captions (stripped; the prompt is not repeated), decoded with
        `settings` (default: this captioner's)."""
        if len(pixel_values) == 0:
            return []
        m = self.model
        n = pixel_values.shape[0]
        st = settings or self.settings
        input_ids = self._prompt_ids(n, st)
        generated = m.generate(
            pixel_values=pixel_values.to(self.placement.device, self.placement.torch_dtype),
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=st.num_beams,
            do_sample=False,
            max_new_tokens=st.max_new_tokens,
            min_new_tokens=st.min_new_tokens,
        )
        return self._decode(generated, input_ids)

    @torch.inference_mode()
    def caption_vit(self, blocks: torch.Tensor) -> list[str]:
        """Captions from ViT block outputs `[n, T, W]` (before post_layernorm), e.g. shared with the embedder.

        The same steps as HF's `Blip2ForConditionalGeneration.generate` after its ViT: this model's
        post_layernorm, Q-Former, language projection into the image placeholders, then the LM's generate.
        Equal to `caption_pixels` when the blocks come from identical ViT weights (tested).
        """
        if len(blocks) == 0:
            return []
        m = self.model
        n = blocks.shape[0]
        image_embeds = m.vision_model.post_layernorm(blocks.to(self.placement.device, m.vision_model.post_layernorm.weight.dtype))
        ones = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_output = m.qformer(
            query_embeds=m.query_tokens.expand(n, -1, -1), encoder_hidden_states=image_embeds, encoder_attention_mask=ones
        ).last_hidden_state
        language_inputs = m.language_projection(query_output.to(image_embeds.dtype))
        input_ids = self._prompt_ids(n, self.settings)
        inputs_embeds = m.get_input_embeddings()(input_ids)
        image_slots = (input_ids == m.config.image_token_index).unsqueeze(-1)
        inputs_embeds = inputs_embeds.masked_scatter(image_slots, language_inputs.to(inputs_embeds.dtype))
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": torch.ones_like(input_ids)}
        if not m.language_model.config.is_encoder_decoder:
            inputs["input_ids"] = input_ids
        st = self.settings
        generated = m.language_model.generate(
            **inputs, num_beams=st.num_beams, do_sample=False, max_new_tokens=st.max_new_tokens, min_new_tokens=st.min_new_tokens
        )
        return self._decode(generated, input_ids)

    def _decode(self, generated: torch.Tensor, input_ids: torch.Tensor) -> list[str]:
        if not self.model.config.use_decoder_only_language_model:
            new_tokens = generated
        else:  # decoder-only LMs echo the image tokens and the prompt before the new tokens
            new_tokens = generated[:, input_ids.shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def _prompt_ids(self, n: int, settings: CaptionSettings) -> torch.Tensor:
        """`[n, Q + len(prompt ids)]`: Q image placeholders, then the tokenised prompt (equal rows: no padding).

        Decoder-only LMs (OPT) start the text with BOS, as HF's own no-prompt path does; T5 encodes the prompt
        as its tokenizer makes it (ending with EOS). Raises InvalidInputError when a decoder-only LM has fewer
        positions than the image, the prompt and `max_new_tokens` need.
        """
        m = self.model
        # split_special_tokens: a prompt's "<image>" is text; as the image token it made more image slots than queries
        prompt_ids = list(self.tokenizer(settings.prompt, add_special_tokens=True, split_special_tokens=True)["input_ids"])
        bos = getattr(m.config.text_config, "bos_token_id", None)  # T5 configs have none in transformers 5
        decoder_only = m.config.use_decoder_only_language_model
        if decoder_only and bos is not None and prompt_ids[:1] != [bos]:
            prompt_ids = [bos] + prompt_ids
        row = [m.config.image_token_index] * self.num_query_tokens + prompt_ids
        limit = getattr(m.config.text_config, "max_position_embeddings", None)  # T5's positions are relative: no limit
        read = len(row) + settings.max_new_tokens - 1  # the last new token is never read back
        if decoder_only and limit is not None and read > limit:  # past it OPT fails with an IndexError
            starts = prompt_ids[:1] == [bos]
            words = len(prompt_ids) - starts  # the prompt's own tokens, without BOS
            fits = limit - len(row) + 1  # the most new tokens this prompt leaves room for
            fix = ("pass {argument:{fits}} or fewer" + (", or a shorter prompt" if words else "") if fits >= 1 else
                   "shorten the prompt to at most {room} tokens (with {argument:1})")
            raise InvalidInputError("captioner {name!r} reads at most {limit} positions, but its {queries} image tokens, {bos}a prompt of "
                                    "{words} token{s} and {argument:{given}} need {read}; " + fix, argument="max_new_tokens",
                                    name=self.name, limit=limit, queries=self.num_query_tokens, bos="BOS, " if starts else "", words=words,
                                    s="s" if words != 1 else "", given=settings.max_new_tokens, read=read, fits=fits,
                                    room=max(words - (1 - fits), 0))
        return torch.tensor([row] * n, dtype=torch.long, device=self.placement.device)
