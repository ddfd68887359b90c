"""blip2-search: find photos by describing them, with BLIP-2 embeddings, FAISS and ITM reranking.

The model API is imported on first use, so `import blip2_search.store` (or the CLI's start) does not
pay for importing torch and transformers. `Library` (with its typed results: `SearchResult` of `Hit`s,
`IndexReport`, `Progress`, `LibraryStatus`, ...) and the stateless `rerank` and `caption` are here, as are
the exceptions every call raises.
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
    "DuplicatePhoto": "library", "FailureRecord": "library", "Library": "library", "LibraryStatus": "library", "PruneReport": "library",
    "Hit": "search.results", "SearchResult": "search.results",
    "IndexReport": "indexing.pipeline", "Progress": "indexing.pipeline",
    "CaptionSettings": "models.captioner",
}

__all__ = [
    "Blip2SearchError",
    "CaptionResult",
    "CaptionSettings",
    "Captions",
    "DuplicatePhoto",
    "FailureRecord",
    "Hit",
    "ImageDecodeError",
    "ImageFailure",
    "IndexInterrupted",
    "IndexReport",
    "InvalidInputError",
    "Library",
    "LibraryError",
    "LibraryStatus",
    "ModelLoadError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "Progress",
    "PruneReport",
    "Ranking",
    "RerankHit",
    "SearchResult",
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
