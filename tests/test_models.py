"""The model layer against HF's own forward passes on tiny random checkpoints."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_search.errors import InvalidInputError, ModelLoadError, ModelNotFoundError
from blip2_search.models import Blip2Captioner, Blip2Encoder, CaptionSettings, choose_placement, resolve_model
from blip2_search.models.policy import indexing_batch_size
from blip2_search.models.text import pre_caption
from blip2_search.store.index_choice import compact_factory

TEXTS = ["a red circle on the left", "A photo of a CAT; sitting (in) the beach!", "dog", "the blue square on top and a green triangle"]


def _images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    ims = [Image.fromarray(rng.integers(0, 255, (20 + 9 * i, 50 - 4 * i, 3), dtype=np.uint8)) for i in range(n - 1)]
    return ims + [Image.new("RGB", (40, 30), (220, 30, 30))]


@pytest.fixture(scope="module")
def encoder(tiny_itm_dir):
    return Blip2Encoder.load(str(tiny_itm_dir))


@pytest.fixture(scope="module")
def hf_itm(tiny_itm_dir):
    from transformers import Blip2ForImageTextRetrieval

    return Blip2ForImageTextRetrieval.from_pretrained(tiny_itm_dir).eval()


# ------------------------------------------------------------------ policy
@pytest.mark.parametrize(
    "device,dtype,cuda,bf16,t5,expected",
    [
        ("auto", "auto", False, False, False, ("cpu", "float32")),
        ("auto", "auto", True, True, False, ("cuda", "bfloat16")),
        ("auto", "auto", True, False, False, ("cuda", "float16")),
        ("auto", "auto", True, False, True, ("cuda", "float32")),  # Flan-T5 never fp16
        ("auto", "auto", True, True, True, ("cuda", "bfloat16")),
        ("cpu", "auto", True, True, False, ("cpu", "float32")),
        ("cuda", "float32", True, True, False, ("cuda", "float32")),
        ("auto", "bfloat16", False, False, False, ("cpu", "bfloat16")),
    ],
)
def test_placement_policy(device, dtype, cuda, bf16, t5, expected):
    p = choose_placement(device, dtype, cuda_available=cuda, bf16_supported=bf16, is_t5=t5)
    assert (p.device, p.dtype) == expected


@pytest.mark.parametrize(
    "device,dtype,cuda,t5,fix",
    [("cuda", "auto", False, False, "--device cpu"), ("cpu", "float16", False, False, "--dtype float32"),
     ("cuda", "float16", True, True, "--dtype bfloat16"), ("tpu", "auto", False, False, "--device tpu is not one of auto, cpu, cuda"),
     ("auto", "int8", False, False, "--dtype int8 is not one of")],
)
def test_placement_refusals_name_the_fix(device, dtype, cuda, t5, fix):
    """Named as the caller passes them: `device='cpu'` from Python, `--device cpu` on the command line."""
    with pytest.raises(InvalidInputError) as refused:
        choose_placement(device, dtype, cuda_available=cuda, bf16_supported=cuda, is_t5=t5)
    option, value = fix.split(" ", 1)
    assert fix in refused.value.naming(option)
    keyword = f"{option[2:]}='{value.split(' ', 1)[0]}'"
    assert keyword in str(refused.value) and "--" not in str(refused.value)


# ------------------------------------------------------------------ text normalisation (LAVIS pre_caption)
@pytest.mark.parametrize(
    "raw,clean",
    [("A Woman and her DOG.", "a woman and her dog"), ('x!"()*#:;~y', "x y"), ("  many   spaces\n", "many spaces"),
     ("don't-stop, ok?", "don't-stop, ok?")],
)
def test_pre_caption(raw, clean):
    assert pre_caption(raw) == clean


def test_pre_caption_keeps_50_words():
    assert pre_caption(" ".join(f"w{i}" for i in range(80))).split() == [f"w{i}" for i in range(50)]


# ------------------------------------------------------------------ embeddings equal HF's forward
def test_text_embeddings_equal_hf_text_model_and_load_no_vit(tiny_itm_dir):
    from transformers import Blip2TextModelWithProjection

    enc = Blip2Encoder.load(str(tiny_itm_dir))
    ours = enc.embed_texts(TEXTS)
    assert enc.loaded_parts == ("text",)  # a text query does not load the ViT
    hf = Blip2TextModelWithProjection.from_pretrained(tiny_itm_dir).eval()
    tok = enc.tokenize(TEXTS)
    with torch.no_grad():
        ref = hf(**tok).text_embeds[:, 0, :].numpy()
    assert ours.shape == (len(TEXTS), 256) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_image_embeddings_equal_hf_vision_model(encoder, tiny_itm_dir):
    from transformers import Blip2VisionModelWithProjection

    ims = _images()
    ours = encoder.embed_images(ims)
    hf = Blip2VisionModelWithProjection.from_pretrained(tiny_itm_dir).eval()
    with torch.no_grad():
        ref = hf(pixel_values=encoder.preprocess(ims)).image_embeds.numpy()
    assert ours.shape == (len(ims), 32, 256) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=2), 1.0, atol=1e-5)  # each query vector
    assert np.ptp(ours[:, 0, 0]) > 1e-3  # the tiny model does tell the images apart


def test_image_path_makes_no_host_round_trip(encoder, monkeypatch):
    """ViT -> Q-Former -> projection reads no tensor value on the host (on a GPU that would be a sync that
    leaves the card idle while Python queues the Q-Former). An all-ones encoder mask did: transformers
    checks it with `.all()`."""
    px = encoder.preprocess(_images(3))
    encoder.full_model  # load outside the guarded block
    reads = []

    def host_read(name):
        def read(self, *a, **k):
            reads.append(name)
            raise AssertionError(f"host read of a tensor ({name}) in the image path")
        return read

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read(name))
    out = encoder.image_embeds(encoder.vit_tokens(px))
    monkeypatch.undo()
    assert reads == [] and out.shape == (3, 32, 256)
    with pytest.raises(AssertionError, match="host read"):  # the guard bites on the old call
        monkeypatch.setattr(torch.Tensor, "__bool__", host_read("__bool__"))
        m = encoder.full_model
        vit = encoder.vit_tokens(px)
        m.qformer(query_embeds=m.query_tokens.expand(3, -1, -1), encoder_hidden_states=vit, encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long))


def test_itc_equals_hf_retrieval_forward(encoder, hf_itm):
    ims = _images()
    img, txt = encoder.embed_images(ims), encoder.embed_texts(TEXTS)
    ours = np.einsum("nqd,td->ntq", img, txt).max(axis=2)
    tok = encoder.tokenize(TEXTS)
    with torch.no_grad():
        ref = hf_itm(pixel_values=encoder.preprocess(ims), **tok, use_image_text_matching_head=False).logits_per_image.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.ptp(ref) > 1e-2


def test_itm_from_stored_vit_tokens_equals_hf_forward(encoder, hf_itm):
    ims = _images()
    px = encoder.preprocess(ims)
    vit = encoder.vit_tokens(px).clone()  # stored once, reused for every text
    for text in TEXTS:
        tok = encoder.tokenize([text])
        n = len(ims)
        ids, mask = tok["input_ids"].expand(n, -1), tok["attention_mask"].expand(n, -1)
        ours = encoder.itm_logits(vit, ids, mask).numpy()
        with torch.no_grad():
            ref = hf_itm(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image.numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.ptp(ref[:, 1]) > 1e-2


def test_match_scores_combine_itm_logit_and_itc(encoder, hf_itm):
    ims = _images()
    s = encoder.score_images(TEXTS[0], ims)
    tok = encoder.tokenize([TEXTS[0]] * len(ims))
    px = encoder.preprocess(ims)
    with torch.no_grad():
        itm = hf_itm(pixel_values=px, **tok, use_image_text_matching_head=True).logits_per_image
        itc = hf_itm(pixel_values=px, **encoder.tokenize(TEXTS[:1]), use_image_text_matching_head=False).logits_per_image[:, 0]
    np.testing.assert_allclose(s.itm_logit, itm[:, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(s.match_probability, torch.softmax(itm, -1)[:, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(s.itc, itc.numpy(), atol=1e-5)
    np.testing.assert_allclose(s.score, s.itm_logit + s.itc, atol=1e-6)


def test_uint8_fast_input_equals_processor_on_resized_images(encoder):
    size = encoder.image_size
    resized = [im.resize((size, size), Image.BICUBIC) for im in _images()]
    arr = np.stack([np.asarray(im) for im in resized])
    np.testing.assert_allclose(encoder.pixels_from_uint8(arr).numpy(), encoder.preprocess(resized).numpy(), atol=1e-5)


@pytest.mark.parametrize("settings", [{"do_normalize": False}, {"do_rescale": False},
                                      {"image_mean": 0.5, "image_std": 0.25}])  # one value for all channels crashed (RuntimeError)
def test_uint8_fast_input_follows_a_processor_that_skips_a_step(tiny_itm_dir, tmp_path, settings):
    """Indexing's input path rescaled and normalised whatever the checkpoint's processor said: with either step off,
    a library's vectors came from other pixels than `embed_images` and `rerank` use (review)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    config = json.loads((model / "preprocessor_config.json").read_text())
    config.update(settings)
    (model / "preprocessor_config.json").write_text(json.dumps(config))
    enc = Blip2Encoder.load(str(model))
    resized = [im.resize((enc.image_size, enc.image_size), Image.BICUBIC) for im in _images()]
    arr = np.stack([np.asarray(im) for im in resized])
    np.testing.assert_allclose(enc.pixels_from_uint8(arr).numpy(), enc.preprocess(resized).numpy(), atol=1e-4, rtol=1e-6)


