"""Bounded fuzzing of the HTTP API from its own OpenAPI schema: no input may cause a 5xx or a non-JSON error.

Schemathesis generates valid and invalid requests for every operation (query strings, JSON bodies,
multipart uploads, path ids) and sends them in-process to an app over a small library. A fixed
seed and a per-operation example budget keep the run reproducible and well under a minute.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed: pip install -e '.[server,test]'")
pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[server,test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from blip2_search.library import Library  # noqa: E402
from blip2_search.server import create_app  # noqa: E402

TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 50  # per operation and mode: about 550 requests in all


@pytest.fixture(scope="module")
def app(tiny_itm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg", quality=90)
    with Library.open(root / "lib", model=str(tiny_itm_dir), captioner=False, create=True, batch_size=8) as lib:
        lib.index([photos])
    with Library.open(root / "lib") as lib:
        # With a token the Host check is off, so schemathesis's "testserver" host is served, and auth is exercised too.
        yield create_app(lib, token=TOKEN, host="0.0.0.0")


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", app, headers=AUTH)
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_schema_covers_every_endpoint(app):
    assert set(_operations(app)) == {
        "GET /api/status", "GET /api/search", "POST /api/search", "POST /api/rerank",
        "GET /api/images/{image_id}", "GET /api/images/{image_id}/thumbnail", "GET /api/images/{image_id}/similar",
        "HEAD /api/images/{image_id}", "HEAD /api/images/{image_id}/thumbnail",
    }


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_api_never_answers_5xx(app, mode):
    for label, operation in _operations(app).items():
        if mode is GenerationMode.NEGATIVE and label == "GET /api/status":
            continue  # no parameters and no body: nothing can be made invalid

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(headers=AUTH)
            where = f"{label} ({mode.value}) {case.formatted_path} query={case.query!r} body={str(case.body)[:200]!r}"
            assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text[:500]}"
            if response.status_code >= 400:
                content_type = response.headers.get("content-type", [""])[0]  # schemathesis keeps header lists
                assert content_type.startswith("application/json"), f"{where}: {response.text[:200]}"
                if label.startswith("HEAD "):
                    assert response.content == b"", where  # HEAD: the GET's headers, never a body
                    return
                error = response.json()["error"]
                assert error and "Traceback" not in error, where

        check()
