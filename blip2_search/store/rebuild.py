"""Keeping the FAISS file in step with the metadata store, which is the source of truth."""

from __future__ import annotations

import os
from dataclasses import dataclass

from blip2_search.errors import LibraryError
from blip2_search.store.metadata import MetadataStore
from blip2_search.store.vectors import FaissVectorStore, VectorStore

VECTORS_FILENAME = "vectors.faiss"
"""Name of the FAISS file inside a library folder (its sidecar adds ``.json``)."""


def rebuild(metadata: MetadataStore, vector_store: VectorStore, *, chunk_size: int = 1024) -> int:
    """Empty ``vector_store`` and add every indexed image's vectors from one consistent snapshot
    of ``metadata``, ``chunk_size`` images at a time; return that snapshot's vectors generation."""
    vector_store.reset()
    with metadata.live_vectors(chunk_size) as live:
        if live.count:
            found = (live.num_query_tokens, live.dim)
            expected = (vector_store.num_query_tokens, vector_store.dim)
            if found != expected:
                raise LibraryError(
                    f"library {metadata.location} stores vectors of shape {found} but the vector "
                    f"store expects {expected}; open it with the library's embedder"
                )
        for chunk in live.chunks():
            vector_store.add(chunk.ids, chunk.vectors)
        return live.generation


@dataclass(frozen=True)
class OpenedVectors:
    """A current vector store: ``rebuilt_because`` is None when it was loaded from its file."""

    store: FaissVectorStore
    generation: int
    rebuilt_because: str | None


def open_vectors(
    metadata: MetadataStore,
    index_path: str | os.PathLike[str],
    *,
    save: bool = True,
    use_gpu: bool | None = None,
) -> OpenedVectors:
    """Load the FAISS file if it matches the library's vectors generation, else rebuild it from
    ``metadata`` (and, with ``save``, write it back atomically)."""
    info = metadata.info()
    if info.embedder is None:
        raise LibraryError(
            f"library {metadata.location} has no embedder recorded, so it has no vectors; index photos first"
        )
    q, d = info.embedder.num_query_tokens, info.embedder.dim
    loaded = FaissVectorStore.load(
        index_path, expected_generation=info.vectors_generation, num_query_tokens=q, dim=d, use_gpu=use_gpu
    )
    if loaded.store is not None:
        return OpenedVectors(loaded.store, info.vectors_generation, None)
    store = FaissVectorStore(q, d, use_gpu=use_gpu)
    generation = rebuild(metadata, store)
    if save:
        store.save(index_path, generation=generation)
    return OpenedVectors(store, generation, loaded.reason)
