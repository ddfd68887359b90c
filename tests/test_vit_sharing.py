"""One ViT pass for the embedder and the captioner: equal to two passes, used only when the blocks are identical."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_search.indexing.embed import embed_batch
from blip2_search.models.captioner import Blip2Captioner, CaptionSettings
from blip2_search.models.encoder import Blip2Encoder
from blip2_search.models.sharing import share_vit, vit_blocks_identical


@pytest.fixture(scope="module")
def shared_captioner_dir(tiny_itm_dir, tiny_captioner_dir, tmp_path_factory):
    """The tiny captioner with the tiny ITM model's ViT blocks copied in (its own post_layernorm kept)."""
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    out = tmp_path_factory.mktemp("shared-cap") / "model"
    shutil.copytree(tiny_captioner_dir, out)
    itm = Blip2ForImageTextRetrieval.from_pretrained(tiny_itm_dir)
    cap = Blip2ForConditionalGeneration.from_pretrained(tiny_captioner_dir)
    cap.vision_model.embeddings.load_state_dict(itm.vision_model.embeddings.state_dict())
    cap.vision_model.encoder.load_state_dict(itm.vision_model.encoder.state_dict())
    assert not torch.equal(cap.vision_model.post_layernorm.weight, itm.vision_model.post_layernorm.weight)
    cap.save_pretrained(out)
    return out


def _pixels(n: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_blocks_then_post_layernorm_equal_vit_tokens(tiny_itm_dir):
    enc = Blip2Encoder.load(str(tiny_itm_dir))
    x = enc.pixels_from_uint8(_pixels(3))
    hf = enc.full_model.vision_model(pixel_values=x).last_hidden_state  # HF's own forward, post_layernorm included
    torch.testing.assert_close(enc.post_layernorm(enc.vit_blocks(x)), hf, atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.vit_tokens(x), hf, atol=1e-6, rtol=0)


@pytest.mark.parametrize("settings", [CaptionSettings(), CaptionSettings(num_beams=3, max_new_tokens=6, prompt="a photo of")])
def test_captions_from_shared_blocks_equal_hf_generate(tiny_itm_dir, shared_captioner_dir, settings):
    enc = Blip2Encoder.load(str(tiny_itm_dir))
    cap = Blip2Captioner.load(str(shared_captioner_dir), settings=settings)
    x = enc.pixels_from_uint8(_pixels(5))
    reference = cap.caption_pixels(x)  # HF generate, the captioner's own ViT
    assert cap.caption_vit(enc.vit_blocks(x)) == reference
    assert len(set(reference)) > 1


def test_share_only_identical_blocks(tiny_itm_dir, tiny_captioner_dir, shared_captioner_dir):
    enc = Blip2Encoder.load(str(tiny_itm_dir))
    other = Blip2Captioner.load(str(tiny_captioner_dir))
    assert not share_vit(enc, other)
    assert share_vit(enc, None) is False
    cap = Blip2Captioner.load(str(shared_captioner_dir))
    assert share_vit(enc, cap)
    # One copy of the blocks in memory; the captioner keeps its own post_layernorm.
    assert cap.model.vision_model.encoder is enc.full_model.vision_model.encoder
    assert cap.model.vision_model.post_layernorm is not enc.full_model.vision_model.post_layernorm


def test_embed_batch_shared_equals_two_passes(tiny_itm_dir, shared_captioner_dir):
    enc = Blip2Encoder.load(str(tiny_itm_dir))
    cap = Blip2Captioner.load(str(shared_captioner_dir))
    pixels = {enc.image_input: _pixels(4)}
    separate = embed_batch(enc, cap, pixels, keep_vit=True).collect()
    assert share_vit(enc, cap)
    shared = embed_batch(enc, cap, pixels, shared_vit=True, keep_vit=True).collect()
    np.testing.assert_allclose(shared.vectors, separate.vectors, atol=1e-6)
    assert shared.captions == separate.captions
    assert [v is None for v in shared.caption_vectors] == [v is None for v in separate.caption_vectors]  # None: no words
    worded = [i for i, v in enumerate(separate.caption_vectors) if v is not None]
    np.testing.assert_allclose([shared.caption_vectors[i] for i in worded], [separate.caption_vectors[i] for i in worded], atol=1e-6)
    np.testing.assert_allclose(shared.vit.astype(np.float32), separate.vit.astype(np.float32), atol=2e-3, rtol=0)
    assert shared.vit.dtype == np.float16  # what the token store keeps
    np.testing.assert_array_equal(shared.vit, enc.vit_tokens(enc.pixels_from_uint8(pixels[enc.image_input])).half().numpy())


def test_demo_models_share_their_vit():
    enc = Blip2Encoder.load("demo")
    cap = Blip2Captioner.load("demo")
    assert vit_blocks_identical(enc.full_model.vision_model, cap.model.vision_model)
    assert share_vit(enc, cap)
    from blip2_search.demo.scenes import ALL_SCENES, render

    img = render(ALL_SCENES[5], np.random.default_rng(0), size=(80, 60))
    pixels = {enc.image_input: np.array(img.resize((enc.image_size, enc.image_size)))[None]}
    assert embed_batch(enc, cap, pixels, shared_vit=True).captions == [Blip2Captioner.load("demo").caption([img.resize((enc.image_size, enc.image_size))])[0]]


def test_blocks_that_compute_differently_with_the_same_weights_are_not_shared(tiny_itm_dir, shared_captioner_dir, tmp_path):
    """Equal tensors are not enough: another head count (or eps, activation) makes the captioner's ViT compute
    other tokens from them, and after sharing it would run the embedder's modules (review: captions changed)."""
    import json

    for field, value in (("num_attention_heads", 2), ("layer_norm_eps", 1e-2), ("hidden_act", "relu")):
        other = tmp_path / field
        shutil.copytree(shared_captioner_dir, other)
        config = json.loads((other / "config.json").read_text())
        assert config["vision_config"].get(field) != value
        config["vision_config"][field] = value
        (other / "config.json").write_text(json.dumps(config))
        enc, cap = Blip2Encoder.load(str(tiny_itm_dir)), Blip2Captioner.load(str(other))
        assert vit_blocks_identical(enc.full_model.vision_model, cap.model.vision_model)  # the same tensors...
        assert not share_vit(enc, cap), field  # ...computing other tokens
