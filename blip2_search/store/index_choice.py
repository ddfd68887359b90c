"""Which FAISS index a library should use: a pure function of its size and a memory budget."""

from __future__ import annotations

from blip2_search.errors import InvalidInputError

EXACT_FACTORY = "IDMap2,Flat"
"""Exact inner-product index with removable ids; the only one ``FaissVectorStore`` implements."""

# Per-vector id bookkeeping: IDMap2 keeps an id array (8 B) and a reverse hash map (~40 B).
_ID_MAP_BYTES = {"IDMap2": 48, "IDMap": 8}


def choose_index(n_images: int, num_query_tokens: int, dim: int, memory_budget_bytes: int) -> str:
    """The FAISS factory string for a library of this size within a memory budget.

    Exact ``IDMap2,Flat`` (4 D bytes + ~48 bytes id map per vector) when it fits; otherwise
    approximate, smaller ones: ``IDMap,SQ8`` (D bytes) or ``IDMap,PQ{D/8}`` (D/8 bytes), which
    need training and are NOT implemented by ``FaissVectorStore``. Raises InvalidInputError
    when even PQ does not fit.
    """
    if min(n_images, num_query_tokens, dim) < 0 or num_query_tokens == 0 or dim == 0:
        raise InvalidInputError(
            f"choose_index got n_images={n_images}, Q={num_query_tokens}, D={dim}; "
            "pass an image count >= 0 and dims > 0"
        )
    n_vectors = n_images * num_query_tokens
    pq_m = max(1, dim // 8)
    options = (
        (EXACT_FACTORY, 4 * dim + _ID_MAP_BYTES["IDMap2"]),
        ("IDMap,SQ8", dim + _ID_MAP_BYTES["IDMap"]),
        (f"IDMap,PQ{pq_m}", pq_m + _ID_MAP_BYTES["IDMap"]),
    )
    for factory, bytes_per_vector in options:
        if n_vectors * bytes_per_vector <= memory_budget_bytes:
            return factory
    needed = n_vectors * options[-1][1]
    raise InvalidInputError(
        f"a vector index for {n_images} images needs at least {needed / 2**30:.1f} GiB, the budget "
        f"is {memory_budget_bytes / 2**30:.1f} GiB; raise the memory budget"
    )