def test_text_model_is_dropped_when_full_model_loads(tiny_itm_dir):
    enc = Blip2Encoder.load(str(tiny_itm_dir))
    before = enc.embed_texts(TEXTS[:2])
    enc.embed_images(_images(2))
    assert enc.loaded_parts == ("full",)
    np.testing.assert_allclose(enc.embed_texts(TEXTS[:2]), before, atol=1e-6)


def test_models_load_from_several_threads_at_once(tiny_itm_dir, tiny_captioner_dir):
    """A threaded web backend's first requests load models side by side: transformers' `from_pretrained` patches
    module construction process-wide, so unguarded loads in two threads fail ("Cannot copy out of meta tensor")."""
    import threading

    want = {"itm": Blip2Encoder.load(str(tiny_itm_dir)).full_model.state_dict(),
            "cap": Blip2Captioner.load(str(tiny_captioner_dir)).model.state_dict()}
    errors, loaded = [], []

    def load(i):
        try:
            for _ in range(3):
                kind = "cap" if i % 2 else "itm"
                model = Blip2Captioner.load(str(tiny_captioner_dir)).model if i % 2 else Blip2Encoder.load(str(tiny_itm_dir)).full_model
                loaded.append((kind, model.state_dict()))
        except Exception as exc:  # noqa: BLE001 - the test reports whatever a thread raised
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(loaded) == 12
    for kind, state in loaded:
        assert all(torch.equal(state[k], v) for k, v in want[kind].items())


# ------------------------------------------------------------------ captions equal HF's generate
def test_captions_equal_hf_generate(tiny_captioner_dir):
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    cap = Blip2Captioner.load(str(tiny_captioner_dir), batch_size=2)
    ims = _images(5)
    ours = cap.caption(ims)
    hf = Blip2ForConditionalGeneration.from_pretrained(tiny_captioner_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_captioner_dir)
    with torch.no_grad():
        out = hf.generate(pixel_values=cap.preprocess(ims), max_new_tokens=30, min_new_tokens=1)
    ref = [" ".join(t.split()) for t in tok.batch_decode(out, skip_special_tokens=True)]
    assert ours == ref
    assert len(set(ours)) > 1


