"""Storage of a library: metadata (SQLAlchemy; SQLite by default) and vectors (FAISS).

A library folder holds ``metadata.sqlite`` (images, embeddings, library facts; the source of
truth) and a search index rebuilt from it when its vectors generation is behind, described by
``vectors.faiss.json``: exact (``FaissVectorStore``, rows of vectors in ``vectors.*.f32`` that each
`index` run appends to: ``exact_files``) or, for libraries too large for RAM, compact
(``CompactVectorStore``: PQ codes in ``vectors.faiss``, candidates rescored exactly from the database).
Typical use::

    store = open_metadata(folder, create=True, embedder=embedder_info)
    store.upsert_indexed([...])
    vectors = open_vectors(store, folder / VECTORS_FILENAME).store
    ids, scores = vectors.search(text_embeddings, k=10)
    records = store.get_records(ids[0])
"""

from blip2_search.store.compact import CompactVectorStore
from blip2_search.store.engine import METADATA_FILENAME
from blip2_search.store.index_choice import (
    EXACT_FACTORY,
    VECTOR_INDEX_MODES,
    choose_index,
)
from blip2_search.store.metadata import LiveVectors, MetadataStore, open_metadata
from blip2_search.store.rebuild import (
    VECTORS_FILENAME,
    OpenedVectors,
    open_vectors,
    rebuild,
)
from blip2_search.store.records import (
    STATUS_DELETED,
    STATUS_FAILED,
    STATUS_INDEXED,
    STATUS_PENDING,
    CaptionUpdate,
    EmbedderInfo,
    EmbeddingRecord,
    FailedFile,
    Failure,
    ImageRecord,
    IndexedImage,
    KnownFile,
    LibraryInfo,
    ModelRef,
    StatusCounts,
    VectorChunk,
)
from blip2_search.store.rescoring import CompactParams
from blip2_search.store.vectors import (
    GPU_MAX_K,
    FaissVectorStore,
    LoadResult,
    VectorStore,
)

__all__ = [
    "EXACT_FACTORY",
    "GPU_MAX_K",
    "METADATA_FILENAME",
    "STATUS_DELETED",
    "STATUS_FAILED",
    "STATUS_INDEXED",
    "STATUS_PENDING",
    "VECTORS_FILENAME",
    "VECTOR_INDEX_MODES",
    "CaptionUpdate",
    "CompactParams",
    "CompactVectorStore",
    "EmbedderInfo",
    "EmbeddingRecord",
    "FailedFile",
    "Failure",
    "FaissVectorStore",
    "ImageRecord",
    "IndexedImage",
    "KnownFile",
    "LibraryInfo",
    "LiveVectors",
    "LoadResult",
    "MetadataStore",
    "ModelRef",
    "OpenedVectors",
    "StatusCounts",
    "VectorChunk",
    "VectorStore",
    "choose_index",
    "open_metadata",
    "open_vectors",
    "rebuild",
]
