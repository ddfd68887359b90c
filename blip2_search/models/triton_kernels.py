"""A Triton kernel for the ViT's residual add + LayerNorm in one pass (CUDA only; imported where Triton is).

`add_layer_norm(x, y, weight, bias, eps)` returns `(s, layer_norm(s))` with `s = x + y`, rounded to the
inputs' dtype before the statistics are taken, as torch's eager `x + y` then `F.layer_norm` do. One
program normalises a tile of `ROWS` rows of up to `BLOCK` columns held in registers, so each row is read twice (x,
y) and written twice (s, h): 4 passes over `[n, T, W]` against 5 for the two eager kernels, and no
looped reduction (torch.compile's kernel for W = 1408 looped and reached ~1 TB/s on an H100).
Runs under `TRITON_INTERPRET=1` on the CPU, which is how tests/test_fast_vit.py checks its math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["add_layer_norm"]

# The tile: rows a program normalises together ([ROWS, BLOCK]) and its warps. bench/gpu.py's sweep on an
# H100 (bf16, [512 x 257, 1408]): 4 x 16 moved 2,769 GB/s, 4 x 2 2,765, 1 x 2 2,645; torch's two kernels 1,947.
ROWS = 4
WARPS = 16


@triton.jit
def _rounded(v, BF16: tl.constexpr):
    """float32 -> the nearest value (ties to even) that the output dtype holds, still as float32. For bf16 the
    rounding is done on the bits, so the interpreter (which truncates) and the GPU agree with torch."""
    if BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _add_layer_norm_kernel(X, Y, S, H, Wt, Bs, n_rows, n_cols, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr, BF16: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_row = cols < n_cols
    mask = (rows < n_rows)[:, None] & in_row[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
    s = _rounded(x + y, BF16)  # the sum as the output dtype holds it, as torch's eager add rounds it
    tl.store(S + offsets, s.to(S.dtype.element_ty), mask=mask)
    mean = tl.sum(s, axis=1) / n_cols
    centred = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / n_cols
    weight = tl.load(Wt + cols, mask=in_row, other=0.0).to(tl.float32)
    bias = tl.load(Bs + cols, mask=in_row, other=0.0).to(tl.float32)
    h = centred * (1.0 / tl.sqrt(var + eps))[:, None] * weight[None, :] + bias[None, :]
    tl.store(H + offsets, _rounded(h, BF16).to(H.dtype.element_ty), mask=mask)


def add_layer_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *, rows: int | None = None, warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x + y, layer_norm(x + y))` over the last dimension; x, y contiguous `[..., W]` of one dtype.

    `rows`, `warps`: the tile height and warps a program uses (default `ROWS`, `WARPS`; bench/gpu.py sweeps them).
    """
    if x.shape != y.shape or x.dtype != y.dtype or not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError(f"add_layer_norm needs two contiguous tensors of one shape and dtype, got {tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}")
    rows, warps = rows or ROWS, warps or WARPS
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    s, h = torch.empty_like(x), torch.empty_like(x)
    grid = (triton.cdiv(n_rows, rows),)
    _add_layer_norm_kernel[grid](
        x, y, s, h, weight, bias, n_rows, n_cols, eps,
        BLOCK=triton.next_power_of_2(n_cols), ROWS=rows, BF16=x.dtype == torch.bfloat16, num_warps=warps,
    )
    return s, h
