"""Tokenizers of the demo models, built from the scene vocabulary.

- ITM model: a BERT WordPiece tokenizer (lower-case, ``[CLS] ... [SEP]``), ids ``[PAD]=0, [UNK]=1, [CLS]=2,
  [SEP]=3, [MASK]=4``, then the 16 scene words, then ``[DEC]`` (its bos token, as in BLIP-2's BERT
  tokenizer) and ``<image>`` (so that ``Blip2Processor`` finds its image token and adds nothing that
  would lie outside the model's embedding table). The text embedding is the state of token 0, ``[CLS]``.
- Captioner: a word-level tokenizer in OPT's layout, ``<s>=0, <pad>=1, </s>=2, <unk>=3``, the scene
  words, ``<image>``; ``</s>`` is both bos (prefixed to every text, as OPT's tokenizer does) and eos
  (it ends generation). Decoding joins words with single spaces.

Words outside the vocabulary become the unknown token; punctuation is not in the vocabulary.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AddedToken, BertTokenizer, PreTrainedTokenizerFast

from .scenes import COLORS, POSITIONS, SHAPES

__all__ = ["IMAGE_TOKEN", "MAX_TEXT_LENGTH", "WORDS", "bert_tokenizer", "caption_tokenizer"]

WORDS: tuple[str, ...] = ("a", "on", "the", *COLORS, *SHAPES, *POSITIONS)
IMAGE_TOKEN = "<image>"
MAX_TEXT_LENGTH = 64  # tokenizer model_max_length; the Q-Former and OPT have this many positions


def _add_image_token(tok) -> None:
    # The same call Blip2Processor makes; the token is already in the vocabulary, so its id stays put.
    # (No `image_token` attribute: Blip2Processor in transformers 5.24 needs an AddedToken there, not a str.)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)


def bert_tokenizer() -> BertTokenizer:
    """The ITM model's tokenizer (BERT-style WordPiece over the scene words)."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    for word in (*WORDS, "[DEC]", IMAGE_TOKEN):
        vocab[word] = len(vocab)
    tok = BertTokenizer(
        vocab=vocab,
        do_lower_case=True,
        model_max_length=MAX_TEXT_LENGTH,
        bos_token="[DEC]",
    )
    _add_image_token(tok)
    if len(tok) != len(vocab):
        raise RuntimeError(f"BERT tokenizer grew to {len(tok)} tokens, expected {len(vocab)}")
    return tok


def caption_tokenizer() -> PreTrainedTokenizerFast:
    """The captioner's language-model tokenizer (word level, OPT's special-token layout)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for word in (*WORDS, IMAGE_TOKEN):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", vocab["</s>"])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TEXT_LENGTH,
        padding_side="left",  # batched generation with prompts needs left padding
    )
    _add_image_token(tok)
    if len(tok) != len(vocab):
        raise RuntimeError(f"caption tokenizer grew to {len(tok)} tokens, expected {len(vocab)}")
    return tok
