"""The rerank/caption API and CLI: JSON shape, ordering, scores equal to HF, errors per image."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import blip2_search
from blip2_search.cli import main
from blip2_search.errors import IndexInterrupted, InvalidInputError
from blip2_search.library import Library


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(4):
        p = d / f"img {i}.png"
        Image.fromarray(rng.integers(0, 255, (30 + 5 * i, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    red = d / "red.jpg"
    Image.new("RGB", (48, 32), (220, 30, 30)).save(red, quality=95)
    paths.append(red)
    (d / "broken.jpg").write_bytes(b"not an image at all")
    return d, paths


def _hf_scores(model_dir, text, paths):
    from transformers import Blip2ForImageTextRetrieval

    from blip2_search.images import open_image
    from blip2_search.models import Blip2Encoder

    enc = Blip2Encoder.load(str(model_dir))
    hf = Blip2ForImageTextRetrieval.from_pretrained(model_dir).eval()
    px = enc.preprocess([open_image(p) for p in paths])
    tok = enc.tokenize([text] * len(paths))
    with torch.no_grad():
        itm = hf(pixel_values=px, **tok, use_image_text_matching_head=True).logits_per_image
        itc = hf(pixel_values=px, **enc.tokenize([text]), use_image_text_matching_head=False).logits_per_image[:, 0]
    return {str(p): (float(itm[i, 1] + itc[i]), float(itc[i]), float(itm[i, 1]), float(torch.softmax(itm[i], -1)[1])) for i, p in enumerate(paths)}


def test_python_rerank_sorted_with_scores_and_errors(tiny_itm_dir, photo_dir):
    d, paths = photo_dir
    pil = Image.new("RGB", (32, 32), (30, 60, 220))
    ranking = blip2_search.rerank("a red circle", [*paths, d / "broken.jpg", pil], model=str(tiny_itm_dir))
    assert len(ranking) == len(paths) + 1
    scores = [h.score for h in ranking]
    assert scores == sorted(scores, reverse=True)
    assert [e.path for e in ranking.errors] == [str(d / "broken.jpg")]
    assert any(h.path is None and h.index == len(paths) + 1 for h in ranking)
    ref = _hf_scores(tiny_itm_dir, "a red circle", paths)
    for h in ranking:
        if h.path:
            np.testing.assert_allclose((h.score, h.itc, h.itm_logit, h.match_probability), ref[h.path], atol=1e-5)


def test_a_closed_pil_image_is_named_as_closed_not_corrupt(tiny_itm_dir, photo_dir):
    _, paths = photo_dir
    closed = Image.new("RGB", (32, 32), (30, 60, 220))
    closed.close()
    ranking = blip2_search.rerank("a red circle", [paths[0], closed], model=str(tiny_itm_dir))
    assert [h.index for h in ranking] == [0]
    assert [(e.index, e.error) for e in ranking.errors] == [(1, "image <image 1> is a closed PIL image; pass it before closing it, or open the file again")]


def test_an_empty_pil_image_is_an_error_not_a_black_picture(tiny_itm_dir, tiny_captioner_dir, photo_dir):
    _, paths = photo_dir
    empty = Image.new("RGB", (40, 30)).crop((10, 0, 10, 30))  # a crop box of no width
    assert empty.size == (0, 30)
    ranking = blip2_search.rerank("a red circle", [paths[0], empty], model=str(tiny_itm_dir))
    assert [h.index for h in ranking] == [0]
    assert [(e.index, e.error) for e in ranking.errors] == [
        (1, "cannot use image <image 1>: it is empty (0x30 pixels); pass a picture with pixels (a crop box of no width or height makes an empty one)")]
    assert [e.index for e in blip2_search.caption([empty], str(tiny_captioner_dir)).errors] == [0]


def test_cli_rerank_json_equals_hf_forward(tiny_itm_dir, photo_dir):
    d, paths = photo_dir
    args = ["rerank", "a red circle on the left", *map(str, paths), str(d / "broken.jpg"), str(d / "missing.jpg"), "--model", str(tiny_itm_dir), "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and res.stderr.strip() == (  # all scored, then the unreadable ones named: exit 2
        f'Error: 2 of {len(paths) + 2} images could not be read (see their "errors" entries); fix or leave them out and run again'), res.output
    out = json.loads(res.stdout)
    assert set(out) == {"query", "results", "errors"} and out["query"] == "a red circle on the left"
    assert [set(r) for r in out["results"]] == [{"path", "score", "itc", "itm_logit", "match_probability"}] * len(paths)
    assert [r["score"] for r in out["results"]] == sorted((r["score"] for r in out["results"]), reverse=True)
    assert {e["path"] for e in out["errors"]} == {str(d / "broken.jpg"), str(d / "missing.jpg")}
    assert all(e["error"] for e in out["errors"])
    ref = _hf_scores(tiny_itm_dir, "a red circle on the left", paths)
    for r in out["results"]:
        np.testing.assert_allclose((r["score"], r["itc"], r["itm_logit"], r["match_probability"]), ref[r["path"]], atol=1e-5)


def test_rerank_says_when_the_query_is_longer_than_blip2_reads(tiny_itm_dir, photo_dir):
    _, paths = photo_dir
    words = "a photo of a dog on the beach " * 6  # 48 one-token words: BLIP-2 reads 33 of them
    ranking = blip2_search.rerank(words, paths[:2], model=str(tiny_itm_dir))
    assert len(ranking.notes) == 1 and "only the words up to 'on the beach a' were searched" in ranking.notes[0]
    assert blip2_search.rerank("a photo of a dog", paths[:2], model=str(tiny_itm_dir)).notes == ()
    res = CliRunner().invoke(main, ["rerank", words, *map(str, paths[:2]), "--model", str(tiny_itm_dir), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["notes"] == list(ranking.notes), res.output
    res = CliRunner().invoke(main, ["rerank", words, *map(str, paths[:2]), "--model", str(tiny_itm_dir)])
    assert res.exit_code == 0 and res.stderr == f"note: {ranking.notes[0]}\n", res.output


def test_cli_caption_json(tiny_captioner_dir, photo_dir):
    d, paths = photo_dir
    res = CliRunner().invoke(main, ["caption", *map(str, paths[:3]), str(d / "broken.jpg"), "--captioner", str(tiny_captioner_dir), "--json"])
    assert res.exit_code == 2 and "1 of 4 images could not be read" in res.stderr, res.output
    out = json.loads(res.stdout)
    assert [r["path"] for r in out["results"]] == list(map(str, paths[:3]))
    assert all(isinstance(r["caption"], str) and r["caption"] for r in out["results"])
    assert [e["path"] for e in out["errors"]] == [str(d / "broken.jpg")]
    good = CliRunner().invoke(main, ["caption", *map(str, paths[:2]), "--captioner", str(tiny_captioner_dir)])
    assert good.exit_code == 0 and len(good.stdout.strip().splitlines()) == 2, good.output
    res = CliRunner().invoke(main, ["caption", str(d / "missing.jpg"), "--captioner", str(tiny_captioner_dir)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and res.stdout == "" and len(lines) == 2, res.output
    assert lines[0].startswith("error: ") and lines[0].count(str(d / "missing.jpg")) == 1  # named once
    assert lines[1] == "Error: 1 of 1 images could not be read (see above); fix or leave them out and run again"


def test_the_library_and_its_typed_results_are_the_package_api():
    from blip2_search.indexing.pipeline import IndexReport
    from blip2_search.search.results import SearchResult

    assert blip2_search.Library is Library and blip2_search.SearchResult is SearchResult and blip2_search.IndexReport is IndexReport
    for name in blip2_search.__all__:
        assert getattr(blip2_search, name) is not None
    # the library and its search results stay light: neither imports torch
    code = "import sys, blip2_search; blip2_search.Library, blip2_search.SearchResult, blip2_search.Hit; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_cli_missing_model_exits_2_without_traceback(photo_dir, tmp_path):
    _, paths = photo_dir
    proc = subprocess.run(
        [sys.executable, "-m", "blip2_search.cli", "rerank", "x", str(paths[0]), "--model", "nobody/no-such-model"],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nobody/no-such-model" in lines[0] and "--model PATH" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_cli_empty_query_exits_2(tiny_itm_dir, photo_dir):
    _, paths = photo_dir
    res = CliRunner().invoke(main, ["rerank", "  ", str(paths[0]), "--model", str(tiny_itm_dir)])
    assert res.exit_code == 2 and "empty" in res.output


@pytest.mark.parametrize("command", [["caption", "{photo}"], ["index", "{photos}", "--library", "{lib}", "--model", "demo"]])
def test_a_missing_captioner_names_the_captioner_option(photo_dir, tmp_path, command):
    folder, paths = photo_dir
    args = [a.format(photo=paths[0], photos=folder, lib=tmp_path / "lib") for a in command]
    res = CliRunner().invoke(main, [*args, "--captioner", str(tmp_path / "no captioner")])
    assert res.exit_code == 2 and "pass --captioner" in res.output and "--model" not in res.output, res.output
    assert not (tmp_path / "lib").exists()  # index: a bad captioner leaves no library behind either


def test_an_unavailable_default_captioner_leaves_no_library_behind(tiny_itm_dir, photo_dir, tmp_path, monkeypatch):
    """A new library with a local embedder and the default (hub) captioner, offline and not cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty cache"))
    monkeypatch.setenv("BLIP2_SEARCH_CAPTIONER", "nobody/no-such-captioner")
    folder, _ = photo_dir
    res = CliRunner().invoke(main, ["index", str(folder), "--library", str(tmp_path / "lib"), "--model", str(tiny_itm_dir)])
    assert res.exit_code == 2 and "nobody/no-such-captioner" in res.output and "--captioner" in res.output, res.output
    assert not (tmp_path / "lib").exists()
    res = CliRunner().invoke(main, ["index", str(folder), "--library", str(tmp_path / "lib"), "--model", str(tiny_itm_dir), "--no-captions"])
    assert res.exit_code == 0, res.output