@pytest.fixture(scope="module")
def tiny_t5_captioner_dir(tmp_path_factory):
    from tiny_models import make_tiny_t5_captioner

    return make_tiny_t5_captioner(tmp_path_factory.mktemp("tiny-t5") / "model")


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_a_flan_t5_captioner_captions_as_hf_generate(tiny_t5_captioner_dir, prompt):
    """A blip2-flan-t5 captioner crashed on its first photo: transformers 5's T5Config has no `bos_token_id`, which
    the prompt builder read for every language model (AttributeError). Its captions now equal HF's `generate` on
    the inputs Blip2Processor makes (the image placeholders, then the prompt ending with </s>), both from pixels and
    from ViT blocks."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2Processor

    path = tiny_t5_captioner_dir
    cap = Blip2Captioner.load(str(path), batch_size=2, settings=CaptionSettings(prompt=prompt))
    assert cap.placement.dtype == "float32"
    ims = _images(4)
    ours = cap.caption(ims)
    hf = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    processor = Blip2Processor(image_processor=cap.image_processor, tokenizer=AutoTokenizer.from_pretrained(path), num_query_tokens=32)
    inputs = processor(images=ims, text=[prompt] * len(ims), return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=30, min_new_tokens=1)
    assert ours == [" ".join(t.split()) for t in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert len(set(ours)) > 1
    vision = cap.model.vision_model
    with torch.no_grad():
        blocks = vision.encoder(inputs_embeds=vision.embeddings(cap.preprocess(ims))).last_hidden_state
    assert cap.caption_vit(blocks) == ours


def test_beam_search_and_prompt(tiny_captioner_dir):
    cap = Blip2Captioner.load(str(tiny_captioner_dir), settings=CaptionSettings(num_beams=3, max_new_tokens=5, prompt="a photo of"))
    out = cap.caption(_images(2))
    assert len(out) == 2 and all(len(c.split()) <= 5 for c in out)
    assert not any(c.startswith("a photo of") for c in out)  # the prompt is not echoed


def test_a_caption_longer_than_the_language_model_reads_is_refused(tiny_captioner_dir):
    """OPT has learned positions (128 in the tiny one, 2,048 in blip2-opt-2.7b): an image (32 tokens), BOS, a prompt
    and max_new_tokens past them crashed generation with an IndexError. The longest that fits still captions."""
    cap = Blip2Captioner.load(str(tiny_captioner_dir))
    fits = CaptionSettings(prompt=" ".join(["dog"] * 66), max_new_tokens=30, min_new_tokens=30)  # 32 + 1 + 66 + 29 read = 128
    assert len(cap.with_settings(fits).caption(_images(1))) == 1  # 30 new tokens, some of them special (not shown)
    for settings, refusal in (
        (CaptionSettings(prompt=" ".join(["dog"] * 67), max_new_tokens=30, min_new_tokens=30),
         "but its 32 image tokens, BOS, a prompt of 67 tokens and max_new_tokens=30 need 129; pass max_new_tokens=29 or fewer, or a shorter prompt"),
        (CaptionSettings(max_new_tokens=500), "a prompt of 0 tokens and max_new_tokens=500 need 532; pass max_new_tokens=96 or fewer"),
        (CaptionSettings(prompt=" ".join(["dog"] * 100), max_new_tokens=5),
         "a prompt of 100 tokens and max_new_tokens=5 need 137; shorten the prompt to at most 95 tokens (with max_new_tokens=1)"),
    ):
        with pytest.raises(InvalidInputError, match=r"captioner .* reads at most 128 positions, .*" + re.escape(refusal)):
            cap.with_settings(settings).caption(_images(1))
    assert len(cap.with_settings(CaptionSettings(max_new_tokens=96)).caption(_images(1))) == 1  # the fix it names captions


def test_a_caption_longer_than_the_captioner_reads_names_the_options_on_the_command_line(tmp_path):
    """The refusal told a command-line user to "lower max_new_tokens" (and "caption prompt of 1 tokens" for no prompt)."""
    from click.testing import CliRunner

    from blip2_search.cli import main

    _images(1)[0].save(tmp_path / "a.png")
    refused = CliRunner().invoke(main, ["caption", str(tmp_path / "a.png"), "--captioner", "demo", "--max-new-tokens", "40"])
    assert refused.exit_code == 2, refused.output
    assert ("captioner 'demo' reads at most 64 positions, but its 32 image tokens, BOS, a prompt of 0 tokens and --max-new-tokens 40 "
            "need 72; pass --max-new-tokens 32 or fewer") in refused.output
    done = CliRunner().invoke(main, ["caption", str(tmp_path / "a.png"), "--captioner", "demo", "--max-new-tokens", "32"])
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_a_prompt_with_special_token_text_is_captioned_as_text(tiny_captioner_dir, tiny_t5_captioner_dir, kind):
    """A prompt holding "<image>" was tokenised as the image token: more image slots than the 32 queries, and
    generation failed with a RuntimeError (masked_scatter). Such text is now the prompt's words."""
    cap = Blip2Captioner.load(str(tiny_captioner_dir if kind == "opt" else tiny_t5_captioner_dir),
                              settings=CaptionSettings(prompt="a photo of <image> </s>", max_new_tokens=5))
    assert len(cap.caption(_images(2))) == 2
    ids = cap._prompt_ids(1, cap.settings)[0].tolist()
    assert ids.count(cap.model.config.image_token_index) == 32


def test_caption_settings_refuse_nonsense():
    with pytest.raises(InvalidInputError, match="num_beams=0 must be >= 1; pass num_beams=1"):
        CaptionSettings(num_beams=0)


@pytest.mark.parametrize("refused, python, option, command", [
    (lambda tmp: CaptionSettings(num_beams=0), "num_beams=0 must be >= 1; pass num_beams=1 for", "--beams", "--beams 0 must be >= 1; pass --beams 1 for"),
    (lambda tmp: resolve_model(str(tmp / "nope")), "; pass model with an existing directory", "--model", "; pass --model with an existing"),
    (lambda tmp: resolve_model("", role="captioner"), "; pass captioner with a hub id", "--captioner", "; pass --captioner with a hub id"),
    (lambda tmp: indexing_batch_size(-1, "cpu", captions=False), "; pass batch_size=0 (auto)", "--batch-size", "; pass --batch-size 0 (auto)"),
    (lambda tmp: compact_factory(1000, 12), "; use vector_index='exact' for this model", "--vector-index", "; use --vector-index exact for this model"),
])
def test_model_and_index_refusals_name_the_keyword_for_python_and_the_option_for_the_cli(tmp_path, refused, python, option, command):
    """These said "pass --beams 1", "pass --model", "pass --batch-size 0", "use --vector-index exact" to Python callers."""
    with pytest.raises((InvalidInputError, ModelNotFoundError)) as caught:
        refused(tmp_path)
    assert python in str(caught.value) and "--" not in str(caught.value)
    assert command in caught.value.naming(option)


