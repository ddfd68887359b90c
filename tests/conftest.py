import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_itm_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_itm

    return make_tiny_itm(tmp_path_factory.mktemp("tiny-itm") / "model")


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_captioner

    return make_tiny_captioner(tmp_path_factory.mktemp("tiny-cap") / "model")
