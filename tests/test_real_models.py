"""Known answers of the real checkpoints (BLIP2_FACTS.md). Opt-in: they need weights and two images.

    BLIP2_SEARCH_MODEL_DIR       a copy of Salesforce/blip2-itm-vit-g
    BLIP2_SEARCH_CAPTIONER_DIR   a copy of Salesforce/blip2-opt-2.7b
    BLIP2_SEARCH_TEST_IMAGES     a folder with demo.jpg (the BLIP demo: woman and dog on a beach)
                                 and 000000039769.jpg (COCO val2017, two cats)

Run: pytest -m real_model
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.real_model


def _need(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"{var} is not set")
    return Path(value)


def _image(name: str):
    from blip2_search.images import open_image

    path = _need("BLIP2_SEARCH_TEST_IMAGES") / name
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return open_image(path)


@pytest.fixture(scope="module")
def encoder():
    from blip2_search.models import Blip2Encoder

    return Blip2Encoder.load(str(_need("BLIP2_SEARCH_MODEL_DIR")), dtype="float32")


def test_itm_and_itc_on_blip_demo_image(encoder):
    s = encoder.score_images("A woman and her dog sitting in a beach", [_image("demo.jpg")])
    assert s.match_probability[0] == pytest.approx(0.9762, abs=1e-3)
    assert s.itc[0] == pytest.approx(0.4406, abs=1e-3)


def test_itc_softmax_cat_vs_dog(encoder):
    img = encoder.embed_images([_image("000000039769.jpg")])[0]
    txt = encoder.embed_texts(["a photo of a cat", "a photo of a dog"])
    itc = (img @ txt.T).max(axis=0)
    p = np.exp(itc) / np.exp(itc).sum()
    np.testing.assert_allclose(p, [0.553, 0.447], atol=5e-3)


def test_opt_caption_of_demo_image():
    from blip2_search.models import Blip2Captioner

    cap = Blip2Captioner.load(str(_need("BLIP2_SEARCH_CAPTIONER_DIR")), dtype="float16" if _cuda() else "float32")
    assert cap.caption([_image("demo.jpg")]) == ["a woman sitting on the beach with a dog"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