# ------------------------------------------------------------------ loading errors
def test_missing_directory_names_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="pass model with an existing directory"):
        resolve_model(str(tmp_path / "nope"))


def test_uncached_hub_id_offline_names_the_fixes(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("Salesforce/blip2-itm-vit-g")
    msg = str(err.value)
    assert "Salesforce/blip2-itm-vit-g" in msg and "pass model=PATH to a local copy" in msg and "HF_HUB_OFFLINE" in msg and "HF cache" in msg


def test_a_cached_hub_snapshot_without_safetensors_is_refused_with_the_fix(monkeypatch, tmp_path, tiny_itm_dir):
    """A hub repository with only .bin weights (never fetched: `_HUB_FILES`) or a download cut short left a snapshot
    without weights, refused only at the first model use as "no file named model.safetensors found in directory"."""
    import shutil

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_itm_dir, snapshot)
    (snapshot / "model.safetensors").unlink()
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # read at import, not from the environment
    with pytest.raises(ModelLoadError, match=r"captioner model 'org/tiny' has no .safetensors weights in its HF cache snapshot .*abc123: "
                       r"the download was cut short, or .* only pickled .bin weights.* download it again with `hf download org/tiny`, "
                       r"or pass captioner with a local copy"):
        resolve_model("org/tiny", role="captioner")
    shutil.copy(tiny_itm_dir / "model.safetensors", snapshot)
    assert resolve_model("org/tiny").revision == "abc123"


def test_a_cached_snapshot_without_weights_fetches_them_when_online(monkeypatch, tmp_path, tiny_itm_dir):
    """A snapshot holding only configs (fetched by another tool, e.g. AutoProcessor.from_pretrained) was refused as a
    download cut short also when online, where the weights could simply be fetched. The hub is faked at
    `snapshot_download` (no network here): online it adds the weights, as the real download would."""
    import shutil

    import huggingface_hub

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_itm_dir, snapshot)
    (snapshot / "model.safetensors").unlink()
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    cached_only, online = huggingface_hub.snapshot_download, []

    def hub(name, *, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            return cached_only(name, allow_patterns=allow_patterns, local_files_only=True, **kw)
        online.append(name)
        if reachable:
            shutil.copy(tiny_itm_dir / "model.safetensors", snapshot)
            return str(snapshot)
        raise OSError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    reachable = False  # offline in practice: the cached snapshot is refused for the weights it lacks, not as absent
    with pytest.raises(ModelLoadError, match=r"has no .safetensors weights in its HF cache snapshot"):
        resolve_model("org/tiny")
    reachable = True
    assert resolve_model("org/tiny").revision == "abc123" and online == ["org/tiny", "org/tiny"]
    assert (snapshot / "model.safetensors").exists()


def test_directory_without_config_or_safetensors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"captioner model directory .* has no .safetensors weights; put the weights .*pass captioner with a directory"):
        resolve_model(str(tmp_path), role="captioner")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    # the fix named for a .bin-only folder (as many fine-tunes are saved): save_pretrained writes safetensors in transformers 5
    with pytest.raises(ModelLoadError, match=r"embedder model directory .* has only pickled .bin weights, which are not loaded .*"
                       r"from_pretrained, save it with save_pretrained \(which writes .safetensors\) beside its tokenizer and preprocessor "
                       r"files, and pass model with that directory"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("config,refusal", [
    ({"model_type": "clip", "architectures": ["CLIPModel"]}, r"model .* is a 'clip' checkpoint, not BLIP-2; pass model='Salesforce/blip2-itm-vit-g'"),
    ({"model_type": "bert", "architectures": ["BertModel"]}, r"model .* is a 'bert' checkpoint, not BLIP-2; pass model="),
    ({"architectures": ["Blip2ForImageTextRetrieval"]},  # was "is a None checkpoint"
     r"model .* has a config.json that names no model_type, not BLIP-2; pass model='Salesforce/blip2-itm-vit-g'"),
])
def test_a_checkpoint_of_another_kind_is_refused_as_embedder(tmp_path, config, refusal):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=refusal):
        Blip2Encoder.load(str(tmp_path))


def test_generation_checkpoint_is_refused_as_embedder(tiny_captioner_dir):
    with pytest.raises(ModelLoadError, match="Blip2ForImageTextRetrieval"):
        Blip2Encoder.load(str(tiny_captioner_dir))


def test_embedder_checkpoint_is_refused_as_captioner(tiny_itm_dir):
    with pytest.raises(ModelLoadError, match="pass captioner='Salesforce/blip2-opt-2.7b'"):
        Blip2Captioner.load(str(tiny_itm_dir))


def test_revision_fingerprint_changes_with_weights(tmp_path):
    from tiny_models import make_tiny_itm

    a = resolve_model(str(make_tiny_itm(tmp_path / "a", seed=1)))
    b = resolve_model(str(make_tiny_itm(tmp_path / "b", seed=2)))
    assert a.revision != b.revision and a.revision == resolve_model(str(tmp_path / "a")).revision


def test_the_fingerprint_sees_a_tensor_retrained_in_the_middle_of_the_weights(tmp_path):
    """The older fingerprint read the first and last MiB of each file: a fine-tune of tensors between them (at
    multi-GB, nearly all: Q-Former, heads, projections) kept it, and a library searched old vectors with new
    weights (review). Every tensor's edges are hashed now."""
    from safetensors.torch import save_file

    from blip2_search.models.loading import legacy_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    tensors = {"a.weight": torch.zeros(2**19), "b.projection": torch.randn(256, 16), "c.weight": torch.zeros(2**19)}
    save_file(tensors, model / "model.safetensors")  # b's bytes lie 2 MiB into a 4 MiB file
    before = resolve_model(str(model))
    tensors["b.projection"] = -tensors["b.projection"]  # retrained: another value in every byte, same shape and place
    save_file(tensors, model / "model.safetensors")
    after = resolve_model(str(model))
    assert legacy_fingerprint(model) == after.older_revisions[-1] == before.older_revisions[-1]  # the older one missed it
    assert after.revision != before.revision and after.revision.startswith("files:")
    assert resolve_model(str(model)).revision == after.revision  # and it is stable


