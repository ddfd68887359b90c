"""The scene language and its renderer obey the spec the demo models were trained on."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip2_search.demo import scenes
from blip2_search.demo.scenes import (
    ALL_CAPTIONS,
    ALL_SCENES,
    COLORS,
    POSITIONS,
    SHAPES,
    Scene,
    encode,
    random_scene,
    render,
    render_with_info,
    sample_canvas,
    write_folder,
)


def test_72_distinct_captions_in_fixed_order():
    assert len(ALL_CAPTIONS) == 72 == len(set(ALL_CAPTIONS))
    assert ALL_CAPTIONS[0] == "a red circle on the left"
    assert [s.caption for s in ALL_SCENES] == list(ALL_CAPTIONS)
    assert all(ALL_SCENES[i].index == i for i in range(72))


def test_caption_text_and_parse():
    scene = Scene("blue", "triangle", "top")
    assert scene.caption == "a blue triangle on the top"
    assert Scene.from_caption("A Blue triangle on the TOP ") == scene
    assert scene.replace(shape="square").caption == "a blue square on the top"
    with pytest.raises(ValueError, match="expected 'a COLOR SHAPE on the POSITION'"):
        Scene.from_caption("a blue triangle at the top")
    with pytest.raises(ValueError, match="use colors"):
        Scene("pink", "circle", "left")


def test_canvas_sizes_and_aspects():
    rng = np.random.default_rng(0)
    sizes = [sample_canvas(rng) for _ in range(2000)]
    for w, h in sizes:
        assert 64 <= w <= 1024 and 64 <= h <= 1024
        assert 9 / 16 - 0.02 <= w / h <= 16 / 9 + 0.02
    longs = [max(s) for s in sizes]
    assert min(longs) < 150 and max(longs) > 800  # the whole range is used
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


def _shape_mask(img: Image.Image, info) -> np.ndarray:
    arr = np.asarray(img, dtype=np.int16)
    return np.abs(arr - np.array(info.background)).sum(axis=2) > 60


@pytest.mark.parametrize("seed", range(6))
def test_geometry_background_and_colour(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        scene = random_scene(rng)
        img, info = render_with_info(scene, rng)
        w, h = info.canvas
        assert img.mode == "RGB" and img.size == (w, h)
        cx, cy = info.center
        # centre in the named third, and in the middle third across it
        if scene.position == "left":
            assert cx < w / 3 and h / 3 < cy < 2 * h / 3
        elif scene.position == "right":
            assert cx > 2 * w / 3 and h / 3 < cy < 2 * h / 3
        elif scene.position == "top":
            assert cy < h / 3 and w / 3 < cx < 2 * w / 3
        else:
            assert cy > 2 * h / 3 and w / 3 < cx < 2 * w / 3
        assert 0.15 * min(w, h) <= info.size <= 0.35 * min(w, h)
        assert all(180 <= c <= 250 for c in info.background)
        base = np.array(COLORS[scene.color])
        assert np.abs(np.array(info.fill) - base).max() <= scenes.COLOR_JITTER
        # the drawn pixels: the shape lies fully on the canvas, centred where info says
        mask = _shape_mask(img, info)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        assert abs((xs.min() + xs.max()) / 2 - cx) <= 2 and abs((ys.min() + ys.max()) / 2 - cy) <= 2
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < w - 1 and ys.max() < h - 1
        # background pixels stay near the background colour (mild noise only)
        bg = np.asarray(img, dtype=np.int16)[~mask]
        assert np.abs(bg.mean(axis=0) - np.array(info.background)).max() < 2


def test_shapes_fill_their_box_as_drawn():
    rng = np.random.default_rng(1)
    fill = {}
    for shape in SHAPES:
        img, info = render_with_info(Scene("blue", shape, "left"), rng, size=(600, 600))
        fill[shape] = _shape_mask(img, info).sum() / info.size**2
    assert fill["square"] == pytest.approx(1.0, abs=0.05)
    assert fill["circle"] == pytest.approx(np.pi / 4, abs=0.05)
    assert fill["triangle"] == pytest.approx(0.5, abs=0.05)
    # the triangle points up: its top rows are narrower than its bottom rows
    img, info = render_with_info(Scene("red", "triangle", "right"), rng, size=(400, 400))
    mask = _shape_mask(img, info)
    rows = np.nonzero(mask.any(axis=1))[0]
    top, bottom = mask[rows[2]].sum(), mask[rows[-3]].sum()
    assert top < bottom / 4


def test_shape_fraction_sets_the_size_and_is_checked():
    rng = np.random.default_rng(3)
    img, info = render_with_info(Scene("green", "square", "top"), rng, size=(500, 300), shape_fraction=0.2)
    assert info.size == pytest.approx(0.2 * 300)
    ys, xs = np.nonzero(_shape_mask(img, info))
    assert xs.max() - xs.min() + 1 == pytest.approx(60, abs=2) and ys.max() - ys.min() + 1 == pytest.approx(60, abs=2)
    for bad in (0.1, 0.4):
        with pytest.raises(ValueError, match="pick a value inside"):
            render(Scene("green", "square", "top"), rng, shape_fraction=bad)


def _three_renders(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(render(random_scene(rng), rng)) for _ in range(3)]


def test_deterministic_for_a_seed():
    a, b, c = _three_renders(7), _three_renders(7), _three_renders(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, c))


def test_encode_formats():
    rng = np.random.default_rng(3)
    img = render(Scene("green", "square", "bottom"), rng, size=(200, 120))
    kinds = set()
    for _ in range(30):
        data, ext = encode(img, rng)
        kinds.add(ext)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == {".jpg": "JPEG", ".png": "PNG"}[ext]
            assert im.size == (200, 120)
    assert kinds == {".jpg", ".png"}


def test_write_folder(tmp_path):
    first = write_folder(tmp_path / "a", 12, seed=5)
    second = write_folder(tmp_path / "b", 12, seed=5)
    assert [s for _, s in first] == [s for _, s in second]
    assert [p.read_bytes() for p, _ in first] == [p.read_bytes() for p, _ in second]
    for path, scene in first:
        assert path.exists() and path.suffix in (".jpg", ".png")
        assert scene in ALL_SCENES
        with Image.open(path) as im:
            assert im.mode == "RGB"
    assert len({p.name for p, _ in first}) == 12


def test_all_positions_and_shapes_reachable():
    rng = np.random.default_rng(11)
    seen = {random_scene(rng) for _ in range(2000)}
    assert seen == set(ALL_SCENES)
    assert {s.position for s in seen} == set(POSITIONS)
