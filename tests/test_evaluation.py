"""The LAVIS retrieval protocol against a brute-force computation with HF's own forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from blip2_search.cli import main
from blip2_search.errors import InvalidInputError
from blip2_search.evaluation import EvalSplit, evaluate, load_annotations, recall_at
from blip2_search.models import Blip2Encoder

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "left", "right", "top", "bottom"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(7)
    rows = []
    for i in range(12):
        (d / "sub").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24 + i, 36, 3), dtype=np.uint8)).save(d / "sub" / f"{i}.png")
        caps = [" ".join(rng.choice(WORDS, 3)) for _ in range(2)]
        rows.append({"image": f"sub/{i}.png", "caption": caps})
    rows.append({"image": "sub/0.png", "caption": "a red square"})  # a single string caption, same image again
    ann = d / "ann.json"
    ann.write_text(json.dumps(rows))
    return d, ann


def _brute_force(model_dir, data: EvalSplit, k: int):
    """Every pair through HF's forward; rerank restricted to each query's ITC top k; ranks by plain loops."""
    from transformers import Blip2ForImageTextRetrieval

    enc = Blip2Encoder.load(str(model_dir))
    hf = Blip2ForImageTextRetrieval.from_pretrained(model_dir).eval()
    px = enc.preprocess([Image.open(p).convert("RGB") for p in data.images])  # as LAVIS reads them
    n_i, n_t = len(data.images), len(data.texts)
    itc = np.zeros((n_i, n_t))
    itm = np.zeros((n_i, n_t))
    with torch.no_grad():
        for t, text in enumerate(data.texts):
            tok = enc.tokenize([text])
            itc[:, t] = hf(pixel_values=px, **tok, use_image_text_matching_head=False).logits_per_image[:, 0].numpy()
            tok_n = {key: v.expand(n_i, -1) for key, v in tok.items()}
            itm[:, t] = hf(pixel_values=px, **tok_n, use_image_text_matching_head=True).logits_per_image[:, 1].numpy()

    def recalls(score_rows, gold_of_row):
        ranks = []
        for r, row in enumerate(score_rows):
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))
            ranks.append(min(order.index(g) for g in gold_of_row(r)))
        ranks = np.array(ranks)
        return [100.0 * np.mean(ranks < x) for x in (1, 5, 10)]

    owner = np.array(data.text_image)
    gold_i2t = lambda i: [t for t in range(n_t) if owner[t] == i]  # noqa: E731
    gold_t2i = lambda t: [owner[t]]  # noqa: E731
    itc_fig = recalls(itc, gold_i2t) + recalls(itc.T, gold_t2i)
    i2t = np.full((n_i, n_t), -100.0)
    for i in range(n_i):
        top = sorted(range(n_t), key=lambda j: (-itc[i, j], j))[:k]
        i2t[i, top] = itm[i, top] + itc[i, top]
    t2i = np.full((n_t, n_i), -100.0)
    for t in range(n_t):
        top = sorted(range(n_i), key=lambda j: (-itc[j, t], j))[:k]
        t2i[t, top] = itm[top, t] + itc[top, t]
    return itc_fig, recalls(i2t, gold_i2t) + recalls(t2i, gold_t2i)


def test_lavis_annotations_merge_rows_and_accept_string_captions(split):
    d, ann = split
    data = load_annotations(ann, d)
    assert len(data.images) == 12 and len(data.texts) == 25
    assert data.text_image[-1] == 0 and data.texts[-1] == "a red square"


def test_karpathy_format_reads_the_split(tmp_path, split):
    d, _ = split
    k = {"images": [
        {"filepath": "sub", "filename": "1.png", "split": "test", "sentences": [{"raw": "A red circle."}]},
        {"filepath": "sub", "filename": "2.png", "split": "train", "sentences": [{"raw": "x"}]},
    ]}
    (tmp_path / "dataset_x.json").write_text(json.dumps(k))
    data = load_annotations(tmp_path / "dataset_x.json", d, split="test")
    assert data.images == (d / "sub" / "1.png",) and data.texts == ("A red circle.",)


def test_missing_images_and_bad_rows_name_the_fix(tmp_path, split):
    d, _ = split
    (tmp_path / "a.json").write_text(json.dumps([{"image": "nope.jpg", "caption": "x"}]))
    with pytest.raises(InvalidInputError, match="pass images_dir with the folder"):
        load_annotations(tmp_path / "a.json", d)
    (tmp_path / "b.json").write_text(json.dumps([{"img": "x"}]))
    with pytest.raises(InvalidInputError, match="row 0"):
        load_annotations(tmp_path / "b.json", d)
    for bad, needle in (
        ({"images": [{"split": "test", "sentences": [{"raw": "x"}]}]}, r"images\[0\] has no 'filename'"),
        ({"images": ["a.jpg"]}, r"images\[0\] has no 'filename'"),
        ({"images": [{"filename": "a.jpg", "sentences": [{"text": "x"}]}]}, r"images\[0\] \(a.jpg\) has a sentence without a 'raw'"),
        ({"images": [{"filename": "a.jpg", "sentences": "x"}]}, "without a 'raw'"),
        ([{"image": "a.jpg", "caption": 5}], "row 0 needs an 'image' path string and a 'caption'"),
        ([{"image": "a.jpg", "caption": ["x", None]}], "row 0 needs"),
        ([{"image": ["a.jpg"], "caption": "x"}], "row 0 needs"),
        ([], "no images with captions; check the file"),
        ([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": []}], "1 image without captions, e.g. b.jpg"),
        ({"images": [{"filename": "a.jpg", "sentences": [{"raw": "x"}]}, {"filename": "b.jpg", "sentences": []}]}, "without captions, e.g. b.jpg"),
        ([{"image": "a.jpg", "caption": ["x", "  "]}], "image a.jpg has an empty caption"),
    ):
        (tmp_path / "c.json").write_text(json.dumps(bad))
        with pytest.raises(InvalidInputError, match=needle):
            load_annotations(tmp_path / "c.json", d)
    (tmp_path / "d.json").write_bytes(b'[{"image": "caf\xe9.jpg", "caption": "x"}]')  # Latin-1, not UTF-8
    with pytest.raises(InvalidInputError, match="cannot read JSON"):
        load_annotations(tmp_path / "d.json", d)


@pytest.mark.parametrize("k", [3, 128])
def test_protocol_equals_brute_force(tiny_itm_dir, split, k):
    d, ann = split
    data = load_annotations(ann, d)
    report = evaluate(Blip2Encoder.load(str(tiny_itm_dir), batch_size=5), data, rerank_k=k)
    itc_fig, reranked_fig = _brute_force(tiny_itm_dir, data, k)
    keys = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]
    np.testing.assert_allclose([report.itc.as_dict()[x] for x in keys], itc_fig, atol=1e-9)
    np.testing.assert_allclose([report.reranked.as_dict()[x] for x in keys], reranked_fig, atol=1e-9)


def test_recall_counts_any_caption_of_the_image():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.3]])  # image 0 owns texts 0, 1; image 1 owns text 2
    r = recall_at(scores, np.array([0, 0, 1]))
    assert r.txt_r1 == 50.0 and r.img_r1 == pytest.approx(200 / 3)
    with pytest.raises(InvalidInputError, match="image 2 has no caption"):  # not a hit at rank 1
        recall_at(np.zeros((3, 3)), np.array([0, 0, 1]))


def test_eval_refusals_name_the_keyword_in_python_and_the_option_on_the_command_line(tiny_itm_dir, split, tmp_path):
    """load_annotations(images_dir=...) was told "pass --images", a flag of a program a Python caller is not running."""
    d, ann = split
    karpathy = tmp_path / "karpathy.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "0.png", "split": "val", "sentences": [{"raw": "x"}]}]}))
    for call, python, command, option in [
        (lambda: load_annotations(ann, tmp_path), "pass images_dir with the folder", ["eval", str(ann), "--images", str(tmp_path)],
         "pass --images with the folder"),
        (lambda: load_annotations(karpathy, d), "in split 'test'; check split or the file", ["eval", str(karpathy), "--images", str(d)],
         "in split 'test'; check --split or the file"),
    ]:
        with pytest.raises(InvalidInputError) as caught:
            call()
        assert python in str(caught.value) and "--" not in str(caught.value)
        res = CliRunner().invoke(main, [*command, "--model", str(tiny_itm_dir)])
        assert res.exit_code == 2 and option in res.stderr, res.output
    with pytest.raises(InvalidInputError, match=r"^rerank_k=0 must be >= 1; pass rerank_k=128 \(the paper's value\)$") as caught:
        evaluate(Blip2Encoder.load(str(tiny_itm_dir)), load_annotations(ann, d), rerank_k=0)
    assert caught.value.naming("--rerank-k") == "--rerank-k 0 must be >= 1; pass --rerank-k 128 (the paper's value)"


def test_cli_eval_json(tiny_itm_dir, split):
    d, ann = split
    res = CliRunner().invoke(main, ["eval", str(ann), "--images", str(d), "--model", str(tiny_itm_dir), "--rerank-k", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "seconds"):
        assert key in out and key in out["itc"] or key == "seconds"
    assert 0 <= out["r_mean"] <= 100 and out["seconds"] >= 0


def test_eval_reads_images_as_lavis_does_without_the_exif_rotation(tiny_itm_dir, tmp_path):
    """LAVIS's retrieval datasets read `Image.open(path).convert("RGB")`: a photo's EXIF orientation is not applied
    (indexing applies it, right for photos). Eval turned such images upright, so its figures were not the
    protocol's (review). The real encoder runs; a spy only records what it was given."""
    from blip2_search.errors import ImageDecodeError
    from blip2_search.evaluation import protocol_image
    from blip2_search.images import open_image

    stored = np.random.default_rng(3).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: upright it is 40 wide, 64 high
    Image.fromarray(stored).save(tmp_path / "turned.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(stored[::-1]).save(tmp_path / "plain.png")
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "turned.jpg", "caption": ["a red circle"]},
                                                   {"image": "plain.png", "caption": ["a blue square"]}]))
    data = load_annotations(tmp_path / "ann.json", tmp_path)
    assert open_image(data.images[0]).size == (40, 64)  # what indexing reads
    enc = Blip2Encoder.load(str(tiny_itm_dir))
    seen, real = [], enc.preprocess

    def spy(images):
        seen.extend(images)
        return real(images)

    enc.preprocess = spy
    evaluate(enc, data, rerank_k=2)
    assert [im.size for im in seen] == [(64, 40), (64, 40)]
    for path, image in zip(data.images, seen):
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(im.convert("RGB")))
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "turned.jpg").read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match=rf"cannot read eval image {tmp_path / 'broken.jpg'} \(.*\); replace it with the dataset's original file"):
        protocol_image(tmp_path / "broken.jpg")
