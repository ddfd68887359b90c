"""What one HTTP request may ask for, and the parsing of the parameters the library does not parse.

Every limit here is documented in docs/server.md; a request over a limit gets a 4xx whose message
names the limit and how to stay under it.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

from ..errors import InvalidInputError
from ..models.text import is_blank

MAX_K = 200
"""Most results one search may return (the library allows more; a web page does not need them)."""
MAX_QUERY_BYTES = 4096
"""Hard cap on the raw query text in UTF-8 bytes; the parser itself keeps at most 1000 characters."""
MAX_PATH_GLOB_CHARS = 1024
"""Longest path filter."""
MAX_RERANK_IDS = 256
"""Most library images one rerank call may score."""
MAX_RERANK_UPLOADS = 16
"""Most uploaded images one rerank call may score."""
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest uploaded image file."""
MAX_BODY_BYTES = 25 * 1024 * 1024
"""Largest request body of any kind (an upload plus its multipart framing)."""
MAX_JSON_BYTES = 64 * 1024
"""Largest JSON body (256 ids and a 4 KB query fit with room to spare)."""
MAX_FORM_FIELD_BYTES = 8 * 1024
"""Largest text field of a multipart form."""
MAX_MIN_SCORE = 10_000.0
"""Bound on |min_score|: a composite score is at most 16 terms x weight 100 x cosine 1 = 1600."""
MAX_IMAGE_ID = 2**63 - 1
"""Ids are SQLite integers; anything larger cannot name an image."""
MAX_QUEUED_MODEL_CALLS = 32
"""Most queries waiting for the model at once (one more runs); more get 503 with Retry-After."""
MAX_DECODE_PIXELS = 50_000_000
"""Most pixels that thumbnails being made hold at once, all requests together: about 200 MB (twice that
for pictures with alpha). A JPEG is decoded at 1/2 to 1/8 scale (a few hundred thousand pixels), so many run at
once; a PNG, TIFF or WebP is decoded in full, so two 24 MP ones run at once and a larger one alone.
Others wait for their turn (in the event loop, as queries do)."""


class ApiError(HTTPException):
    """An HTTP error raised by this server, whose message already names the object, the reason and the fix."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code, message, headers)


def check_query_text(text: str, name: str = "q") -> str:
    """Refuse blank text and text over MAX_QUERY_BYTES (UTF-8), before the parser sees it."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_QUERY_BYTES:
        raise InvalidInputError(
            f"{name} is {size} bytes long, over the {MAX_QUERY_BYTES}-byte limit (searches use at most 1000 characters); "
            "shorten the query"
        )
    if is_blank(text):
        raise InvalidInputError(f"{name} is empty (or only invisible characters); pass the text to search for, e.g. {name}=a dog on the beach")
    return text


# How to fix each request parameter, used in validation messages.
FIXES = {
    "q": "pass the text to search for, e.g. q=a dog on the beach",
    "k": f"pass k between 1 and {MAX_K}",
    "rerank_k": f"pass rerank_k between 1 and {MAX_K}, or leave it out",
    "rerank": "pass rerank=true or rerank=false",
    "fusion": "pass fusion=true or fusion=false",
    "path": f"pass a glob of at most {MAX_PATH_GLOB_CHARS} characters, e.g. path=*/2023/*",
    "after": "pass a date such as after=2023-06-01",
    "before": "pass a date such as before=2023-12-31",
    "min_score": f"pass a number between -{MAX_MIN_SCORE:g} and {MAX_MIN_SCORE:g}, e.g. min_score=0.2",
    "sort": "pass sort=score or sort=date",
    "image": "send the picture as the multipart form field 'image'",
    "images": f"send 1 to {MAX_RERANK_UPLOADS} pictures as multipart form fields named 'images'",
    "query": "pass the text to score the images against",
    "ids": f"pass 1 to {MAX_RERANK_IDS} image ids taken from /api/search results",
    "image_id": "use an image id taken from /api/search results",
}


def describe_validation_errors(errors) -> str:
    """One line from pydantic/FastAPI validation errors: `where: what; fix`, joined by ' | '."""
    parts = []
    for err in list(errors)[:5]:
        loc = [str(x) for x in err.get("loc", ())]
        if loc and loc[0] in ("query", "body", "path", "form", "header", "cookie"):
            loc = loc[1:]  # where the parameter was sent, not its name
        where = ".".join(loc) or "body"
        field = next((x for x in loc if x in FIXES), None)
        if err.get("type") == "extra_forbidden":
            fix = "remove it; see /api/openapi.json for the fields this endpoint takes"
        else:
            fix = FIXES.get(field, "check the request against /api/openapi.json")
        parts.append(f"{where}: {err.get('msg', 'invalid value')}; {fix}")
    return " | ".join(parts) or "the request is malformed; check it against /api/openapi.json"


__all__ = [
    "ApiError",
    "FIXES",
    "MAX_BODY_BYTES",
    "MAX_DECODE_PIXELS",
    "MAX_FORM_FIELD_BYTES",
    "MAX_IMAGE_ID",
    "MAX_JSON_BYTES",
    "MAX_K",
    "MAX_MIN_SCORE",
    "MAX_PATH_GLOB_CHARS",
    "MAX_QUERY_BYTES",
    "MAX_QUEUED_MODEL_CALLS",
    "MAX_RERANK_IDS",
    "MAX_RERANK_UPLOADS",
    "MAX_UPLOAD_BYTES",
    "check_query_text",
    "describe_validation_errors",
]
