"""Exact max-inner-product search over multi-vector images with torch (GPU or CPU).

The vectors of n images live in one matrix ``[n * Q, D]`` (image i owns rows ``i*Q .. i*Q+Q-1``),
usually float16 or bfloat16 on a GPU: 1M images x 32 x 256 in fp16 is 16 GiB. A query's score for
an image is the max over the image's Q rows of the inner product (BLIP-2 ITC).

Half-precision matmuls round the query and their outputs (together under 1e-3 at |s| <= 1 for fp16,
8e-3 for bf16), so a first pass in the stored dtype scores every image only to nominate candidates:
each image whose rounded score is within twice that bound of the k-th best rounded score is rescored
in float32 from the same stored vectors, and the final order is by that float32 score, ties by
ascending image index. The result is exact for the stored vectors (up to float32 summation order).
"""

from __future__ import annotations

import torch

__all__ = ["max_sim_topk"]

# Twice the worst-case error of a half-precision score (query rounding + output rounding), |score| <= 1.
_ROUNDING = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _scores(rows: torch.Tensor, queries: torch.Tensor, q: int) -> torch.Tensor:
    """Max over each image's q rows: ``rows [c*q, D]``, ``queries [m, D]`` -> ``[c, m]`` (rows' dtype)."""
    return (rows @ queries.T).view(-1, q, queries.shape[0]).amax(dim=1)


@torch.inference_mode()
def max_sim_topk(
    vectors: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    num_query_tokens: int,
    chunk_images: int = 131072,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k images per query.

    ``vectors [n * Q, D]`` (any float dtype, any device), ``queries [m, D]`` (cast to the vectors'
    device) -> ``(image indices [m, k'] int64, scores [m, k'] float32)`` best first, ties by index,
    ``k' = min(k, n)``; scores are float32 inner products of the stored vectors with the queries.
    """
    q = int(num_query_tokens)
    if vectors.ndim != 2 or vectors.shape[0] % q:
        raise ValueError(f"vectors have shape {tuple(vectors.shape)}; expected [n * {q}, D]")
    n = vectors.shape[0] // q
    m = queries.shape[0]
    k_out = min(int(k), n)
    device = vectors.device
    if k_out <= 0 or m == 0:
        return torch.zeros((m, max(k_out, 0)), dtype=torch.long, device=device), torch.zeros((m, max(k_out, 0)), device=device)
    tol = _ROUNDING.get(vectors.dtype, 0.0)
    q_stored = queries.to(device=device, dtype=vectors.dtype)
    q_exact = queries.to(device=device, dtype=torch.float32)

    # Pass 1: every image's score in the stored dtype ([n, m], 4 bytes per image and query).
    approx = torch.empty((n, m), dtype=torch.float32, device=device)
    for start in range(0, n, chunk_images):
        stop = min(n, start + chunk_images)
        approx[start:stop] = _scores(vectors[start * q : stop * q], q_stored, q)
    threshold = approx.topk(k_out, dim=0).values[-1] - tol  # [m]: what a true top-k image must reach

    # Pass 2: rescore in float32 every image that could be in the top k.
    out_ids = torch.empty((m, k_out), dtype=torch.long, device=device)
    out_scores = torch.empty((m, k_out), dtype=torch.float32, device=device)
    for row in range(m):
        cand = torch.nonzero(approx[:, row] >= threshold[row]).flatten()  # ascending image index
        exact = (vectors.view(n, q, -1)[cand].float() @ q_exact[row]).amax(dim=1)
        # Stable sort of ascending indices by descending score: ties keep the lower index first.
        order = torch.sort(exact, descending=True, stable=True).indices[:k_out]
        out_ids[row], out_scores[row] = cand[order], exact[order]
    return out_ids, out_scores