def test_a_librarys_vanished_model_names_a_fix_that_search_takes(tiny_itm_dir, photo_dir, tmp_path):
    """`search` and `serve` take no --model: when the library's own model folder is gone, the one line names
    putting it back or `index --reembed --model M`, not "pass --model" (which they refuse)."""
    import shutil

    folder, _ = photo_dir
    model = shutil.copytree(tiny_itm_dir, tmp_path / "model")
    lib = str(tmp_path / "lib")
    res = CliRunner().invoke(main, ["index", str(folder), "--library", lib, "--model", str(model), "--no-captions"])
    assert res.exit_code == 0, res.output
    shutil.rmtree(model)
    for args in (["search", "a dog", "--library", lib], ["index", str(folder), "--library", lib]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "does not exist" in res.output and "pass --model" not in res.output, res.output
        assert "put the folder back" in res.output and "--reembed --model M" in res.output, res.output
    res = CliRunner().invoke(main, ["index", str(folder), "--library", lib, "--model", "demo", "--reembed", "--no-captions"])
    assert res.exit_code == 0, res.output  # the fix it names works without the old model


def test_a_library_of_the_demo_model_missing_from_the_package_names_its_fix(photo_dir, tmp_path, monkeypatch):
    """The demo models ship in the package: when they are missing, the fix is to reinstall it (as the demo's own
    message says), not `hf download demo` (no such hub id)."""
    from blip2_search import demo

    folder, _ = photo_dir
    lib = str(tmp_path / "lib")
    res = CliRunner().invoke(main, ["index", str(folder), "--library", lib, "--model", "demo", "--no-captions"])
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(demo, "ITM_DIR", tmp_path / "not-installed")
    res = CliRunner().invoke(main, ["search", "a red circle on the left", "--library", lib])
    assert res.exit_code == 2 and "reinstall blip2-search" in res.output and "hf download" not in res.output, res.output


@pytest.mark.parametrize("env, value, fix", [
    ("BLIP2_SEARCH_VECTOR_MEMORY_GB", "abc", "not a number > 0"), ("BLIP2_SEARCH_VECTOR_MEMORY_GB", "0", "not a number > 0"),
    ("BLIP2_SEARCH_VECTOR_MEMORY_GB", "nan", "not a number > 0"), ("BLIP2_SEARCH_BATCH_SIZE", "abc", "not a whole number >= 0 and <= 4096"),
    ("BLIP2_SEARCH_WORKERS", "-3", "not a whole number >= 0 and <= 256"), ("BLIP2_SEARCH_WORKERS", "2.5", "not a whole number"),
    ("BLIP2_SEARCH_WORKERS", "100000", "<= 256"), ("BLIP2_SEARCH_BATCH_SIZE", "1000000", "<= 4096"),
])
def test_a_bad_setting_in_the_environment_is_one_line_naming_it(photo_dir, tmp_path, monkeypatch, env, value, fix):
    folder, _ = photo_dir
    monkeypatch.setenv(env, value)
    res = CliRunner().invoke(main, ["index", str(folder), "--library", str(tmp_path / "lib"), "--model", "demo", "--no-captions"])
    assert res.exit_code == 2 and f"{env}={value!r}" in res.output and fix in res.output and "unset it" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "lib" / "metadata.sqlite").exists()


