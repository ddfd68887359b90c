"""Tiny random BLIP-2 checkpoints built in the tests: real HF classes, real files, seconds to make."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a an the photo of cat dog woman beach red green blue circle square triangle on left right top bottom and with sitting in".split()


def _write_bert_tokenizer(path: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    return len(vocab)


def _image_processor(image_size: int):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size})


def tiny_blip2_config(vocab_size: int, image_size: int = 32, *, text_config=None):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=8)
    qformer = Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, use_qformer_text_input=True, encoder_hidden_size=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    text = text_config or OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(), num_query_tokens=32, image_text_hidden_size=256)


def make_tiny_itm(path: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random `Blip2ForImageTextRetrieval` with a BERT tokenizer and BLIP image processor to `path`."""
    from transformers import Blip2ForImageTextRetrieval

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_bert_tokenizer(path)
    torch.manual_seed(seed)
    config = tiny_blip2_config(vocab_size, image_size)
    model = Blip2ForImageTextRetrieval(config).eval()
    # HF's init (ViT range 1e-10, Q-Former 0.02, zero query tokens) makes every image score alike;
    # fan-in scaled weights make scores depend on the image and text, so equality tests can fail.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name.lower() or "LayerNorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0.0, 0.1)
            elif p.dim() >= 2:
                p.normal_(0.0, 1.5 / p[0].numel() ** 0.5)
            else:
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    _image_processor(image_size).save_pretrained(path)
    return path


def _write_word_tokenizer(path: Path) -> dict[str, int]:
    """A whitespace word-level LM tokenizer: <pad>=0, <s>=1 (BOS), </s>=2 (EOS), <unk>=3, <image>=4, words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    from tokenizers.processors import TemplateProcessing

    fast.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast.save_pretrained(path)
    return vocab


def make_tiny_captioner(path: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random `Blip2ForConditionalGeneration` (tiny OPT) with its tokenizer and image processor."""
    from transformers import OPTConfig

    path.mkdir(parents=True, exist_ok=True)
    vocab = _write_word_tokenizer(path)
    text = OPTConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _save_random_captioner(path, text, vocab["<image>"], seed=seed, image_size=image_size)


def make_tiny_t5_captioner(path: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random `Blip2ForConditionalGeneration` with a tiny T5 (as blip2-flan-t5-xl) and a T5-style tokenizer:
    no BOS, every text ends with </s>; <pad>=0 starts the decoder, </s>=1, <unk>=2, <image>=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast, T5Config

    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<image>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.backend_tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast.save_pretrained(path)
    text = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    return _save_random_captioner(path, text, vocab["<image>"], seed=seed, image_size=image_size)


def _save_random_captioner(path: Path, text_config, image_token_index: int, *, seed: int, image_size: int) -> Path:
    """Save a random `Blip2ForConditionalGeneration` over `text_config` (fan-in scaled weights, so captions differ by
    image) with the BLIP image processor, beside the tokenizer already in `path`."""
    from transformers import Blip2ForConditionalGeneration

    config = tiny_blip2_config(len(WORDS) + 8, image_size, text_config=text_config)
    config.image_token_index = image_token_index
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.5 / p[0].numel() ** 0.5)
    model.save_pretrained(path)
    _image_processor(image_size).save_pretrained(path)
    return path
