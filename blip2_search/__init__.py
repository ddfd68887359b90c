"""blip2-search: find photos by describing them, with BLIP-2 embeddings, FAISS and ITM reranking.

The model API is imported on first use, so `import blip2_search.store` (or the CLI's start) does not
pay for importing torch and transformers.
"""

from .errors import (
    Blip2SearchError,
    ImageDecodeError,
    IndexInterrupted,
    InvalidInputError,
    LibraryError,
    ModelLoadError,
    ModelMismatchError,
    ModelNotFoundError,
)

__version__ = "0.1.0"

_LAZY = {
    "CaptionResult": "api", "Captions": "api", "ImageFailure": "api", "Ranking": "api", "RerankHit": "api",
    "caption": "api", "rerank": "api",
}

__all__ = [
    "Blip2SearchError",
    "CaptionResult",
    "Captions",
    "ImageDecodeError",
    "ImageFailure",
    "IndexInterrupted",
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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blip2_search' has no attribute {name!r}")