@pytest.mark.parametrize("command", [["status"], ["search", "red"], ["index", "{photos}", "--model", "demo"]])
def test_a_library_linked_to_a_missing_folder_says_so(photo_dir, tmp_path, command):
    """A --library link to an unplugged drive read "no library ...; index photos into it first" (status, search) or
    "cannot create library folder ... (File exists)" (index)."""
    folder, _ = photo_dir
    link = tmp_path / "lib"
    link.symlink_to(tmp_path / "drive" / "lib")
    res = CliRunner().invoke(main, [*(a.format(photos=folder) for a in command), "--library", str(link)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"library folder {link} is a link to {tmp_path / 'drive' / 'lib'}, which does not exist" in res.output, res.output
    assert "reconnect it" in res.output and not (tmp_path / "drive").exists()


def test_a_bad_vector_index_setting_leaves_no_library_behind(photo_dir, tmp_path, monkeypatch):
    """A bad BLIP2_SEARCH_VECTOR_INDEX was refused only after the library was made: an empty library was left,
    recorded with the run's model ('vector_index none' in status)."""
    folder, _ = photo_dir
    monkeypatch.setenv("BLIP2_SEARCH_VECTOR_INDEX", "bogus")
    res = CliRunner().invoke(main, ["index", str(folder), "--library", str(tmp_path / "lib"), "--model", "demo", "--no-captions"])
    assert res.exit_code == 2 and "'bogus'" in res.output and "BLIP2_SEARCH_VECTOR_INDEX" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "lib").exists()
    with pytest.raises(InvalidInputError, match="pass vector_index='exact', vector_index='compact' or vector_index='auto'"):
        Library.open(tmp_path / "lib2", model="demo", create=True, vector_index="bogus")
    assert not (tmp_path / "lib2").exists()


def test_index_refuses_before_making_a_library(photo_dir, tmp_path):
    folder, paths = photo_dir
    for args, fix in ((["no such folder"], "existing folder"), ([str(paths[0])], "the folder that holds it"),
                      ([str(folder), "--captioner", "demo", "--no-captions"], "pass one of them")):
        res = CliRunner().invoke(main, ["index", *args, "--library", str(tmp_path / "lib"), "--model", "demo"])
        assert res.exit_code == 2 and fix in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "lib").exists()
    res = CliRunner().invoke(main, ["index", str(folder), "--library", str(folder), "--model", "demo"])  # photos as the library
    assert res.exit_code == 2 and "library folder or inside it" in res.output and not (folder / "metadata.sqlite").exists()


def test_a_database_url_as_the_library_is_refused_without_its_password(photo_dir, tmp_path, monkeypatch):
    """A URL is no folder: taken as one it made `./postgresql+psycopg:/user:secret@host/db/metadata.sqlite`."""
    folder, _ = photo_dir
    monkeypatch.chdir(tmp_path)
    url = "postgresql+psycopg://blip:s3cret@localhost/photos"
    for args, env in ((["--library", url], None), ([], url)):
        if env:
            monkeypatch.setenv("BLIP2_SEARCH_LIBRARY", env)
        for command in (["index", str(folder), "--model", "demo", "--no-captions"], ["status"], ["search", "red"]):
            res = CliRunner().invoke(main, [*command, *args])
            assert res.exit_code == 2 and "is a URL, but a library is a folder" in res.output, res.output
            assert "s3cret" not in res.output and "postgresql+psycopg://***@localhost/photos" in res.output
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidInputError, match="is a URL"):
        Library.open("sqlite:///x.db", create=True)
    for url in ("postgresql://blip:pa/ss@db.example/photos", "postgresql://blip:p@ss@db.example/photos", "s3://key:sec/ret@bucket/x"):
        with pytest.raises(InvalidInputError) as caught:
            Library.open(url)
        assert "ss" not in str(caught.value).split(" is a URL")[0].replace("postgresql", "") and "***@" in str(caught.value), caught.value