def _edited(path, name, **settings):
    """Set `settings` in the JSON file `name` of checkpoint `path`."""
    config = json.loads((path / name).read_text())
    config.update(settings)
    (path / name).write_text(json.dumps(config))


@pytest.mark.parametrize("name,settings", [("preprocessor_config.json", {"image_mean": [0.5, 0.5, 0.5]}),
                                           ("preprocessor_config.json", {"resample": 2}),
                                           ("tokenizer_config.json", {"do_lower_case": False})])
def test_the_fingerprint_sees_the_processor_and_tokenizer_files(tiny_itm_dir, tmp_path, name, settings):
    """The fingerprint covered the config and the weights only: an edited image mean, resample or tokenizer changes
    every vector, yet the library took the files for the model that made its vectors and mixed old and new (review)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    before = resolve_model(str(model))
    _edited(model, name, **settings)
    after = resolve_model(str(model))
    assert after.revision != before.revision and after.revision.startswith("files:")
    assert after.older_revisions == before.older_revisions  # the weights are the same: older fingerprints missed it


def _indexed_library(model_dir, tmp_path):
    """A library indexed with a copy of `model_dir`: (model copy, photo folder, library folder)."""
    import shutil

    from blip2_search.library import Library

    model, photos = tmp_path / "model", tmp_path / "photos"
    shutil.copytree(model_dir, model)
    photos.mkdir()
    for i, im in enumerate(_images(4)):
        im.save(photos / f"{i}.png")
    with Library.open(tmp_path / "lib", model=str(model), captioner=False, create=True) as lib:
        assert lib.index([photos]).indexed == 4
    return model, photos, tmp_path / "lib"


def test_a_library_recorded_under_the_weights_fingerprint_adopts_the_new_one_without_reembedding(tiny_itm_dir, tmp_path):
    """Libraries recorded a local model's revision as `weights_fingerprint` (no processor or tokenizer files) until
    `fingerprint` covered them: where the files still give it, the library records the new one and keeps its
    vectors; a real change after that is a change."""
    from blip2_search.errors import ModelMismatchError
    from blip2_search.library import Library
    from blip2_search.models.loading import weights_fingerprint
    from blip2_search.store import EmbedderInfo, ModelRef, updates

    model, photos, lib_dir = _indexed_library(tiny_itm_dir, tmp_path)
    with Library.open(lib_dir) as lib:
        new = lib.metadata.info().embedder
        old = EmbedderInfo(ModelRef(new.model.model_id, weights_fingerprint(model)), new.num_query_tokens, new.dim)
        with lib.metadata._write() as connection:
            updates.write_embedder(connection, old)
    _images(6, seed=3)[0].save(photos / "later.png")
    with Library.open(lib_dir) as lib:
        report = lib.index([photos])
        assert report.indexed == 1 and lib.metadata.pending_count() == 0  # the new photo only: nothing re-embedded
        assert lib.metadata.info().embedder == new and lib.metadata.info().embedder.model.revision.startswith("files:")
        assert len(lib.search("a red circle", 5, rerank=False).hits) == 5
    _edited(model, "preprocessor_config.json", image_mean=[0.5, 0.5, 0.5])
    with Library.open(lib_dir) as lib:
        with pytest.raises(ModelMismatchError, match=re.escape("re-embed every image (Library.open(FOLDER, reembed=True).index(PHOTO_DIRS)), "
                                                               "or restore the original model files")):
            lib.search("a red circle", 3, rerank=False)


def test_index_refuses_a_library_whose_model_preprocessor_changed_until_reembed(tiny_itm_dir, tmp_path):
    """What `index` does for a changed embedder (docs/cli.md), end to end: an edited image mean is one; --reembed
    re-embeds every photo with the files as they are now."""
    from click.testing import CliRunner

    from blip2_search.cli import main
    from blip2_search.library import Library

    model, photos, lib_dir = _indexed_library(tiny_itm_dir, tmp_path)
    _edited(model, "preprocessor_config.json", image_mean=[0.5, 0.5, 0.5])
    refused = CliRunner().invoke(main, ["index", str(photos), "--library", str(lib_dir)])
    assert refused.exit_code != 0 and "whose files have changed since" in refused.output, refused.output
    assert "restore the original model files, or re-embed every image (index PHOTO_DIR... --reembed)" in refused.output  # not "use the library's model"
    done = CliRunner().invoke(main, ["index", str(photos), "--library", str(lib_dir), "--reembed", "--json"])
    assert done.exit_code == 0 and json.loads(done.stdout)["indexed"] == 4, done.output
    with Library.open(lib_dir) as lib:
        assert lib.metadata.info().embedder.model.revision == resolve_model(str(model)).revision
        assert len(lib.search("a red circle", 4, rerank=False).hits) == 4


def _grey_levels(pixel_values, enc):
    """Normalised pixel_values `[n, 3, S, S]` back in 0-255 grey levels (to compare with the decode tests' bounds)."""
    proc = enc.image_processor
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) for v in (proc.image_std, proc.image_mean))
    return ((pixel_values * std + mean) / proc.rescale_factor).numpy()


