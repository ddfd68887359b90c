"""The fused ViT path (models/fast_vit.py) against HF's own Blip2 vision forward."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2VisionConfig, Blip2VisionModel

from blip2_search.models import encoder as encoder_module
from blip2_search.models.encoder import Blip2Encoder
from blip2_search.models.fast_vit import VitKernels, use_fast_vit, vit_blocks


def _vision_model(dtype=torch.float32, act: str = "gelu") -> Blip2VisionModel:
    config = Blip2VisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7, hidden_act=act
    )
    torch.manual_seed(0)
    model = Blip2VisionModel(config).eval().requires_grad_(False)
    with torch.no_grad():  # HF's init (std 1e-10, zero biases) gives near-zero activations: use O(1) ones
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.normal_(1, 0.2)
            elif p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.normal_(0, 0.5)
    return model.to(dtype)


def _hf_blocks(model, x):
    with torch.inference_mode():
        return model.encoder(inputs_embeds=model.embeddings(x)).last_hidden_state


@pytest.mark.parametrize("kernels", [VitKernels(fused_gelu=False, attention=None), VitKernels(), VitKernels(attention="flash"), VitKernels(attention="math")])
def test_blocks_equal_hf_forward_in_float32(kernels):
    model = _vision_model()
    x = torch.randn(3, 3, 28, 28)
    reference = _hf_blocks(model, x)
    out = vit_blocks(model, x, kernels)
    assert out.shape == reference.shape == (3, 17, 48)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(model.post_layernorm(out), model(pixel_values=x).last_hidden_state, atol=2e-5, rtol=1e-5)


def test_another_activation_is_kept():
    """The GELU epilogue only stands in for BLIP-2's GELU; any other activation runs as the checkpoint says."""
    model = _vision_model(act="quick_gelu")
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(vit_blocks(model, x), _hf_blocks(model, x), atol=2e-5, rtol=1e-5)


def test_blocks_close_to_hf_in_bfloat16():
    model = _vision_model(torch.bfloat16)
    x = torch.randn(2, 3, 28, 28)
    reference = _hf_blocks(model, x).float()
    out = vit_blocks(model, x).float()
    assert F.cosine_similarity(out.flatten(1), reference.flatten(1)).min() > 0.999


def test_tanh_gelu_changes_blocks_less_than_bfloat16_rounding():
    """What cuBLASLt's GELU epilogue does on a GPU (tanh approximation), checked on the CPU in float32."""
    model = _vision_model()
    x = torch.randn(2, 3, 28, 28)
    exact = _hf_blocks(model, x)
    for layer in model.encoder.layers:
        layer.mlp.activation_fn = torch.nn.GELU(approximate="tanh")
    tanh = _hf_blocks(model, x)
    bf16 = _hf_blocks(model.to(torch.bfloat16), x).float()
    assert 0 < (tanh - exact).abs().max() < (bf16 - exact).abs().max() / 5


def test_a_wrong_layer_is_caught():
    """The comparison bites: dropping one block's attention bias changes the output."""
    model = _vision_model()
    x = torch.randn(2, 3, 28, 28)
    reference = _hf_blocks(model, x)
    with torch.no_grad():
        model.encoder.layers[1].self_attn.qkv.bias.zero_()
    assert (vit_blocks(model, x) - reference).abs().max() > 1e-2


