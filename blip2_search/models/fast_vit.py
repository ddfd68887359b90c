"""BLIP-2's ViT blocks with fewer passes over GPU memory: the same weights and layer math as HF's.

On a GPU in half precision, ViT-g's matrix products run near the card's peak and much of the time
left goes to element-wise passes over the activations (LayerNorm, GELU, residual adds), each a full
read and write of a `[n, 257, 1408]` or `[n, 257, 6144]` tensor: 56 of 270 ms for a batch of 256 on
an H100 (bench/gpu.py's profile). This module runs HF's `Blip2EncoderLayer` math with three changes:

- `fused_gelu`: the MLP's first product, its bias and the GELU run as one cuBLASLt call with a GELU
  epilogue (`torch._addmm_activation`), so the widest activation (6144 wide) is written once and
  never re-read by a separate GELU. cuBLASLt's GELU is the tanh approximation (torch's CPU kernel
  computes the exact one), which differs from the checkpoints' exact GELU by at most 5e-4, below
  bf16's own rounding of activations of that size.
- `attention`: the scaled-dot-product attention backend to try first (cuDNN's was the fastest for
  ViT-g's 88-wide heads on an H100); torch falls back to the others where it cannot run.
- `add_norm`: each residual add runs together with the LayerNorm that reads it (a block's second
  add with the next block's `layer_norm1`), in one Triton kernel (`triton_kernels.py`).

Measured side by side on an H100 (docs/benchmarks.md): the ViT at batch 512 went from 894-911 img/s
(HF) to 1,000-1,016, and the whole embedding from 864-888 to 961-1,007 img/s (three runs); the ViT
tokens' cosine to a float32 reference is the same as HF's bf16 forward (0.99989 vs 0.99988).

`use_fast_vit` decides where it applies: CUDA with bf16/fp16 weights. Elsewhere (the CPU, float32)
the encoder keeps HF's own forward, which our tests compare against checkpoints' known answers.
`vit_blocks` here equals `vision_model.encoder(inputs_embeds=vision_model.embeddings(x))` up to
that GELU approximation; on the CPU it is the same computation (tests/test_fast_vit.py).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["VitKernels", "add_layer_norm", "use_fast_vit", "vit_blocks"]

_BACKENDS = ("cudnn", "flash", "efficient", "math")
_ADD_NORMS = ("triton", "compile", "eager")


@dataclass(frozen=True)
class VitKernels:
    """How the fast path computes on CUDA: `fused_gelu` (fc1 + bias + tanh-GELU in one cuBLASLt call), the
    SDPA backend tried first (`attention`: "cudnn", "flash", "efficient", "math", or None for torch's own
    order), and `add_norm`, how each residual add and the LayerNorm after it run: "triton" (one pass, our
    kernel in `triton_kernels.py`), "compile" (the kernel `torch.compile` makes, compiled at the first
    batch) or "eager" (two torch kernels). Where Triton or compiling fails, eager, with a warning."""

    fused_gelu: bool = True
    attention: str | None = "cudnn"
    add_norm: str = "triton"

    def __post_init__(self):
        if self.attention is not None and self.attention not in _BACKENDS:
            raise ValueError(f"attention backend {self.attention!r} is not one of {', '.join(_BACKENDS)}; pass one of them or None")
        if self.add_norm not in _ADD_NORMS:
            raise ValueError(f"add_norm {self.add_norm!r} is not one of {', '.join(_ADD_NORMS)}; pass one of them")


DEFAULT_KERNELS = VitKernels()


def use_fast_vit(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the fused ViT path runs: on CUDA with half-precision weights (where it was measured)."""
    return device_type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _attention_order(first: str | None):
    """A context preferring backend `first`, then the rest in torch's usual order; a no-op without `first`."""
    if first is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    order = [first] + [b for b in ("flash", "efficient", "cudnn", "math") if b != first]
    backends = [getattr(SDPBackend, names[b]) for b in order]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without priorities: allow them all, torch picks
        return contextlib.nullcontext()


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(s, layer_norm(s))` with `s = x + y`: a residual add and the LayerNorm that reads it."""
    s = x + y
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


class _AddNorm:
    """`add_layer_norm` through `how` ("triton" or "compile") for CUDA tensors; eager on the CPU.

    The first CUDA call builds the kernel (imports Triton or compiles); if that call fails (no Triton, no
    compiler), this process runs the eager version from then on, with a warning. Once a call has
    succeeded, errors (out of memory, say) propagate like any torch error.
    """

    def __init__(self, how: str):
        self.how = how
        self.fn = None
        self.failed: str | None = None

    def _build(self):
        if self.how == "triton":
            from .triton_kernels import add_layer_norm as kernel

            return kernel
        return torch.compile(add_layer_norm)

    def __call__(self, x, y, weight, bias, eps):
        if not x.is_cuda or self.failed is not None:
            return add_layer_norm(x, y, weight, bias, eps)
        if self.fn is not None:
            return self.fn(x, y, weight, bias, eps)
        try:
            fn = self._build()
            out = fn(x, y, weight, bias, eps)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # no Triton / compiler here: the same math, unfused
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            warnings.warn(f"the ViT's fused add+LayerNorm ({self.how}) failed ({self.failed}); running it unfused", RuntimeWarning, stacklevel=2)
            return add_layer_norm(x, y, weight, bias, eps)
        self.fn = fn
        return out


_ADD_NORM = {"triton": _AddNorm("triton"), "compile": _AddNorm("compile"), "eager": add_layer_norm}


def _attention(h: torch.Tensor, layer) -> torch.Tensor:
    """`projection(attention(h))`, with the projection's bias, `[n, T, W]`."""
    n, t, w = h.shape
    a = layer.self_attn
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).view(n, t, 3, a.num_heads, w // a.num_heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=a.scale)
    return F.linear(o.transpose(1, 2).reshape(n, t, w), a.projection.weight, a.projection.bias)


def _mlp(h: torch.Tensor, layer, fused_gelu: bool) -> torch.Tensor:
    """`fc2(act(fc1(h)))`, `[n, T, W]`; with `fused_gelu` fc1's bias and the GELU are the GEMM's epilogue."""
    n, t, w = h.shape
    m = layer.mlp
    if fused_gelu:
        inner = torch._addmm_activation(m.fc1.bias, h.reshape(n * t, w), m.fc1.weight.t(), use_gelu=True)
    else:
        inner = m.activation_fn(F.linear(h, m.fc1.weight, m.fc1.bias))
    return F.linear(inner, m.fc2.weight, m.fc2.bias).view(n, t, w)


@torch.inference_mode()
def vit_blocks(vision_model, pixel_values: torch.Tensor, kernels: VitKernels = DEFAULT_KERNELS) -> torch.Tensor:
    """Embeddings and encoder blocks of a `Blip2VisionModel`: `[n, 3, S, S]` -> `[n, T, W]` before post_layernorm.

    HF's `Blip2EncoderLayer` math, regrouped: x + attn(ln1(x)), then + mlp(ln2(.)); each residual add runs
    with the LayerNorm that follows it (a block's second add with the next block's ln1).
    `pixel_values` must already be on the model's device; they are cast to its dtype.
    """
    x = vision_model.embeddings(pixel_values)
    layers = vision_model.encoder.layers
    fused_gelu = (
        kernels.fused_gelu
        and getattr(vision_model.config, "hidden_act", "gelu") == "gelu"  # the epilogue is a GELU
        and hasattr(torch, "_addmm_activation")  # private torch API (since 1.13): without it, unfused
    )
    add_norm = _ADD_NORM[kernels.add_norm]
    with _attention_order(kernels.attention):
        ln = layers[0].layer_norm1
        h = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
        for i, layer in enumerate(layers):
            ln = layer.layer_norm2
            x, h = add_norm(x, _attention(h, layer), ln.weight, ln.bias, ln.eps)
            y = _mlp(h, layer, fused_gelu)
            if i + 1 == len(layers):
                return x + y
            ln = layers[i + 1].layer_norm1
            x, h = add_norm(x, y, ln.weight, ln.bias, ln.eps)
    return x
