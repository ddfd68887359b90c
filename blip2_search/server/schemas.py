"""Shapes of request and response bodies, for validation and for the OpenAPI schema.

Responses are rendered by the library's own `as_dict()` / `asdict()`; these models only describe
them (and `RerankIds` validates the one JSON request body).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .limits import MAX_IMAGE_ID, MAX_RERANK_IDS


class ErrorOut(BaseModel):
    """Every 4xx/5xx answer: one line naming what was wrong and how to fix it."""

    error: str


class HitOut(BaseModel):
    """One search result (`Hit.as_dict()`)."""

    id: int
    path: str
    score: float = Field(description="What results are sorted by: ITM logit + ITC when reranked, the fused rank score with captions, else ITC.")
    itc: float = Field(description="ITC cosine (max over the 32 query vectors).")
    itm_logit: float | None = Field(description="ITM positive-class logit; null when not reranked.")
    caption: str | None
    taken_at: str | None = Field(description="EXIF capture time, ISO 8601, camera-local.")


class SearchOut(BaseModel):
    """`SearchResult.as_dict()`: the JSON of `blip2-search search --json`."""

    query: str
    results: list[HitOut]
    notes: list[str] | None = None


class RerankIds(BaseModel):
    """Score library images (by id) against a text with the ITM head."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(description="Text to match the images against (not blank; at most 4096 bytes).")
    ids: list[Annotated[StrictInt, Field(ge=1, le=MAX_IMAGE_ID)]] = Field(min_length=1, max_length=MAX_RERANK_IDS)  # true is not id 1


class RerankIdHit(BaseModel):
    """One library image scored like search's rerank: score = ITM logit + ITC (ITC from the stored vectors)."""

    id: int
    path: str
    score: float
    itc: float
    itm_logit: float
    caption: str | None
    taken_at: str | None


class RerankUploadHit(BaseModel):
    """One uploaded image scored like `blip2-search rerank`: score = ITM logit + ITC."""

    index: int = Field(description="Position of the image in the request.")
    filename: str | None
    score: float
    itc: float
    itm_logit: float
    match_probability: float


class RerankError(BaseModel):
    """An image that could not be scored."""

    id: int | None = None
    index: int | None = Field(default=None, description="Position of an uploaded image in the request.")
    filename: str | None = None
    error: str


class RerankOut(BaseModel):
    """Best first. `results` hold `RerankIdHit`s for a JSON request, `RerankUploadHit`s for uploads."""

    query: str
    results: list[RerankIdHit | RerankUploadHit]
    errors: list[RerankError]
    notes: list[str] | None = None


RERANK_UPLOAD_FORM = {
    "type": "object",
    "required": ["query", "images"],
    "properties": {
        "query": {"type": "string", "minLength": 1, "description": "Text to match the images against (at most 4096 bytes)."},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "description": "1 to 16 image files."},
    },
}


__all__ = ["ErrorOut", "HitOut", "RERANK_UPLOAD_FORM", "RerankError", "RerankIdHit", "RerankIds", "RerankOut", "RerankUploadHit", "SearchOut"]
