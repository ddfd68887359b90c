"""Device and dtype policy: a pure function of what was asked for and what the machine has."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where a model runs: a torch device string and the dtype of its ViT / language model.

    Under float16 the Q-Former and query tokens stay float32 (HF `_keep_in_fp32_modules`, which transformers
    applies to fp16 only); under bfloat16 they are bfloat16 like the rest.
    """

    device: str
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]


def choose_placement(
    device: str = "auto",
    dtype: str = "auto",
    *,
    cuda_available: bool,
    bf16_supported: bool,
    is_t5: bool = False,
) -> Placement:
    """Pick device and dtype: CUDA runs bf16 (fp16 where bf16 is missing), CPU runs fp32.

    Flan-T5 language models were trained in bf16 and overflow in fp16, so they never get fp16:
    on a GPU without bf16 they fall back to fp32. An explicit `dtype` is honoured, except fp16 for T5
    and half precision on CPU, which are refused with the fix named.
    """
    if device not in DEVICES:
        raise InvalidInputError("{argument:{given}} is not one of {choices}; pass {argument:'auto'}, {argument:'cpu'} or {argument:'cuda'}",
                                argument="device", given=repr(device), choices=", ".join(DEVICES))
    if dtype not in DTYPES:
        raise InvalidInputError("{argument:{given}} is not one of {choices}; pass {argument:'auto'}, {argument:'float32'}, "
                                "{argument:'bfloat16'} or {argument:'float16'}", argument="dtype", given=repr(dtype), choices=", ".join(DTYPES))
    if device == "cuda" and not cuda_available:
        raise InvalidInputError("{argument:'cuda'} was asked for but no CUDA GPU is visible; pass {argument:'cpu'} or {argument:'auto'}",
                                argument="device")
    resolved_device = ("cuda" if cuda_available else "cpu") if device == "auto" else device

    if dtype == "auto":
        if resolved_device == "cpu":
            resolved_dtype = "float32"
        elif bf16_supported:
            resolved_dtype = "bfloat16"
        else:
            resolved_dtype = "float32" if is_t5 else "float16"
        return Placement(resolved_device, resolved_dtype)

    if dtype == "float16" and is_t5:
        raise InvalidInputError("{argument:'float16'} overflows Flan-T5 language models; pass {argument:'bfloat16'} or {argument:'float32'}",
                                argument="dtype")
    if dtype == "float16" and resolved_device == "cpu":
        raise InvalidInputError("{argument:'float16'} is not supported on the CPU; pass {argument:'float32'} (or {argument:'bfloat16'}) there",
                                argument="dtype")
    return Placement(resolved_device, dtype)


def detect_placement(device: str = "auto", dtype: str = "auto", *, is_t5: bool = False) -> Placement:
    """`choose_placement` with the facts read off this machine."""
    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    return choose_placement(device, dtype, cuda_available=cuda, bf16_supported=bf16, is_t5=is_t5)


CPU_BATCH = 32
GPU_BATCH = 256  # ViT-g embedding on an H100: 963-981 img/s at 256, 961-1,007 at 512 (bench/gpu.py); 256 leaves room on 24 GB cards


def indexing_batch_size(requested: int, device_type: str, *, captions: bool) -> int:
    """Images per model call while indexing: `requested`, or with 0 (auto) 32 on the CPU and 256 on a GPU.

    With captions a batch also goes through the caption LM's beam search, whose memory grows with the
    batch, so auto stays at 32 there.
    """
    if requested < 0:
        raise InvalidInputError("batch size {given} is negative; pass {argument:0} (auto) or a positive number", argument="batch_size", given=requested)
    if requested:
        return requested
    return GPU_BATCH if device_type == "cuda" and not captions else CPU_BATCH
