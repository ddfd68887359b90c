"""The torch exact search (the GPU search path) against a numpy brute force, in float32 and half precision."""

import numpy as np
import pytest
import torch

from blip2_search.store.torch_search import max_sim_topk

Q, D = 4, 16


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = (vectors.astype(np.float64) @ queries.astype(np.float64).T).reshape(-1, Q, len(queries)).max(axis=1).T
    ids = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])
    return ids, np.take_along_axis(scores, ids, axis=1)


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_equals_brute_force(dtype, chunk):
    rng = np.random.default_rng(0)
    n = 300
    vectors = unit(rng, n * Q, D)
    stored = torch.from_numpy(vectors).to(dtype)
    # Compare with the brute force over what is actually stored (half precision rounds the vectors).
    exact_vectors = stored.float().numpy()
    queries = unit(rng, 5, D)
    ids, scores = max_sim_topk(stored, torch.from_numpy(queries), 10, num_query_tokens=Q, chunk_images=chunk)
    want_ids, want_scores = brute_force(exact_vectors, queries, 10)
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)
    # Ids equal except where two exact scores are within float32 rounding of each other.
    assert (ids.numpy() == want_ids).mean() > 0.98


def crowded_images(seed: int, step: float, n: int = 120, d: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Images whose best cosine with the query steps down by ``step``, below half precision's output step."""
    rng = np.random.default_rng(seed)
    query = rng.standard_normal(d)
    query /= np.linalg.norm(query)
    images = []
    for i in range(n):
        s = 0.6 - step * i
        r = rng.standard_normal(d)
        r -= (r @ query) * query
        best = s * query + np.sqrt(1 - s * s) * r / np.linalg.norm(r)
        others = 0.3 * unit(rng, Q - 1, d)
        images.append(np.vstack([others, best]))
    return np.concatenate(images).astype(np.float32), query[None].astype(np.float32)


@pytest.mark.parametrize("dtype, step, seed", [(torch.float16, 1e-5, 9), (torch.float16, 1e-5, 24), (torch.bfloat16, 5e-5, 5), (torch.bfloat16, 5e-5, 10)])
def test_crowded_scores_are_exact_in_half_precision(seed, dtype, step):
    """fp16 rounds the query and the scores; candidates within the rounding bound are rescored in float32.

    Keeping only images whose rounded score reaches the k-th rounded score loses true top-10 images
    for these seeds (checked by setting the rounding bound to 0 when this test was written).
    """
    vectors, query = crowded_images(seed, step)
    stored = torch.from_numpy(vectors).to(dtype)
    ids, scores = max_sim_topk(stored, torch.from_numpy(query), 10, num_query_tokens=Q)
    want_ids, want_scores = brute_force(stored.float().numpy(), query, 10)
    # A lost image shifts the list by >= step; float32 vs float64 sums differ by < 1e-7.
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=5e-7, rtol=0)
    own = (stored.float().numpy().astype(np.float64) @ query[0].astype(np.float64)).reshape(-1, Q).max(axis=1)
    np.testing.assert_allclose(own[ids[0].numpy()], scores[0].numpy(), atol=5e-7, rtol=0)


def test_duplicate_images_tie_by_index():
    rng = np.random.default_rng(1)
    vectors = unit(rng, 50 * Q, D)
    vectors[7 * Q : 8 * Q] = vectors[30 * Q : 31 * Q]
    query = vectors[30 * Q : 30 * Q + 1]
    ids, _ = max_sim_topk(torch.from_numpy(vectors).half(), torch.from_numpy(query), 2, num_query_tokens=Q, chunk_images=8)
    assert ids[0].tolist() == [7, 30]


def test_k_larger_than_images_and_bad_shape():
    vectors = torch.from_numpy(unit(np.random.default_rng(2), 3 * Q, D))
    ids, scores = max_sim_topk(vectors, vectors[:2], 10, num_query_tokens=Q)
    assert ids.shape == (2, 3) and scores.shape == (2, 3)
    with pytest.raises(ValueError, match="expected"):
        max_sim_topk(vectors[:-1], vectors[:1], 1, num_query_tokens=Q)