@pytest.mark.parametrize("call, message", [
    (lambda m, c: blip2_search.rerank("red", None, model=m), r"images \(None, of type NoneType\) are not a list of paths, PIL images or binary files"),
    (lambda m, c: blip2_search.rerank("red", [np.zeros((8, 8, 3), np.uint8)], model=m),
     r"image 0 \(a numpy array \(8, 8, 3\) of uint8\) is not a path, a PIL image or a binary file; convert it with Image.fromarray"),
    (lambda m, c: blip2_search.rerank("red", np.zeros((8, 8, 3), np.uint8), model=m), r"one numpy array \(8, 8, 3\)"),
    (lambda m, c: blip2_search.rerank("red", {"a.jpg": 1}, model=m), "are not a list of paths"),
    (lambda m, c: blip2_search.rerank("red", ["a.jpg", 5], model=m), r"image 1 \(5, of type int\) is not a path, a PIL image or a binary file"),
    (lambda m, c: blip2_search.rerank("red", [b"a.jpg"], model=m), "of type bytes"),
    (lambda m, c: blip2_search.rerank("red", ["a.jpg"], model=None), "model None is not a checkpoint name"),
    (lambda m, c: blip2_search.rerank(None, ["a.jpg"], model=m), r"rerank query \(None, of type NoneType\) is not text"),
    (lambda m, c: blip2_search.caption(None, c), r"images \(None, of type NoneType\) are not a list"),
    (lambda m, c: blip2_search.caption(["a.jpg"], c, settings={"beams": 2}), "name unknown fields; use num_beams"),
    (lambda m, c: blip2_search.caption(["a.jpg"], c, settings={"num_beams": "2"}), "num_beams='2' is not a whole number"),
    (lambda m, c: blip2_search.caption(["a.jpg"], c, settings=5), "are not CaptionSettings"),
])
def test_python_api_arguments_of_the_wrong_kind_are_one_line_errors(tiny_itm_dir, tiny_captioner_dir, call, message):
    with pytest.raises(InvalidInputError, match=message) as caught:
        call(str(tiny_itm_dir), str(tiny_captioner_dir))
    assert "\n" not in str(caught.value)


def test_python_caption_settings_may_be_a_dict(tiny_captioner_dir):
    pil = Image.new("RGB", (32, 32), (30, 60, 220))
    from_dict = blip2_search.caption([pil], str(tiny_captioner_dir), settings={"max_new_tokens": 3}).results[0].caption
    from blip2_search.models.captioner import CaptionSettings
    assert from_dict == blip2_search.caption([pil], str(tiny_captioner_dir), settings=CaptionSettings(max_new_tokens=3)).results[0].caption


@pytest.mark.parametrize("call", ["rerank", "caption"])
def test_python_api_holds_one_full_size_picture_at_a_time(tiny_itm_dir, tiny_captioner_dir, photo_dir, monkeypatch, call):
    import weakref

    import blip2_search.images
    from blip2_search.models.checkpoint import Checkpoint

    d, paths = photo_dir
    decoded, most_alive = [], []
    decoder = "model_image"  # a file is decoded to the model's size, as `index` does
    real_open, real_preprocess = getattr(blip2_search.images, decoder), Checkpoint.preprocess

    def open_image(*args, **kwargs):
        picture = real_open(*args, **kwargs)
        decoded.append(weakref.ref(picture))
        return picture

    def preprocess(self, images):
        most_alive.append(sum(ref() is not None for ref in decoded))
        return real_preprocess(self, images)

    monkeypatch.setattr(blip2_search.images, decoder, open_image)
    monkeypatch.setattr(Checkpoint, "preprocess", preprocess)
    many = paths * 12  # 60 photos: more than a batch (32 on the CPU)
    if call == "rerank":
        got = blip2_search.rerank("a red circle", many, model=str(tiny_itm_dir))
        assert sorted(h.index for h in got) == list(range(len(many)))
    else:
        got = blip2_search.caption(many, str(tiny_captioner_dir), settings={"max_new_tokens": 2})
        assert [r.index for r in got.results] == list(range(len(many)))
    assert len(decoded) == len(many) and max(most_alive) == 1, most_alive


def test_python_caption_settings_apply_to_a_loaded_captioner_and_share_its_weights(tiny_captioner_dir):
    from blip2_search.api import get_captioner

    pil = Image.new("RGB", (32, 32), (30, 60, 220))
    short = {"max_new_tokens": 3}
    loaded = get_captioner(str(tiny_captioner_dir))
    by_name = blip2_search.caption([pil], str(tiny_captioner_dir), settings=short).results[0].caption
    assert blip2_search.caption([pil], loaded, settings=short).results[0].caption == by_name
    assert 0 < len(by_name.split()) < len(blip2_search.caption([pil], loaded).results[0].caption.split())
    other = get_captioner(str(tiny_captioner_dir), settings=short)
    assert other.settings.max_new_tokens == 3 and loaded.settings.max_new_tokens == 30
    assert other.model is loaded.model and get_captioner(str(tiny_captioner_dir)) is loaded  # no second load


def test_python_api_refuses_to_move_a_model_passed_loaded(tiny_itm_dir, tiny_captioner_dir):
    from blip2_search.api import get_captioner, get_encoder

    enc, cap = get_encoder(str(tiny_itm_dir)), get_captioner(str(tiny_captioner_dir))
    for what, call in (("model", lambda dtype: blip2_search.rerank("red", [], model=enc, dtype=dtype)),
                       ("captioner", lambda dtype: blip2_search.caption([], cap, dtype=dtype))):
        other = "bfloat16" if enc.placement.dtype != "bfloat16" else "float32"  # one this machine can do
        with pytest.raises(InvalidInputError, match=rf"dtype='{other}' cannot move the {what} passed in \(it runs on \S+ in \S+\); pass the") as caught:
            call(other)
        assert "\n" not in str(caught.value)
    with pytest.raises(InvalidInputError, match="dtype='nonsense' is not one of"):
        blip2_search.rerank("red", [], model=enc, dtype="nonsense")  # named as a bad dtype, not as a move
    assert len(blip2_search.rerank("red", [], model=enc, device=enc.placement.device, dtype=enc.placement.dtype)) == 0  # already there


