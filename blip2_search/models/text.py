"""Text normalisation exactly as LAVIS `pre_caption` does it before BLIP-2 tokenises a caption."""

from __future__ import annotations

import re

MAX_WORDS = 50
MAX_TOKENS = 35  # the LAVIS evaluation protocol's text length (ITM training used 32)

_PUNCT = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = MAX_WORDS) -> str:
    """Lowercase, replace each of .!"()*#:;~ with a space, collapse spaces, strip, keep `max_words` words."""
    text = _PUNCT.sub(" ", text.lower())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
