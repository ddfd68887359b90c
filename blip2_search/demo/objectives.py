"""Forward paths used in training, each the same computation as an HF forward, split at the ViT.

Training caches the frozen ViT's tokens once, so the Q-Former stages start from them instead of pixels.
Every function here calls the HF submodules in the order the HF ``forward`` does; ``tests/
test_demo_models.py`` checks them against ``Blip2ForImageTextRetrieval.forward`` and
``Blip2ForConditionalGeneration.forward`` on the shipped models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

__all__ = [
    "caption_lm_inputs",
    "caption_loss",
    "itc_image_embeds",
    "itc_text_embeds",
    "itm_logits",
    "vit_tokens",
]


def vit_tokens(vision_model, pixel_values: torch.Tensor) -> torch.Tensor:
    """ViT token states BEFORE ``post_layernorm``: [B, 1 + patches, vision width] float32.

    ``vision_model.post_layernorm(vit_tokens(...))`` equals ``vision_model(pixel_values).last_hidden_state``.
    """
    hidden = vision_model.embeddings(pixel_values)
    return vision_model.encoder(inputs_embeds=hidden).last_hidden_state


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:-1], dtype=torch.long, device=x.device)


def itc_image_embeds(model, image_embeds: torch.Tensor) -> torch.Tensor:
    """Query embeddings [B, 32, D], L2-normalised per query, from post-LN ViT states [B, T, W]."""
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    out = model.qformer(
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=_ones(image_embeds),
        return_dict=True,
    ).last_hidden_state
    return F.normalize(model.vision_projection(out), dim=-1)


def itc_text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Text embeddings [N, D] (the [CLS] token), L2-normalised."""
    embeds = model.embeddings(input_ids=input_ids)
    out = model.qformer(
        query_embeds=embeds, query_length=0, attention_mask=attention_mask, return_dict=True
    ).last_hidden_state
    return F.normalize(model.text_projection(out[:, 0, :]), dim=-1)


def itm_logits(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ITM logits [B, 2] (index 1 = match), averaged over the query outputs, for pairs (image b, text b).

    Assumes ``config.image_token_index`` is None (text without image tokens), as in the ITM model.
    """
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    mask = torch.cat([_ones(query_tokens), attention_mask], dim=1)
    embeds = model.embeddings(input_ids=input_ids, query_embeds=query_tokens)
    out = model.qformer(
        query_embeds=embeds,
        query_length=query_tokens.shape[1],
        attention_mask=mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=_ones(image_embeds),
        return_dict=True,
    ).last_hidden_state
    return model.itm_head(out[:, : query_tokens.shape[1], :]).mean(dim=1)


def caption_lm_inputs(captioner, vit_pre_ln: torch.Tensor) -> torch.Tensor:
    """Language-model inputs [B, 32, LM width] from pre-LN ViT tokens (the captioner's own post_layernorm)."""
    image_embeds = captioner.vision_model.post_layernorm(vit_pre_ln)
    query_tokens = captioner.query_tokens.expand(image_embeds.shape[0], -1, -1)
    out = captioner.qformer(
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=_ones(image_embeds),
        return_dict=True,
    ).last_hidden_state
    return captioner.language_projection(out)


def caption_loss(captioner, vit_pre_ln: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss of ``Blip2ForConditionalGeneration.forward`` with the image part precomputed.

    ``input_ids`` hold 32 ``<image>`` tokens, ``</s>``, the caption and ``</s>``; ``labels`` equal them with
    -100 where no prediction is wanted.
    """
    lm_inputs = caption_lm_inputs(captioner, vit_pre_ln)
    image = BaseModelOutputWithVisionQformerOutputs(pooler_output=lm_inputs, qformer_outputs=None, vision_outputs=None)
    out = captioner(
        pixel_values=None,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        labels=labels,
        mm_encoder_outputs={"image": image},
    )
    return out.loss
