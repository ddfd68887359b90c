"""Which vector index a library uses: pure functions of its size, its dims and a memory budget.

Two kinds exist. ``exact``: every float32 vector in RAM (``IDMap2,Flat``), about 34 KB an image
for BLIP-2 (32 x 256). ``compact``: a FAISS IVF index of 4-bit product-quantisation codes (fast
scan) over the individual query vectors, D / 8 bytes a vector plus its 8-byte id, about 1.3 KB an
image; candidates found there are rescored exactly from the full vectors kept on disk (see
``compact.py``). ``auto`` stays exact until the exact index would outgrow the memory budget.
"""

from __future__ import annotations

import math

from blip2_search.errors import InvalidInputError

EXACT_FACTORY = "IDMap2,Flat"
"""Exact inner-product index with removable ids."""

VECTOR_INDEX_MODES = ("exact", "compact", "auto")
"""What a library may ask for: always exact, always compact, or exact until the budget is reached."""

# Per-vector id bookkeeping: IDMap2 keeps an id array (8 B) and a reverse hash map (~40 B).
_ID_MAP_BYTES = {"IDMap2": 48, "IDMap": 8}
_EXACT_PER_IMAGE_BYTES = 64  # the store's Python set of image ids
_COMPACT_PER_IMAGE_BYTES = 8  # the compact store's sorted int64 array of image ids
_IVF_ID_BYTES = 8  # FAISS inverted lists keep an int64 id beside every code
DIMS_PER_CODE = 4  # one 4-bit sub-quantiser per 4 dims: D / 8 bytes a vector
MIN_LISTS, MAX_LISTS = 16, 4096
COMPACT_MIN_IMAGES = 1000
"""Fewer images than this are not worth compressing (and give too few vectors to train on)."""


def _check(n_images: int, num_query_tokens: int, dim: int) -> None:
    if min(n_images, num_query_tokens, dim) < 0 or num_query_tokens == 0 or dim == 0:
        raise InvalidInputError(
            f"index choice got n_images={n_images}, Q={num_query_tokens}, D={dim}; "
            "pass an image count >= 0 and dims > 0"
        )


def exact_bytes_per_image(num_query_tokens: int, dim: int) -> int:
    """RAM of one image in the exact index: Q float32 vectors, their id map, the id set."""
    _check(0, num_query_tokens, dim)
    return num_query_tokens * (4 * dim + _ID_MAP_BYTES["IDMap2"]) + _EXACT_PER_IMAGE_BYTES


def compact_bytes_per_image(num_query_tokens: int, dim: int) -> int:
    """RAM of one image in the compact index: Q codes of D / 8 bytes, their ids, the id array.

    The coarse quantiser (``nlist x D`` float32, at most 4 MiB) comes on top, once per index.
    """
    _check(0, num_query_tokens, dim)
    return num_query_tokens * (dim // (2 * DIMS_PER_CODE) + _IVF_ID_BYTES) + _COMPACT_PER_IMAGE_BYTES


def compact_lists(n_vectors: int) -> int:
    """Number of IVF lists for ``n_vectors``: the power of two nearest below sqrt(n) / 4, in
    [16, 4096] (1,024 for 1M BLIP-2 images: lists of ~31k codes, cheap to train and to fill)."""
    if n_vectors < 0:
        raise InvalidInputError(f"compact_lists got n_vectors={n_vectors}; pass a count >= 0")
    target = math.sqrt(max(n_vectors, 1)) / 4
    return int(min(MAX_LISTS, max(MIN_LISTS, 2 ** math.floor(math.log2(max(target, 1))))))


def compact_factory(n_vectors: int, dim: int) -> str:
    """The FAISS factory string of a compact index trained for ``n_vectors`` of ``dim`` dims.

    ``IVF{nlist},PQ{D/4}x4fs``: 4-bit fast-scan PQ needs an even number of sub-quantisers, so D
    must be a multiple of 8 (InvalidInputError otherwise).
    """
    if dim <= 0 or dim % (2 * DIMS_PER_CODE):
        raise InvalidInputError(
            "the compact vector index needs a dimension that is a multiple of 8, got D={dim}; use {argument:'exact'} for this model",
            argument="vector_index", dim=dim,
        )
    return f"IVF{compact_lists(n_vectors)},PQ{dim // DIMS_PER_CODE}x4fs"


def exact_capacity(num_query_tokens: int, dim: int, memory_budget_bytes: int) -> int:
    """How many images the exact index holds within ``memory_budget_bytes``."""
    return max(0, int(memory_budget_bytes) // exact_bytes_per_image(num_query_tokens, dim))


def choose_index(n_images: int, num_query_tokens: int, dim: int, memory_budget_bytes: int) -> str:
    """The factory string for a library of this size within a memory budget.

    Exact ``IDMap2,Flat`` when it fits, else the compact ``IVF...,PQ...x4fs``. Raises
    InvalidInputError when even the compact index does not fit.
    """
    _check(n_images, num_query_tokens, dim)
    if n_images <= exact_capacity(num_query_tokens, dim, memory_budget_bytes):
        return EXACT_FACTORY
    needed = n_images * compact_bytes_per_image(num_query_tokens, dim)
    if needed <= memory_budget_bytes:
        return compact_factory(n_images * num_query_tokens, dim)
    raise InvalidInputError(
        f"a vector index for {n_images} images needs at least {needed / 2**30:.2f} GiB, the budget "
        f"is {memory_budget_bytes / 2**30:.2f} GiB; raise the memory budget (BLIP2_SEARCH_VECTOR_MEMORY_GB)"
    )


def compact_threshold(requested: str, num_query_tokens: int, dim: int, memory_budget_bytes: int) -> int | None:
    """At how many images a library that asked for ``requested`` switches to compact codes.

    ``exact``: never (None). ``compact``: as soon as there are enough images to train on
    (``COMPACT_MIN_IMAGES``; below that the compact store keeps exact vectors). ``auto``: when the
    exact index would outgrow ``memory_budget_bytes``, and not before ``COMPACT_MIN_IMAGES``.
    """
    if requested not in VECTOR_INDEX_MODES:
        raise InvalidInputError(
            "vector index {given} is not one of {modes}; pass {argument:'exact'}, {argument:'compact'} or {argument:'auto'}",
            argument="vector_index", given=repr(requested), modes=", ".join(VECTOR_INDEX_MODES),
        )
    if requested == "exact":
        return None
    if requested == "compact":
        return COMPACT_MIN_IMAGES
    return max(COMPACT_MIN_IMAGES, exact_capacity(num_query_tokens, dim, memory_budget_bytes) + 1)
