"""Typed search inputs and results shared by the engine, the library and the edges."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from ..errors import InvalidInputError

MAX_K = 10_000


@dataclass(frozen=True)
class Filters:
    """Filters applied inside the search (before taking the top k).

    `path_glob`: shell pattern on the absolute path (`*` crosses `/`); `after`/`before`: EXIF capture
    time, inclusive; `min_score`: minimum ITC cosine (`itc`).
    """

    path_glob: str | None = None
    after: datetime | None = None
    before: datetime | None = None
    min_score: float | None = None

    def __post_init__(self):
        if self.after and self.before and self.after > self.before:
            raise InvalidInputError(f"date filter: --after {self.after:%Y-%m-%d} is later than --before {self.before:%Y-%m-%d}; swap them")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise InvalidInputError(f"score filter {self.min_score} is not a finite number; pass e.g. --min-score 0.3, or drop it")
        if self.path_glob is not None and not self.path_glob.strip():
            raise InvalidInputError("path filter is empty; pass a glob such as '*/2023/*' or drop --path")

    @property
    def restricts_ids(self) -> bool:
        return self.path_glob is not None or self.after is not None or self.before is not None


@dataclass(frozen=True)
class Hit:
    """One result. `score` is what results are sorted by: ITM logit + ITC when reranked, the fused
    rank score when captions were fused, else ITC. `itm_logit` is None when not reranked."""

    id: int
    path: str
    score: float
    itc: float
    itm_logit: float | None
    caption: str | None
    taken_at: datetime | None

    def as_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": self.score, "itc": self.itc, "itm_logit": self.itm_logit,
                "caption": self.caption, "taken_at": self.taken_at.isoformat() if self.taken_at else None}


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query, best first, and notes for the user (e.g. a truncated query)."""

    query: str
    hits: tuple[Hit, ...]
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        out = {"query": self.query, "results": [h.as_dict() for h in self.hits]}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def check_k(k: int, name: str = "k") -> int:
    """A result count must be 1..MAX_K."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > MAX_K:
        raise InvalidInputError(f"{name} = {k!r} is out of range; pass -{'k' if name == 'k' else '-' + name} between 1 and {MAX_K}")
    return k