def test_cli_rerank_takes_queries_and_files_that_start_with_a_minus_sign(tiny_itm_dir, photo_dir, tmp_path, monkeypatch):
    """As `search`: a negative first term or "-5 degrees" is the query without '--' (docs/queries.md), an image
    named -5.jpg is an image, and what could be an option names '--' for the rerank command."""
    _, paths = photo_dir
    minus = tmp_path / "-5.jpg"
    minus.write_bytes(paths[1].read_bytes())

    def run(*args):
        res = CliRunner().invoke(main, ["rerank", "--model", str(tiny_itm_dir), "--json", *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    for query in ('-"a blue square" + "a red circle"', "-5 degrees, a red circle"):
        out = run(query, str(paths[0]))
        assert out["query"] == query and out == run("--", query, str(paths[0]))
    monkeypatch.chdir(tmp_path)
    assert [r["path"] for r in run("a red circle", "-5.jpg")["results"]] == ["-5.jpg"]
    res = CliRunner().invoke(main, ["rerank", "-car", str(paths[0]), "--model", str(tiny_itm_dir)])
    assert res.exit_code == 2 and "rerank [OPTIONS] -- '-car'; if it is an image, write it ./-car" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_ctrl_c_in_a_command_is_one_line_and_exit_code_130(tiny_itm_dir, photo_dir, monkeypatch):
    """Not click's "Aborted!" with exit code 1, which reads as a failure (`index` says more, tested there)."""
    _, paths = photo_dir

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    import blip2_search.api

    monkeypatch.setattr(blip2_search.api, "rerank", interrupted)
    res = CliRunner().invoke(main, ["rerank", "a red circle", str(paths[0]), "--model", str(tiny_itm_dir)])
    assert res.exit_code == 130 and res.stderr == "interrupted\n", res.output


def test_an_interrupted_index_says_so_in_its_json(photo_dir, tmp_path, monkeypatch):
    from blip2_search.indexing.pipeline import IndexReport

    folder, _ = photo_dir
    def interrupted(self, *args, **kwargs):
        raise IndexInterrupted(IndexReport(9, 3, 0, 0, 0, 0, 1.5, interrupted=True, notes=("a note",)))

    monkeypatch.setattr(Library, "index", interrupted)
    res = CliRunner().invoke(main, ["index", str(folder), "--library", str(tmp_path / "lib"), "--model", "demo", "--no-captions", "--json"])
    assert res.exit_code == 130 and "interrupted" in res.stderr and "note: a note" in res.stderr, res.output
    out = json.loads(res.stdout)
    assert (out["indexed"], out["interrupted"], out["notes"]) == (3, True, ["a note"])


def test_an_index_stopped_before_it_started_still_answers_in_json(photo_dir, tmp_path, monkeypatch):
    """Ctrl-C while the library opens (the model loading): no counts yet, but stdout is still JSON."""
    folder, _ = photo_dir

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Library, "open", interrupted)
    args = ["index", str(folder), "--library", str(tmp_path / "lib"), "--model", "demo", "--no-captions"]
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 130 and res.stderr == "interrupted\n" and json.loads(res.stdout) == {"interrupted": True}, res.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 130 and res.stdout == "", res.output


@pytest.mark.parametrize("args, says", [
    (["search", "a", "red", "circle"], 'put a query of several words in quotes: main search "a red car"'),
    (["search", "--", "-cat"], "options go before '--': main search [OPTIONS] -- '-cat'; see 'main search --help'"),
    (["search", "--", "a", "red", "car"], "options go before '--', and a query of several words in quotes: main search [OPTIONS] -- 'a red car'"),
    (["search", "--", "warm", "-5", "degrees"], "a query of several words in quotes: main search [OPTIONS] -- 'warm -5 degrees'"),
    (["rerank", "--", "-car", "x.jpg", "--json"], "'--json' after '--' would be read as an image; options go before '--': main rerank [OPTIONS] -- QUERY"),
    (["search", "x", "--model", "demo"], "search uses the model the library was indexed with, so leave --model out"),
    (["serve", "--captioner", "demo"], "leave --captioner out (index --captioner C changes the library's)"),
    (["status", "--model", "demo"], "status loads no model, so leave --model out"),
    (["search", "x", "-k"], "Option '-k' requires an argument; see 'main search --help'"),
    (["status", "--jsn"], "No such option '--jsn' (did you mean '--json'?); see 'main status --help'"),
    (["demo", "--device", "cpu"], "No such option '--device' (did you mean '--dir'?); see 'main demo --help'"),
    (["search", "x", "--rerank-sorce", "auto"], "(did you mean '--rerank', '--rerank-k' or '--rerank-source'?); see"),
    (["serach", "x"], "No such command 'serach' (did you mean 'search'?); see 'main --help'"),
])
def test_usage_mistakes_name_the_fix_and_the_command(args, says, tmp_path):
    res = CliRunner().invoke(main, [*args, "--library", str(tmp_path / "lib")] if args[0] != "search" or "-k" not in args else args)
    assert res.exit_code == 2 and says in res.output and len(res.output.strip().splitlines()) == 1, res.output


CTRL_C_AT_EXIT = """
import atexit, signal, sys, time

def ctrl_c():  # as a Ctrl-C lands while Python shuts down after the command (its atexit callbacks: torch's, weakref's)
    signal.raise_signal(signal.SIGINT)
    time.sleep(1)

atexit.register(ctrl_c)
from blip2_search.cli import main
main()
"""


@pytest.mark.parametrize("command", ["index", "search"])
def test_ctrl_c_after_the_command_while_python_exits_is_one_line_and_exit_code_130(tiny_itm_dir, photo_dir, tmp_path, command):
    """It printed a traceback from the atexit callback and exited 0; the command's work is kept."""
    folder, paths = photo_dir
    library = tmp_path / "lib"
    if command == "search":
        with Library.open(library, model=str(tiny_itm_dir), captioner=False, create=True) as lib:
            lib.index([folder])
        args = ["search", "a red circle", "--library", str(library), "--json"]
    else:
        args = ["index", str(folder), "--library", str(library), "--model", str(tiny_itm_dir), "--no-captions", "--json"]
    proc = subprocess.run([sys.executable, "-c", CTRL_C_AT_EXIT, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.splitlines()[-1:] == ["interrupted"] and "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout)
    assert out["indexed"] == len(paths) if command == "index" else len(out["results"]) == len(paths)
    with Library.open(library) as lib:
        assert lib.status().indexed == len(paths)


EXIT_PROBE = """
import atexit, os, sys, threading, time
out = sys.argv.pop(1)
atexit.register(lambda: open(os.path.join(out, "atexit"), "w").close())

class Teardown:  # freed by the interpreter's teardown (which may have emptied the modules by then)
    def __del__(self, _open=open, _path=os.path.join(out, "teardown")):
        _open(_path, "w").close()

probe = Teardown()
if os.environ.get("PROBE_THREAD"):
    threading.Thread(target=time.sleep, args=(1,)).start()  # still running when the command ends
from blip2_search.cli import main
main()
"""


@pytest.mark.parametrize("args, code, thread", [
    (["status", "--json"], 0, False), (["search", "  "], 2, False), (["status", "--json"], 0, True),
])
def test_the_program_ends_without_the_interpreters_teardown(tiny_itm_dir, photo_dir, tmp_path, args, code, thread):
    """Python's teardown after a command (freeing every module and object) took ~1 s of a 4 s demo search: the
    program flushes its output, runs the atexit callbacks and ends with the command's exit code; where another
    thread still runs, it exits as usual (that thread finishes)."""
    folder, _ = photo_dir
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([folder])
    env = {**os.environ, **({"PROBE_THREAD": "1"} if thread else {})}
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE, str(tmp_path), *args, "--library", str(tmp_path / "lib")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == code, proc.stderr
    if code == 0:
        assert json.loads(proc.stdout)["indexed"] > 0
    else:
        assert proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr
    assert (tmp_path / "atexit").exists()
    assert (tmp_path / "teardown").exists() == thread


EMBEDDED_THEN_CTRL_C = """
import os, signal, sys, time
from blip2_search.cli import main

try:
    main(sys.argv[1:], standalone_mode=False)  # a program running the CLI inside itself, as click allows
except Exception as exc:  # with standalone_mode=False click hands the error back
    print(type(exc).__name__)
try:
    signal.raise_signal(signal.SIGINT)  # the host program's own Ctrl-C, later on
    time.sleep(1)
except KeyboardInterrupt:
    print("host interrupted")
"""


def test_the_cli_run_inside_another_program_leaves_its_ctrl_c_alone(tmp_path):
    """The end-at-Ctrl-C handler is for the CLI's own process: `main(args, standalone_mode=False)` returns to its
    caller, which a later Ctrl-C ended at once (os._exit(130), "interrupted") instead of raising KeyboardInterrupt."""
    proc = subprocess.run([sys.executable, "-c", EMBEDDED_THEN_CTRL_C, "status", "--library", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["UserError", "host interrupted"], (proc.returncode, proc.stdout, proc.stderr)


EMBEDDED_THEN_EXIT = """
import sys
from blip2_search.cli import main

try:
    main(sys.argv[1:])  # a script or notebook running a command (standalone, as click does by default)
except SystemExit as exc:
    print("caught", exc.code)
print("host goes on")
"""


def test_the_cli_run_inside_another_program_raises_its_exit_there(tiny_itm_dir, photo_dir, tmp_path):
    """The program's own exit (flush, atexit, os._exit) is for the process it runs as: a script or a notebook that
    calls `main([...])` gets click's SystemExit back and goes on."""
    folder, _ = photo_dir
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([folder])
    proc = subprocess.run([sys.executable, "-c", EMBEDDED_THEN_EXIT, "status", "--library", str(tmp_path / "lib")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-2:] == ["caught 0", "host goes on"], (proc.stdout, proc.stderr)


@pytest.mark.parametrize("closed", [1, 2])
@pytest.mark.parametrize("ctrl_c", [False, True])
def test_the_program_started_without_stdout_or_stderr_ends_with_its_exit_code(tmp_path, closed, ctrl_c):
    """Started with fd 1 or 2 closed (`>&-`, a service without them) Python sets sys.stdout or sys.stderr to None: the
    program's exit flushed None (AttributeError: a traceback and exit 1 for a command that had ended), and so did
    the end-at-Ctrl-C handler, or it failed to write "interrupted" to a closed fd 2 (exit 2, not 130)."""
    script = CTRL_C_AT_EXIT if ctrl_c else "from blip2_search.cli import main\nmain()\n"
    proc = subprocess.run([sys.executable, "-c", script, "status", "--library", str(tmp_path / "none")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.close(closed))
    assert proc.returncode == (130 if ctrl_c else 2), (proc.returncode, proc.stdout, proc.stderr)
    if closed == 1:
        assert proc.stderr.startswith("Error: no library") and "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr


AFTER_THE_EXIT_CALLBACKS = """
import atexit
atexit.register(print, "printed at exit", end="")  # as an exit callback may (Python flushes stdout after them)
from blip2_search.cli import main
main()
"""


def test_what_the_exit_callbacks_print_is_kept(tmp_path):
    """Python flushes stdout after the atexit callbacks; the program's exit flushed it only before them, and what one
    printed to a pipe was lost with os._exit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe is buffered, as it is for users
    proc = subprocess.run([sys.executable, "-c", AFTER_THE_EXIT_CALLBACKS, "status", "--library", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == "printed at exit", (proc.stdout, proc.stderr)


def test_duplicates_of_a_library_whose_reembed_was_stopped_names_the_waiting_photos(tiny_itm_dir, photo_dir, tmp_path):
    """It said "no near-duplicates ... lower the threshold", though no photo had been compared."""
    from tiny_models import make_tiny_itm

    folder, paths = photo_dir
    library = tmp_path / "lib"
    with Library.open(library, model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([folder])

    def ctrl_c(progress):
        raise KeyboardInterrupt

    with Library.open(library, model=str(make_tiny_itm(tmp_path / "other", seed=5)), captioner=False, reembed=True) as lib:
        with pytest.raises(IndexInterrupted):
            lib.index([folder], progress=ctrl_c)
        assert lib.status().pending == len(paths)
        assert lib.duplicates(0.95) == [] and lib.duplicates(0.95).notes == (
            f"{len(paths)} photos of the library wait to be embedded with its model and cannot be compared with the others yet "
            "(a re-embedding run is going on, was stopped, or did not find their files); run index on their folders",)
    res = CliRunner().invoke(main, ["duplicates", "--library", str(library)])
    assert res.exit_code == 0 and res.stderr.splitlines() == [
        f"note: {len(paths)} photos of the library wait to be embedded with its model and cannot be compared "
        "with the others yet (a re-embedding run is going on, was stopped, or did not find their files); run index on their folders",
        "no near-duplicates at --threshold 0.95 among the photos compared"], res.output
    res = CliRunner().invoke(main, ["duplicates", "--library", str(library), "--json"])
    assert json.loads(res.stdout) == [] and "cannot be compared" in res.stderr


def test_no_duplicates_suggests_a_threshold_below_the_one_given(photo_dir, tmp_path):
    """It always said "lower it, e.g. 0.9", also to --threshold 0.5, where 0.9 is higher; and to a library of one
    photo, where no threshold finds a pair."""
    from blip2_search.cli import _looser

    assert [_looser(t) for t in (0.95, 1.0, 0.5, 0.02, 0.001, 0.0005)] == [0.9, 0.9, 0.45, 0.01, 0.0005, 0.00025]  # never 0 or the same
    folder, paths = photo_dir
    one = tmp_path / "one"
    one.mkdir()
    (one / "red.jpg").write_bytes(paths[-1].read_bytes())
    library = tmp_path / "lib"
    with Library.open(library, model="demo", captioner=False, create=True) as lib:
        lib.index([one])
    res = CliRunner().invoke(main, ["duplicates", "--library", str(library), "--threshold", "0.5"])
    assert res.exit_code == 0 and res.stderr == (f"note: library {library} has 1 searchable photo, and near-duplicates take two; index "
                                                 "more photos\nno near-duplicates at --threshold 0.5 among the photos compared\n"), res.stderr
    (one / "blue.jpg").write_bytes(paths[0].read_bytes())
    with Library.open(library) as lib:
        lib.index([one])
        score = lib.similar(paths[0], 2).hits[1].score  # the other photo's
    threshold = round(min(1.0, score + 0.01), 2)
    res = CliRunner().invoke(main, ["duplicates", "--library", str(library), "--threshold", str(threshold)])
    assert res.exit_code == 0 and res.stderr == (f"no near-duplicates at --threshold {threshold:g} (lower it, e.g. {_looser(threshold):g}, "
                                                 "to find looser matches)\n"), res.stderr


def test_a_path_with_a_newline_is_named_on_one_line_in_errors_and_notes(tmp_path):
    """Messages embedded the path raw: a library folder named 'my\\nphotos' split the error over two lines."""
    from blip2_search.errors import LibraryError

    folder = tmp_path / "my\nphotos"
    with pytest.raises(LibraryError) as caught:
        Library.open(folder)
    assert str(caught.value).startswith(f"no library at {tmp_path}/my\\nphotos") and "\n" not in str(caught.value)
    res = CliRunner().invoke(main, ["status", "--library", str(folder)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "my\\nphotos" in res.stderr, res.stderr

    Library.open(tmp_path / "lib", model="demo", captioner=False, create=True).close()
    res = CliRunner().invoke(main, ["prune", "--library", str(tmp_path / "lib"), "--missing-under", "/gone\ndrive"])
    assert res.exit_code == 0 and res.stderr.splitlines()[0] == ("note: the library has no photos recorded under /gone\\ndrive; check the "
                                                                 "folder (a relative one is taken from the current folder)"), res.stderr


def test_python_callers_read_argument_names_and_the_cli_its_options(tiny_itm_dir, photo_dir, tmp_path):
    """Library.search(rerank_k=0) said "pass --rerank-k", a flag a Python caller has not got."""
    folder, _ = photo_dir
    library = tmp_path / "lib"
    with Library.open(library, model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([folder])
        for call, message in [
            (lambda: lib.search("red", k=0), "k=0 is out of range; pass k between 1 and 10000"),
            (lambda: lib.search("red", rerank_k=20000), "rerank_k=20000 is out of range; pass rerank_k between 1 and 10000"),
            (lambda: lib.search("red", sort="size"), "sort 'size' is not 'score' or 'date'; pass sort='score' or sort='date'"),
            (lambda: lib.duplicates(2), "duplicate threshold 2 is not a number in (0, 1]; try threshold=0.95"),
        ]:
            with pytest.raises(InvalidInputError) as caught:
                call()
            assert str(caught.value) == message
    for args, message in [
        (["search", "red", "-k", "0"], "-k 0 is out of range; pass -k between 1 and 10000"),
        (["search", "red", "--rerank-k", "20000"], "--rerank-k 20000 is out of range; pass --rerank-k between 1 and 10000"),
        (["duplicates", "--threshold", "2"], "duplicate threshold 2.0 is not a number in (0, 1]; try --threshold 0.95"),
    ]:
        res = CliRunner().invoke(main, [*args, "--library", str(library)])
        assert res.exit_code == 2 and res.stderr == f"Error: {message}\n", res.output


def test_notes_and_errors_name_calls_and_arguments_as_each_reader_writes_them():
    """Notes said "run index --store-vit" or "pass --rerank-k N" to Python callers too; they read as Python now, and
    each edge words them its way: the CLI by its options and commands, the server by its request parameters (the
    library's keywords) and, for a command its operator runs, the CLI's."""
    import copy
    import pickle

    from blip2_search.errors import PRUNE_MISSING, STORE_VIT, Note, worded

    note = Note("not reranked; run {store_vit}, or pass {argument:N}", argument="rerank_k", store_vit=STORE_VIT)
    assert note == "not reranked; run Library.index(PHOTO_DIRS, store_vit=True), or pass rerank_k=N"
    assert worded([note], {"rerank_k": "--rerank-k"}.get) == ["not reranked; run index PHOTO_DIR... --store-vit, or pass --rerank-k N"]
    assert worded({"notes": (note, "plain")}) == {"notes": ["not reranked; run index PHOTO_DIR... --store-vit, or pass rerank_k=N", "plain"]}
    within = Note("2 candidates could not be reranked ({reason})", reason=Note("gone: `{prune}`", prune=PRUNE_MISSING))
    assert within == "2 candidates could not be reranked (gone: `Library.prune(missing=True)`)"
    assert worded(within) == "2 candidates could not be reranked (gone: `prune --missing`)"
    for kept in (copy.deepcopy(note), pickle.loads(pickle.dumps(note))):  # a result's `asdict`, a process pool
        assert kept == note and worded(kept, {"rerank_k": "--rerank-k"}.get) == worded(note, {"rerank_k": "--rerank-k"}.get)
    error = InvalidInputError("no {folder} tokens; run {store_vit}", folder="{x}", store_vit=STORE_VIT)  # braces in a value stay
    assert str(error) == "no {x} tokens; run Library.index(PHOTO_DIRS, store_vit=True)"
    assert error.naming(commands=True) == "no {x} tokens; run index PHOTO_DIR... --store-vit"


def test_python_and_the_cli_each_read_their_own_spelling_of_an_argument_and_a_command(tiny_itm_dir, photo_dir, tmp_path, monkeypatch):
    """ "index with --store-vit first", "omit --model ... pass --reembed", "pass --vector-index ..." were said to
    Python callers of Library.search and Library.open; the CLI still names its options and commands."""
    from blip2_search.errors import ModelMismatchError

    folder, _ = photo_dir
    library = tmp_path / "lib"
    with Library.open(library, model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([folder])
        with pytest.raises(InvalidInputError) as caught:
            lib.search("red", rerank_source="stored")
        assert str(caught.value) == (f"library {library} stores no ViT tokens; store them first (Library.index(PHOTO_DIRS, store_vit=True)), "
                                     "or pass rerank_source='recompute'")
    with pytest.raises(ModelMismatchError) as caught:
        Library.open(library, model="demo")
    assert str(caught.value).endswith("; omit model to use the library's, or pass reembed=True to re-embed every image with 'demo'")
    with pytest.raises(InvalidInputError) as caught:
        Library.open(tmp_path / "new", model="demo", create=True, vector_index="bogus")
    assert "; pass vector_index='exact', vector_index='compact' or vector_index='auto' (or fix" in str(caught.value)

    res = CliRunner().invoke(main, ["search", "red", "--rerank-source", "stored", "--library", str(library)])
    assert res.exit_code == 2 and res.stderr == (f"Error: library {library} stores no ViT tokens; store them first (index PHOTO_DIR... "
                                                 "--store-vit), or pass --rerank-source recompute\n"), res.output
    res = CliRunner().invoke(main, ["index", str(folder), "--model", "demo", "--library", str(library)])
    assert res.exit_code == 2 and res.stderr.endswith("; omit --model to use the library's, or pass --reembed to re-embed every image "
                                                      "with 'demo'\n"), res.output
    monkeypatch.setenv("BLIP2_SEARCH_VECTOR_INDEX", "bogus")
    res = CliRunner().invoke(main, ["index", str(folder), "--model", "demo", "--no-captions", "--library", str(tmp_path / "new")])
    assert res.exit_code == 2 and ("; pass --vector-index exact, --vector-index compact or --vector-index auto (or fix "
                                   "BLIP2_SEARCH_VECTOR_INDEX)") in res.stderr, res.output


def test_threads_share_one_load_of_a_model_and_load_different_models_at_once(tiny_itm_dir, tmp_path, monkeypatch):
    """A global lock held while a model loaded made a thread asking for another model wait for that load (a hub
    download). The third thread asks while the first model loads and must get that load's model: it once loaded
    it a third time, in a full test run where the other model's load had taken its place in the cache (the cache
    keeps one of a kind) before the waiting thread looked; that interleaving is not forced here."""
    import threading
    import time

    import blip2_search.api as api
    import blip2_search.models.encoder as encoder_module
    from tiny_models import make_tiny_itm

    other = str(make_tiny_itm(tmp_path / "other", seed=5))
    started = threading.Barrier(2, timeout=30)  # each load waits until the other model's has started: never, if loads take turns
    go = threading.Event()
    resolved, real = [], encoder_module.resolve_model

    def slow_resolve(name, **kwargs):  # the real resolver, slowed as a download is
        resolved.append(name)
        if len(resolved) <= 2:
            started.wait()
            go.wait(30)
        return real(name, **kwargs)

    monkeypatch.setattr(encoder_module, "resolve_model", slow_resolve)
    monkeypatch.setattr(api, "_MODELS", {})
    got, failed = {}, []

    def ask(n, name):
        try:
            got[n] = api.get_encoder(name)
        except Exception as exc:  # noqa: BLE001 - said by the assertion below
            failed.append(exc)

    threads = [threading.Thread(target=ask, args=(n, name)) for n, name in enumerate([str(tiny_itm_dir), other, str(tiny_itm_dir)])]
    threads[0].start()
    threads[1].start()
    deadline = time.monotonic() + 30
    while len(resolved) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    threads[2].start()  # asks while the first model loads
    time.sleep(0.5)
    go.set()
    for t in threads:
        t.join(60)
    assert not failed and sorted(resolved) == sorted([str(tiny_itm_dir), other])  # one load each, both at once
    assert got[0] is got[2] and got[1].name == other and got[0].name == str(tiny_itm_dir)