def test_a_checkpoint_whose_processor_resizes_bilinear_is_decoded_bilinear(tiny_itm_dir, tmp_path):
    """Indexing resized with bicubic whatever the checkpoint's processor said: a fine-tuned checkpoint whose
    preprocessor_config.json says bilinear (resample 2) had its library made from other pixels than its own
    processor makes (`embed_images`, the LAVIS protocol). Both decode paths and the library now follow it."""
    import shutil

    from blip2_search.images import decode_for_model, open_image
    from blip2_search.library import Library

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    _edited(model, "preprocessor_config.json", resample=2)
    enc = Blip2Encoder.load(str(model))
    assert enc.image_input == (32, 2)
    rng = np.random.default_rng(4)
    for side, bound in ((80, 0.0), (640, 0.6)):  # 640 px: the fast path drafts and pre-reduces (the decode tests' bound)
        path = tmp_path / f"photo{side}.jpg"
        Image.fromarray(rng.integers(0, 255, (side * 3 // 4, side, 3), dtype=np.uint8)).save(path, quality=95)
        reference = _grey_levels(enc.preprocess([open_image(path)]), enc)
        for fast in (False, True):
            pixels = _grey_levels(enc.pixels_from_uint8(decode_for_model(path, *enc.image_input, fast=fast).pixels[None]), enc)
            error = np.abs(pixels - reference).mean()
            assert error < (bound if fast else 0.0) + 1e-3, (side, fast, error)  # bicubic: 3.7 grey levels at 80 px

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(_images(4)):
        im.save(photos / f"{i}.png")
    with Library.open(tmp_path / "lib", model=str(model), captioner=False, create=True) as lib:
        lib.index([photos])
        records = sorted(lib.metadata.get_records(range(1, 5)), key=lambda r: r.path)
        fresh = lib.encoder.embed_images([open_image(r.path) for r in records])
        np.testing.assert_allclose(lib.metadata.vectors_for([r.id for r in records]), fresh, atol=1e-4)


@pytest.mark.parametrize("resample", [None, 99, "bicubic"])
def test_a_resample_the_decode_cannot_honour_is_refused_at_load(tiny_itm_dir, tmp_path, resample):
    """transformers resizes with bilinear for a filter it does not know ("bicubic" as text): refused with the fix,
    before any photo is decoded, not followed silently."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    _edited(model, "preprocessor_config.json", resample=resample)
    with pytest.raises(ModelLoadError, match=rf"sets resample {re.escape(repr(resample))}, not a PIL resampling filter.*set its "
                       r'"resample" to 3 \(bicubic, as BLIP-2\)'):
        Blip2Encoder.load(str(model)).image_input


@pytest.mark.parametrize("settings,refusal", [
    ({"do_resize": False}, r"sets do_resize false, so photos would reach its ViT at their own size, but it reads 32 x 32 pixels; "
                           r'put the preprocessor_config.json that came with this checkpoint beside it, or set its "do_resize" to true'),
    ({"do_center_crop": True, "crop_size": {"height": 16, "width": 16}},
     r"its image processor makes 16x16 pixel inputs, not the 32 x 32 photo it resizes to .*put the preprocessor_config.json"),
])
@pytest.mark.parametrize("kind", ["embedder", "captioner"])
def test_a_processor_whose_pixels_the_decode_cannot_make_is_refused(tiny_itm_dir, tiny_captioner_dir, tmp_path, settings, refusal, kind):
    """Indexing resizes every photo to S x S whatever the processor says, but with do_resize false (or a center crop)
    the processor handed `embed_images`, `rerank` and captions the photo at its own size (or a crop): inputs other
    than the library's vectors were made from, or a ViT input of the wrong size (review)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_captioner_dir if kind == "captioner" else tiny_itm_dir, model)
    _edited(model, "preprocessor_config.json", **settings)
    checkpoint = (Blip2Captioner if kind == "captioner" else Blip2Encoder).load(str(model))
    with pytest.raises(ModelLoadError, match=refusal):
        checkpoint.image_input
    with pytest.raises(ModelLoadError, match=refusal):
        checkpoint.preprocess(_images(1))


def test_a_query_longer_than_the_qformer_positions_is_cut_to_them(tiny_itm_dir, tmp_path):
    """A Q-Former with fewer text positions than the 35 tokens LAVIS reads (16 here) failed on a long query with a
    RuntimeError (tensor sizes 35 vs 16); a query is now cut to its positions, and `cut_short` says where."""
    import shutil

    from safetensors.torch import load_file, save_file
    from tiny_models import WORDS

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["qformer_config"]["max_position_embeddings"] = 16
    (model / "config.json").write_text(json.dumps(config))
    tensors = load_file(model / "model.safetensors")
    tensors["embeddings.position_embeddings.weight"] = tensors["embeddings.position_embeddings.weight"][:16].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    enc = Blip2Encoder.load(str(model))
    long = " ".join(WORDS)  # 24 words, one token each
    assert enc.embed_texts([long]).shape == (1, enc.embed_dim)
    assert enc.score_images(long, _images(1)).itm_logit.shape == (1,)
    assert enc.tokenize([long])["input_ids"].shape[1] == 16
    assert enc.cut_short(long) == " ".join(WORDS[10:14])  # [CLS], 14 words, [SEP]
    assert enc.cut_short(" ".join(WORDS[:14])) is None


def test_a_query_tokenised_while_another_thread_checks_a_length_is_cut_to_max_tokens(tiny_itm_dir):
    """HF's fast tokenizer keeps the truncation of its last call, set before it encodes: a query tokenised while another
    thread's `cut_short` (which asks for max_tokens + 1) ran between the two was cut to 36 tokens, past a Q-Former of
    35 positions (a RuntimeError) and off LAVIS's 35 for the others. The other thread runs exactly there."""
    import threading

    from tiny_models import WORDS

    enc = Blip2Encoder.load(str(tiny_itm_dir))
    tokenizer, query = enc.tokenizer, " ".join(WORDS * 2)  # 48 words, one token each
    set_truncation, here = tokenizer.set_truncation_and_padding, threading.current_thread()
    query_set, other_done = threading.Event(), threading.Event()

    def set_then_let_the_other_thread_run(*args, **kwargs):
        set_truncation(*args, **kwargs)
        if threading.current_thread() is here and not query_set.is_set():
            query_set.set()
            other_done.wait(1.0)  # with the fix the other thread waits for this one instead

    def other():
        query_set.wait(10)
        assert enc.cut_short("a dog") is None  # its only call asks for 36 tokens
        other_done.set()

    tokenizer.set_truncation_and_padding = set_then_let_the_other_thread_run
    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert enc.tokenize([query])["input_ids"].shape[1] == enc.max_tokens == 35
    finally:
        thread.join(10)
    assert other_done.is_set()


def test_a_refused_processor_setting_names_the_file_transformers_read_it_from(tmp_path):
    """A checkpoint saved by transformers 5 (the demo ones) keeps its image processor in processor_config.json too,
    which transformers reads first; the refusal named preprocessor_config.json, where the fix it gave changed nothing."""
    import shutil

    from blip2_search.demo import ITM_DIR

    model = tmp_path / "model"
    shutil.copytree(ITM_DIR, model)
    _edited(model, "preprocessor_config.json", resample=99)  # not the file transformers reads here
    assert Blip2Encoder.load(str(model)).image_input == (64, 3)
    processor = json.loads((model / "processor_config.json").read_text())
    processor["image_processor"]["resample"] = 99
    (model / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ModelLoadError, match=re.escape('its processor_config.json ("image_processor") sets resample 99, not a PIL resampling '
                                                       "filter, so photos cannot be resized as the model was trained; put the "
                                                       "processor_config.json that came with this checkpoint beside it")):
        Blip2Encoder.load(str(model)).image_input


def test_tiny_tokenizer_knows_its_words(encoder):
    ids = encoder.tokenize(["a red circle"])["input_ids"][0].tolist()
    assert encoder.tokenizer.unk_token_id not in ids and ids[0] == encoder.tokenizer.cls_token_id


def test_indexing_batch_size_auto_and_explicit():
    assert indexing_batch_size(0, "cpu", captions=False) == 32
    assert indexing_batch_size(0, "cuda", captions=False) == 256
    assert indexing_batch_size(0, "cuda", captions=True) == 32
    assert indexing_batch_size(7, "cuda", captions=False) == 7
    with pytest.raises(InvalidInputError, match="pass batch_size=0"):
        indexing_batch_size(-1, "cpu", captions=False)


def test_library_resolves_the_auto_batch_size(tiny_itm_dir, tmp_path):
    from blip2_search.library import Library

    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        assert lib.batch_size == 0 and lib.encoder.batch_size == 32  # CPU
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, batch_size=5) as lib:
        assert lib.encoder.batch_size == 5


def test_qformer_dtype_follows_the_placement(tiny_itm_dir):
    """What policy.Placement documents: the Q-Former is bf16 under bf16, fp32 under fp16 (HF keeps it)."""
    from transformers import Blip2ForImageTextRetrieval

    for dtype, qformer in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        model = Blip2ForImageTextRetrieval.from_pretrained(tiny_itm_dir, dtype=dtype)
        assert next(model.qformer.parameters()).dtype == qformer and model.vision_model.embeddings.patch_embedding.weight.dtype == dtype


def test_a_preprocessor_for_another_input_size_than_the_vit_is_refused(tiny_itm_dir, tmp_path):
    """HF slices the position embeddings to the input's length, so a 32 px input to a ViT built for 48 px runs
    without error on the wrong positions (review: cosine 0.897 to the right embedding). A -coco model (364 px)
    with a 224 px preprocessor copied beside it would do that silently."""
    import json
    import shutil

    from blip2_search.errors import ModelLoadError

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["vision_config"]["image_size"] = 48
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"resizes photos to 32 px but its ViT was built for 48 px.*preprocessor_config.json"):
        Blip2Encoder.load(str(model)).image_size


def test_a_query_with_special_token_text_is_embedded_as_text(tiny_itm_dir, tmp_path):
    """A tokenizer saved by a Blip2Processor with num_query_tokens holds "<image>" as an added special token whose
    id is past the Q-Former's vocabulary: a query containing it crashed the text model (IndexError)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(model)
    enc = Blip2Encoder.load(str(model))
    vocab = json.loads((model / "config.json").read_text())["qformer_config"]["vocab_size"]
    assert enc.tokenizer.convert_tokens_to_ids("<image>") >= vocab
    vectors = enc.embed_texts(["a photo of <image>", "a photo of [sep] x"])
    assert vectors.shape == (2, enc.embed_dim) and np.isfinite(vectors).all()
    assert enc.tokenize(["<image>"])["input_ids"].max() < vocab


def _without_tensors(src, dst, prefix):
    """A copy of checkpoint `src` whose safetensors lack every tensor named `prefix*` (as from an interrupted save)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = {k: v for k, v in load_file(dst / "model.safetensors").items() if not k.startswith(prefix)}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("prefix", ["itm_head.", "text_projection.", "query_tokens"])
def test_a_checkpoint_missing_weights_is_refused_not_run_with_random_ones(tiny_itm_dir, tmp_path, prefix):
    """transformers fills tensors absent from the files with random values and only logs it: a checkpoint without
    its ITM head ranked photos by noise, with no error (review)."""
    model = _without_tensors(tiny_itm_dir, tmp_path / "model", prefix)
    with pytest.raises(ModelLoadError, match=rf"lacks \d+ weights? .*\(e\.g\. {prefix}.*download or save the checkpoint again"):
        enc = Blip2Encoder.load(str(model))
        enc.embed_texts(["a dog"])
        enc.score_images("a dog", _images(1))


@pytest.mark.parametrize("use", ["text", "images"])
def test_weights_of_another_shape_than_the_config_are_refused_by_name(tiny_itm_dir, tmp_path, use):
    """A Q-Former of another width than config.json says (its config swapped for another checkpoint's) was refused
    with transformers' own text, which names no tensor and points at a report the command line never shows."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["qformer_config"]["hidden_size"] = 48  # the files hold a 32-wide Q-Former
    (model / "config.json").write_text(json.dumps(config))
    enc = Blip2Encoder.load(str(model))
    with pytest.raises(ModelLoadError, match=r"model .* has \d+ weights of another shape than its config.json builds \(e\.g\. "
                       r"\S+: \d+x32 in the files, \d+x48 in the config\), so they would be random; put the config.json that came "
                       r"with these weights beside them"):
        enc.embed_texts(["a dog"]) if use == "text" else enc.embed_images(_images(1))


def test_sharded_and_half_precision_checkpoints_load_as_saved(tiny_itm_dir, tmp_path, encoder):
    """As the hub holds them: weights in shards with an index json (blip2-opt-2.7b), or saved in fp16/bf16. Shards give
    the very vectors of one file, and each shard counts in the revision; half-precision weights run in fp32 here."""
    import shutil

    from transformers import Blip2ForImageTextRetrieval

    hf = Blip2ForImageTextRetrieval.from_pretrained(tiny_itm_dir)
    ims = _images(2)
    for name, dtype, tolerance in (("sharded", torch.float32, 0.0), ("fp16", torch.float16, 1e-3), ("bf16", torch.bfloat16, 1e-2)):
        model = tmp_path / name
        shutil.copytree(tiny_itm_dir, model)
        (model / "model.safetensors").unlink()
        hf.to(dtype).save_pretrained(model, max_shard_size="100KB" if name == "sharded" else "50GB")
        enc = Blip2Encoder.load(str(model))
        assert enc.placement.dtype == "float32"
        np.testing.assert_allclose(enc.embed_texts(TEXTS), encoder.embed_texts(TEXTS), atol=tolerance)
        np.testing.assert_allclose(enc.embed_images(ims), encoder.embed_images(ims), atol=tolerance)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert resolve_model(str(tmp_path / "sharded")).revision != resolve_model(str(tmp_path / "fp16")).revision


def test_a_captioner_missing_weights_is_refused(tiny_captioner_dir, tmp_path):
    model = _without_tensors(tiny_captioner_dir, tmp_path / "model", "language_projection.")
    with pytest.raises(ModelLoadError, match=r"captioner .* lacks 2 weights .*language_projection.*pass another captioner"):
        Blip2Captioner.load(str(model)).caption(_images(1))


def test_a_weights_file_cut_short_is_a_model_load_error(tiny_itm_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download or copy
    with pytest.raises(ModelLoadError, match="could not load .* check the checkpoint files"):
        Blip2Encoder.load(str(model)).embed_texts(["a dog"])


@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)])
@pytest.mark.parametrize("kind", ["embedder", "captioner"])
def test_a_checkpoint_without_its_tokenizer_is_refused(tiny_itm_dir, tiny_captioner_dir, tmp_path, kind, keep):
    """transformers 5 makes an empty tokenizer for a folder without tokenizer files (a GPT-2 one with no vocabulary; with
    only tokenizer_config.json a BERT one with only its special tokens): the captioner wrote "" for every photo and the
    embedder read every query as [UNK]s, with no error (review)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_captioner_dir if kind == "captioner" else tiny_itm_dir, model)
    for f in model.glob("tokenizer*.json"):
        if f.name not in keep:
            f.unlink()
    with pytest.raises(ModelLoadError, match=r"(tokenizer that knows no words|tokenizer could not be loaded).*put the tokenizer files that came with this checkpoint"):
        if kind == "captioner":
            Blip2Captioner.load(str(model)).caption(_images(2))
        else:
            Blip2Encoder.load(str(model)).embed_texts(["a dog"])


