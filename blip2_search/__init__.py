"""blip2-search: find photos by describing them, with BLIP-2 embeddings, FAISS and ITM reranking."""

from .api import CaptionResult, Captions, ImageFailure, Ranking, RerankHit, caption, rerank
from .errors import (
    Blip2SearchError,
    ImageDecodeError,
    InvalidInputError,
    LibraryError,
    ModelLoadError,
    ModelMismatchError,
    ModelNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "Blip2SearchError",
    "CaptionResult",
    "Captions",
    "ImageDecodeError",
    "ImageFailure",
    "InvalidInputError",
    "LibraryError",
    "ModelLoadError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "Ranking",
    "RerankHit",
    "caption",
    "rerank",
]
