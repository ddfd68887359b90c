"""The shipped demo models load through the plain HF classes and still mean what they were trained to.

Quality is measured on fresh renders from a seed used neither in training nor in the training run's
own evaluation; the bounds sit below the trained models' measured values (see
``blip2_search/demo/models/training_report.json``) but far above what an untrained, mis-saved or
mis-loaded model reaches.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

from blip2_search.demo import ALL_CAPTIONS, CAPTIONER_DIR, ITM_DIR, MODELS_DIR
from blip2_search.demo.data import render_eval_images
from blip2_search.demo.metrics import evaluate_captioner, evaluate_itm
from blip2_search.demo.objectives import (
    caption_loss,
    itc_image_embeds,
    itc_text_embeds,
    itm_logits,
    vit_tokens,
)

TEST_SEED = 31_337  # not the training pool's, model's or evaluation's seed (see demo/train.py)
N_IMAGES = 200


@pytest.fixture(scope="module")
def renders():
    return render_eval_images(N_IMAGES, TEST_SEED, workers=1)


@pytest.fixture(scope="module")
def itm():
    return Blip2ForImageTextRetrieval.from_pretrained(ITM_DIR).eval()


@pytest.fixture(scope="module")
def captioner():
    return Blip2ForConditionalGeneration.from_pretrained(CAPTIONER_DIR).eval()


def test_shipped_size_under_10_mb():
    total = sum(f.stat().st_size for f in MODELS_DIR.rglob("*") if f.is_file())
    assert total <= 10 * 1024 * 1024, f"demo models take {total / 1e6:.1f} MB"
    for d in (ITM_DIR, CAPTIONER_DIR):
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()


def test_itm_dir_loads_every_way(itm):
    assert itm.config.image_token_index is None
    assert itm.config.num_query_tokens == 32
    assert itm.config.qformer_config.use_qformer_text_input
    assert all(p.dtype == torch.float32 for p in itm.parameters())
    tok = AutoTokenizer.from_pretrained(ITM_DIR)
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert tok.bos_token == "[DEC]"
    assert len(tok) == itm.config.qformer_config.vocab_size
    ids = tok("A Red circle on the LEFT").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    ip = AutoImageProcessor.from_pretrained(ITM_DIR)
    assert ip.size == {"height": itm.config.vision_config.image_size, "width": itm.config.vision_config.image_size}
    proc = AutoProcessor.from_pretrained(ITM_DIR)
    assert isinstance(proc, Blip2Processor) and proc.num_query_tokens is None
    assert len(proc.tokenizer) == len(tok)  # the processor adds no token outside the embedding table


def test_projection_models_give_the_retrieval_scores(itm, renders):
    images = renders[0][:8]
    pixel_values = AutoImageProcessor.from_pretrained(ITM_DIR)(images=images, return_tensors="pt").pixel_values
    tok = AutoTokenizer.from_pretrained(ITM_DIR)
    text = tok(list(ALL_CAPTIONS[:10]), padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = itm(pixel_values=pixel_values, input_ids=text.input_ids, attention_mask=text.attention_mask).logits_per_image
        vision = Blip2VisionModelWithProjection.from_pretrained(ITM_DIR).eval()
        text_model = Blip2TextModelWithProjection.from_pretrained(ITM_DIR).eval()
        img = vision(pixel_values=pixel_values).image_embeds  # [8, 32, 256]
        txt = text_model(input_ids=text.input_ids, attention_mask=text.attention_mask).text_embeds[:, 0]  # [10, 256]
    assert img.shape == (8, 32, itm.config.image_text_hidden_size)
    scores = torch.einsum("bqd,td->bqt", img, txt).max(dim=1).values
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)


def test_training_paths_equal_hf_forward(itm, captioner, renders):
    """The split forward passes used in training compute what the HF forwards compute."""
    images = renders[0][:6]
    pixel_values = AutoImageProcessor.from_pretrained(ITM_DIR)(images=images, return_tensors="pt").pixel_values
    tok = AutoTokenizer.from_pretrained(ITM_DIR)
    text = tok(list(ALL_CAPTIONS[:6]), padding=True, return_tensors="pt")
    with torch.no_grad():
        states = itm.vision_model.post_layernorm(vit_tokens(itm.vision_model, pixel_values))
        torch.testing.assert_close(states, itm.vision_model(pixel_values=pixel_values).last_hidden_state)
        itc = torch.einsum(
            "bqd,td->bqt", itc_image_embeds(itm, states), itc_text_embeds(itm, text.input_ids, text.attention_mask)
        ).max(dim=1).values
        ref = itm(pixel_values=pixel_values, input_ids=text.input_ids, attention_mask=text.attention_mask)
        torch.testing.assert_close(itc, ref.logits_per_image, atol=1e-5, rtol=1e-5)
        ours = itm_logits(itm, states, text.input_ids, text.attention_mask)
        ref = itm(
            pixel_values=pixel_values,
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            use_image_text_matching_head=True,
        )
        torch.testing.assert_close(ours, ref.logits_per_image, atol=1e-5, rtol=1e-5)

        lm_tok = AutoTokenizer.from_pretrained(CAPTIONER_DIR)
        nq = captioner.config.num_query_tokens
        seqs = torch.tensor(
            [[captioner.config.image_token_index] * nq + lm_tok(c).input_ids + [lm_tok.eos_token_id] for c in ALL_CAPTIONS[:6]]
        )
        labels = seqs.clone()
        labels[:, : nq + 1] = -100
        ours = caption_loss(captioner, vit_tokens(captioner.vision_model, pixel_values), seqs, labels)
        ref = captioner(pixel_values=pixel_values, input_ids=seqs, labels=labels).loss
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_captioner_dir_loads_and_shares_the_vit(captioner):
    proc = AutoProcessor.from_pretrained(CAPTIONER_DIR)
    tok = AutoTokenizer.from_pretrained(CAPTIONER_DIR)
    assert isinstance(proc, Blip2Processor) and proc.num_query_tokens == captioner.config.num_query_tokens
    assert captioner.config.image_token_index == tok.convert_tokens_to_ids("<image>")
    assert len(proc.tokenizer) == len(tok) == captioner.config.text_config.vocab_size
    assert captioner.generation_config.eos_token_id == tok.eos_token_id
    assert all(p.dtype == torch.float32 for p in captioner.parameters())
    a = load_file(ITM_DIR / "model.safetensors")
    b = load_file(CAPTIONER_DIR / "model.safetensors")
    shared = [k for k in a if k.startswith(("vision_model.embeddings.", "vision_model.encoder."))]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)
    assert not torch.equal(a["vision_model.post_layernorm.weight"], b["vision_model.post_layernorm.weight"])


def test_itm_model_quality(renders):
    images, scene_ids = renders
    m = evaluate_itm(ITM_DIR, images, scene_ids, negatives_seed=TEST_SEED)
    assert m.itc_r1 >= 0.9, m
    assert m.rerank_r1 >= 0.9, m
    assert m.rerank_r1 >= m.itc_r1 - 0.03, m  # the ITM rerank may not lose to ITC beyond a few images of noise
    assert m.itm_pairwise >= 0.9, m
    assert m.itm_threshold >= 0.85, m


def test_captioner_quality(renders):
    images, scene_ids = renders
    m = evaluate_captioner(CAPTIONER_DIR, images, scene_ids)
    assert m.caption_exact >= 0.85, m


def test_generate_then_decode_gives_the_caption_text(captioner, renders):
    images, scene_ids = renders
    proc = AutoProcessor.from_pretrained(CAPTIONER_DIR)
    pixel_values = proc(images=images[:16], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = captioner.generate(pixel_values=pixel_values, max_new_tokens=10)
    texts = proc.batch_decode(out, skip_special_tokens=True)
    assert all(t == t.strip() and "  " not in t for t in texts)
    assert np.mean([t == ALL_CAPTIONS[s] for t, s in zip(texts, scene_ids[:16])]) >= 0.75
    # EOS ends generation: nothing follows the first </s> except padding
    eos, pad = captioner.generation_config.eos_token_id, captioner.generation_config.pad_token_id
    prompt = captioner.config.num_query_tokens + 1
    for row in out[:, prompt:].tolist():
        assert eos in row
        assert all(t == pad for t in row[row.index(eos) + 1 :])


def test_training_script_runs_end_to_end_in_a_smoke_run(tmp_path):
    """The training script with a few steps a stage: every stage runs, both models save and load through
    HF's classes, a pool too small for ITM negatives is refused with the fix, and torch's global settings
    (threads, deterministic kernels) come back as they were."""
    from blip2_search.demo import train

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    recipe = train.Recipe(pool=100, qformer_pool=100, vit_steps=2, itc_steps=3, itm_steps=2, caption_steps=3, eval_images=20,
                          vit_batch=16, itc_batch=16, itm_batch=16, caption_batch=8)
    with pytest.raises(ValueError, match="raise --qformer-pool"):
        train.run(tmp_path / "few", recipe)
    out = tmp_path / "models"
    report = train.run(out, dataclasses.replace(recipe, pool=600, qformer_pool=600))
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    Blip2ForImageTextRetrieval.from_pretrained(out / "itm")
    Blip2ForConditionalGeneration.from_pretrained(out / "captioner")
    assert json.loads((out / "training_report.json").read_text())["recipe"] == report["recipe"]
    assert report["recipe"]["itm_steps"] == 2 and report["vit_byte_identical"]