def test_a_damaged_tokenizer_file_is_a_model_load_error(tiny_itm_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordPiece"}}))
    with pytest.raises(ModelLoadError, match=r"its tokenizer could not be loaded .*put the tokenizer files"):
        Blip2Encoder.load(str(model)).embed_texts(["a dog"])


def test_a_missing_or_damaged_preprocessor_or_config_is_a_model_load_error(tiny_itm_dir, tmp_path):
    """These escaped as OSError / JSONDecodeError, so the CLI printed a traceback (the OSError's text pointing at the hub)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    (model / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"image preprocessor could not be loaded \(it has no preprocessor_config.json\); put the "):
        Blip2Encoder.load(str(model)).embed_images(_images(1))
    (model / "preprocessor_config.json").write_text('{"size": ')
    with pytest.raises(ModelLoadError, match="image preprocessor could not be loaded .*put the preprocessor_config.json"):
        Blip2Encoder.load(str(model)).embed_images(_images(1))
    for text in ('{"model_type": "blip-2", ', "[]"):
        (model / "config.json").write_text(text)
        with pytest.raises(ModelLoadError, match="config.json .*put the config.json that came with this checkpoint"):
            Blip2Encoder.load(str(model))


def test_a_model_that_cannot_size_its_input_is_a_model_error_not_every_image_failing(tiny_itm_dir, tmp_path):
    """The image-size check ran inside the per-image error handling: `rerank` returned no hits and the same model
    message as the error of every image, and a search's rerank noted its candidates as 'file missing or unreadable'."""
    import shutil

    import blip2_search
    from blip2_search.search.rerank import RecomputeVit, rerank_hits
    from blip2_search.search.results import Hit

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["vision_config"]["image_size"] = 48  # its preprocessor resizes to 32
    (model / "config.json").write_text(json.dumps(config))
    photo = tmp_path / "a.png"
    _images(1)[0].save(photo)
    with pytest.raises(ModelLoadError, match="resizes photos to 32 px but its ViT was built for 48 px"):
        blip2_search.rerank("a dog", [str(photo), str(photo)], model=str(model))
    enc = Blip2Encoder.load(str(model))
    hits = [Hit(i, str(photo), 0.5, 0.5, None, None, None) for i in range(2)]
    with pytest.raises(ModelLoadError, match="resizes photos to 32 px"):
        rerank_hits(enc, RecomputeVit(enc), "a dog", hits)


def test_a_preprocessor_that_keeps_the_aspect_is_refused(tiny_itm_dir, tmp_path):
    """{"shortest_edge": S} was taken as the model's side, but the processor then kept each photo's aspect: a
    non-square photo crashed the ViT with a tensor-size RuntimeError (review)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_itm_dir, model)
    config = json.loads((model / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 32}
    (model / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"does not resize photos to a square \(size shortest_edge=32\).*put the preprocessor_config.json"):
        Blip2Encoder.load(str(model)).image_size


def test_every_image_path_checks_the_preprocessor_against_the_vit(tmp_path):
    """Only `image_size` checked it, which indexing reads but `embed_images`, `score_images` and `evaluate` (the
    processor's path) do not: a 32 px preprocessor beside a ViT built for 48 px gave embeddings from the wrong
    position embeddings, silently (review)."""
    from tiny_models import _image_processor, make_tiny_itm

    model = make_tiny_itm(tmp_path / "model", image_size=48)
    _image_processor(32).save_pretrained(model)
    for use in (lambda enc: enc.embed_images(_images(1)), lambda enc: enc.score_images("a dog", _images(1))):
        with pytest.raises(ModelLoadError, match="resizes photos to 32 px but its ViT was built for 48 px"):
            use(Blip2Encoder.load(str(model)))
