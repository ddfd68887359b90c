"""One ViT pass for the embedder and the captioner when their ViT blocks are byte-identical.

BLIP-2 freezes its image encoder: the retrieval (ITM) checkpoints and the generation checkpoints
start from the same EVA ViT-g, and only the Q-Former side differs (each keeps its own
``post_layernorm``). When the blocks really are identical (and both read the same pixels), the
blocks run once per image, each model applies its own ``post_layernorm``, and the captioner uses
the embedder's copy of the blocks, so the weights sit in memory once. Anything that differs (a
fine-tuned ViT such as ``blip2-itm-vit-g-coco``, another input size, dtype or device, a vision config that
computes differently with the same tensors: heads, eps, activation) keeps two passes.
"""

from __future__ import annotations

import torch

from .captioner import Blip2Captioner
from .encoder import Blip2Encoder

__all__ = ["same_vit_settings", "share_vit", "vit_blocks_identical"]


def _same_pixels(encoder: Blip2Encoder, captioner: Blip2Captioner) -> bool:
    a, b = encoder.image_processor, captioner.image_processor
    keys = ("image_mean", "image_std", "rescale_factor", "resample", "do_normalize", "do_rescale")
    return encoder.image_size == captioner.image_size and all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


_VIT_SETTINGS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps",
                 "patch_size", "image_size", "qkv_bias")
"""Vision config fields that change a ViT's maths with the same tensors (heads split them, eps and act apply them)."""


def same_vit_settings(a, b) -> bool:
    """True when two vision configs agree on every field that changes what equal weights compute."""
    return all(getattr(a, name, None) == getattr(b, name, None) for name in _VIT_SETTINGS)


def vit_blocks_identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two ViTs' embeddings and encoder blocks hold equal tensors (post_layernorm is not compared)."""
    parts_a = {f"{part}.{name}": t for part in ("embeddings", "encoder") for name, t in getattr(a, part).state_dict().items()}
    parts_b = {f"{part}.{name}": t for part in ("embeddings", "encoder") for name, t in getattr(b, part).state_dict().items()}
    if parts_a.keys() != parts_b.keys():
        return False
    return all(
        parts_a[k].shape == parts_b[k].shape and parts_a[k].dtype == parts_b[k].dtype and parts_a[k].device == parts_b[k].device
        and torch.equal(parts_a[k], parts_b[k])
        for k in parts_a
    )


def share_vit(encoder: Blip2Encoder, captioner: Blip2Captioner | None) -> bool:
    """Check whether the two can share one ViT pass; if so, point the captioner at the embedder's blocks.

    Loads both models (indexing with captions needs both anyway). Returns True when shared.
    """
    if captioner is None or not _same_pixels(encoder, captioner):
        return False
    mine, theirs = encoder.full_model.vision_model, captioner.model.vision_model
    if not same_vit_settings(mine.config, theirs.config):  # the captioner would run the embedder's blocks its way
        return False
    if mine.embeddings is theirs.embeddings and mine.encoder is theirs.encoder:
        return True
    if not vit_blocks_identical(mine, theirs):
        return False
    theirs.embeddings, theirs.encoder = mine.embeddings, mine.encoder  # one copy of the weights
    return True