def test_where_the_fast_path_applies():
    assert use_fast_vit("cuda", torch.bfloat16) and use_fast_vit("cuda", torch.float16)
    assert not use_fast_vit("cuda", torch.float32)
    assert not use_fast_vit("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="pass one of them or None"):
        VitKernels(attention="triton")


def test_encoder_routes_through_the_fast_path(tiny_itm_dir, monkeypatch):
    """With the fast path forced on (as on a GPU), the encoder's embeddings stay those of HF's forward."""
    enc = Blip2Encoder.load(str(tiny_itm_dir))
    pixels = enc.pixels_from_uint8(np.random.default_rng(1).integers(0, 256, (4, enc.image_size, enc.image_size, 3), dtype=np.uint8))
    reference = enc.embed_pixels(pixels)
    hf_tokens = enc.full_model.vision_model(pixel_values=pixels).last_hidden_state
    calls = []
    monkeypatch.setattr(encoder_module, "use_fast_vit", lambda device, dtype: True)
    monkeypatch.setattr(encoder_module, "fast_vit_blocks", lambda *a: calls.append(1) or vit_blocks(*a))
    torch.testing.assert_close(enc.vit_tokens(pixels), hf_tokens, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(enc.embed_pixels(pixels), reference, atol=2e-5)
    assert len(calls) == 2
    enc.vit_kernels = None  # off: HF's own forward
    enc.vit_tokens(pixels)
    assert len(calls) == 2


def test_add_norm_choice_is_checked():
    with pytest.raises(ValueError, match="pass one of them"):
        VitKernels(add_norm="cuda")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (pip install triton)")
def test_triton_add_layer_norm_equals_torch():
    """Our CUDA kernel's math, run by Triton's CPU interpreter: the sums equal torch's bit for bit, the norms to a step."""
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from blip2_search.models.triton_kernels import add_layer_norm
        torch.manual_seed(0)
        for dtype, shape in ((torch.bfloat16, (2, 7, 1408)), (torch.float32, (3, 5, 48)), (torch.bfloat16, (1, 3, 40))):
            x, y = 3 * torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
            w, b = torch.randn(shape[-1]).to(dtype), torch.randn(shape[-1]).to(dtype)
            ref_h = F.layer_norm(x + y, (shape[-1],), w, b, 1e-6)
            for rows, warps in ((1, 4), (4, 8), (16, 2)):  # tiles taller than the 14 or 15 rows, and partial ones
                s, h = add_layer_norm(x, y, w, b, 1e-6, rows=rows, warps=warps)
                assert torch.equal(s, x + y), dtype
                if dtype == torch.bfloat16:  # the statistics differ in float32's last bits: at most one bf16 step, rarely
                    torch.testing.assert_close(h.float(), ref_h.float(), atol=1e-6, rtol=2**-8)
                    assert (h != ref_h).float().mean() < 0.01
                else:
                    torch.testing.assert_close(h, ref_h, atol=2e-6, rtol=1e-6)
        try:
            add_layer_norm(x, y.transpose(0, 1), w, b, 1e-6)
        except ValueError as exc:
            assert "contiguous" in str(exc)
        else:
            raise AssertionError("a non-contiguous input was accepted")
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to drive `_AddNorm`'s GPU branch on this machine."""

    @property
    def is_cuda(self):
        return True


def test_add_norm_falls_back_once_when_the_kernel_cannot_be_built(monkeypatch):
    from blip2_search.models import fast_vit

    x, y = torch.randn(2, 3, 8).as_subclass(_OnGpu), torch.randn(2, 3, 8).as_subclass(_OnGpu)
    w, b = torch.ones(8), torch.zeros(8)
    expected = fast_vit.add_layer_norm(x, y, w, b, 1e-6)
    add_norm = fast_vit._AddNorm("triton")
    builds = []
    monkeypatch.setattr(add_norm, "_build", lambda: builds.append(1) or (_ for _ in ()).throw(ImportError("No module named 'triton'")))
    with pytest.warns(RuntimeWarning, match="running it unfused"):
        s, h = add_norm(x, y, w, b, 1e-6)
    torch.testing.assert_close(h, expected[1])
    add_norm(x, y, w, b, 1e-6)  # no second build, no second warning
    assert builds == [1] and "triton" in add_norm.failed

    working = fast_vit._AddNorm("triton")
    calls = []

    def kernel(*args):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return fast_vit.add_layer_norm(*args)

    monkeypatch.setattr(working, "_build", lambda: kernel)
    working(x, y, w, b, 1e-6)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # after a success, errors are errors
        working(x, y, w, b, 1e-6)
