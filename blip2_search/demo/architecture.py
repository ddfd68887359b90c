"""Sizes, configs, construction and saving of the two demo models (HF BLIP-2 classes, tiny dims).

Both models share one ViT (64 px, patch 8, 4 blocks, width 96): the captioner's embeddings and encoder
blocks are a byte-identical copy of the ITM model's; only ``post_layernorm`` differs, as in real BLIP-2
pretrain checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    GenerationConfig,
    OPTConfig,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from .vocab import IMAGE_TOKEN, MAX_TEXT_LENGTH, bert_tokenizer, caption_tokenizer

__all__ = [
    "IMAGE_SIZE",
    "MAX_NEW_TOKENS",
    "NUM_QUERY_TOKENS",
    "copy_query_path",
    "count_parameters",
    "copy_vision_tower",
    "image_processor",
    "new_captioner",
    "new_itm_model",
    "save_captioner",
    "save_itm_model",
    "sizes_mb",
]

IMAGE_SIZE = 64
PATCH_SIZE = 8
VISION_WIDTH = 96
QFORMER_WIDTH = 128
LM_WIDTH = 128
NUM_QUERY_TOKENS = 32
EMBED_DIM = 256  # image_text_hidden_size, as in the real ITM checkpoints
MAX_NEW_TOKENS = 10  # a caption is 6 words + </s>


def image_processor() -> BlipImageProcessorPil:
    """BLIP image processor: bicubic resize straight to 64 x 64, rescale 1/255, CLIP mean/std."""
    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _vision_config() -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=VISION_WIDTH,
        intermediate_size=2 * VISION_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        attention_dropout=0.0,
        initializer_range=0.02,
    )


def _qformer_config(*, text_input: bool, vocab_size: int) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        vocab_size=vocab_size,
        hidden_size=QFORMER_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * QFORMER_WIDTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=MAX_TEXT_LENGTH,
        cross_attention_frequency=1,
        encoder_hidden_size=VISION_WIDTH,
        use_qformer_text_input=text_input,
    )


def _init_fresh(model, seed_generator: torch.Generator) -> None:
    """Initialisation HF leaves to pre-trained weights: query tokens (HF zeros them, which would keep all
    32 queries identical forever) and 2-D sin-cos ViT position embeddings (HF's std 0.02 is so small
    next to the patch embeddings that position and shape are learned late)."""
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02, generator=seed_generator)
        emb = model.vision_model.embeddings
        grid = IMAGE_SIZE // PATCH_SIZE
        emb.position_embedding.zero_()
        emb.position_embedding[0, 1:] = 0.4 * _sincos_2d(grid, VISION_WIDTH)


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] 2-D sine-cosine position code (rows then columns), values in [-1, 1]."""
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")

    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        freq = 1.0 / (10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d // 2)))
        angle = pos.reshape(-1, 1) * freq.reshape(1, -1)
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([one_axis(ys, dim // 2), one_axis(xs, dim // 2)], dim=1)


def new_itm_model(seed: int) -> Blip2ForImageTextRetrieval:
    """A freshly initialised ITM model (``image_token_index`` None: text goes in without image tokens)."""
    tok = bert_tokenizer()
    config = Blip2Config(
        vision_config=_vision_config().to_dict(),
        qformer_config=_qformer_config(text_input=True, vocab_size=len(tok)).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=EMBED_DIM,
    )
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config)
    _init_fresh(model, torch.Generator().manual_seed(seed + 1))
    return model


def new_captioner(seed: int) -> Blip2ForConditionalGeneration:
    """A freshly initialised captioner with a tiny OPT (2 blocks, width 128) and the scene LM vocabulary."""
    tok = caption_tokenizer()
    text_config = OPTConfig(
        vocab_size=len(tok),
        hidden_size=LM_WIDTH,
        num_hidden_layers=2,
        ffn_dim=2 * LM_WIDTH,
        num_attention_heads=4,
        max_position_embeddings=MAX_TEXT_LENGTH,
        word_embed_proj_dim=LM_WIDTH,
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    config = Blip2Config(
        vision_config=_vision_config().to_dict(),
        qformer_config=_qformer_config(text_input=False, vocab_size=len(tok)).to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=EMBED_DIM,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    _init_fresh(model, torch.Generator().manual_seed(seed + 1))
    model.generation_config = _generation_config(tok)
    return model


def _generation_config(tok) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
    )


def copy_vision_tower(src: Blip2ForImageTextRetrieval, dst: Blip2ForConditionalGeneration) -> None:
    """Copy the whole ViT (embeddings, blocks, post_layernorm) from ``src`` into ``dst``."""
    dst.vision_model.load_state_dict(src.vision_model.state_dict())


def copy_query_path(src: Blip2ForImageTextRetrieval, dst: Blip2ForConditionalGeneration) -> None:
    """Start the captioner's Q-Former from the ITM one (BLIP-2 stage 2 starts from stage 1).

    The text feed-forward layers of ``src`` have no counterpart in ``dst`` and are left out.
    """
    missing, unexpected = dst.qformer.load_state_dict(src.qformer.state_dict(), strict=False)
    if missing or any(".intermediate." not in k and ".output." not in k for k in unexpected):
        raise RuntimeError(f"Q-Former layouts differ: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        dst.query_tokens.copy_(src.query_tokens)


def save_itm_model(model: Blip2ForImageTextRetrieval, directory: Path) -> None:
    """Save weights (safetensors), config, BERT tokenizer, processor and image processor configs."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor = Blip2Processor(image_processor(), bert_tokenizer(), num_query_tokens=None)
    processor.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)  # preprocessor_config.json for older loaders


def save_captioner(model: Blip2ForConditionalGeneration, directory: Path) -> None:
    """Save weights, config, generation config, LM tokenizer, processor and image processor configs."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor = Blip2Processor(image_processor(), caption_tokenizer(), num_query_tokens=NUM_QUERY_TOKENS)
    processor.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def sizes_mb(directory: Path) -> float:
    """Size of all files in ``directory`` in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 1e6

