"""Typed search inputs and results shared by the engine, the library and the edges."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time

import numpy as np

from ..errors import InvalidInputError, Note, Spelled

MAX_K = 10_000


_ISO_BASIC = re.compile(r"(\d{4})(\d{2})(\d{2})")  # YYYYMMDD
_ISO_WEEK = re.compile(r"(\d{4})-?W(\d{2})(?:-?([1-7]))?")  # YYYY-Www[-D], YYYYWww[D]


def _iso_day(text: str, end_of_day: bool) -> date:
    """The day an ISO date names, read as Python 3.11 reads it on 3.10 too (whose date.fromisoformat reads
    YYYY-MM-DD only); a week without its day is its Monday, or with `end_of_day` its Sunday (the whole week).
    ValueError when `text` is not an ISO date."""
    if m := _ISO_BASIC.fullmatch(text):
        return date(*map(int, m.groups()))
    if m := _ISO_WEEK.fullmatch(text):
        year, week, day = m.groups()
        return date.fromisocalendar(int(year), int(week), int(day or (7 if end_of_day else 1)))
    return date.fromisoformat(text)


def parse_date(value, *, name: str, end_of_day: bool) -> datetime | None:
    """A date filter bound from a `datetime`, a `date` (the whole day), or text: an ISO date (`YYYY-MM-DD`,
    also `YYYYMMDD`: the whole day; a week `2023-W28`: the whole week) or a naive ISO date-time; None or "" means no bound.

    Capture times are camera-local and stored without a time zone, so an offset is refused rather
    than silently compared with local times. `name` is what messages call the bound: a keyword
    (`after = 'x'`) or a command-line option (`--after 'x'`).
    """
    if value is None or value == "":
        return None
    given = f"{name} {str(value)!r}" if name.startswith("-") else f"{name} = {value!r}"
    if isinstance(value, str):  # a date in any ISO form is the whole day: 20230715 too, which datetime reads as its midnight
        try:
            value = _iso_day(value, end_of_day)
        except ValueError:
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise InvalidInputError(f"{given} is not a date; pass YYYY-MM-DD or an ISO date-time, e.g. {name} 2023-06-01") from None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        return datetime.combine(value, time.max if end_of_day else time.min)
    else:
        raise InvalidInputError(f"{given} is a {type(value).__name__}, not a date; pass a datetime, a date or 'YYYY-MM-DD'")
    if parsed.tzinfo is not None:
        raise InvalidInputError(
            f"{given} has a time zone, but photo times are camera-local; drop the offset, "
            f"e.g. {name} {parsed.replace(tzinfo=None).isoformat(timespec='minutes')}"
        )
    return parsed


def make_filters(path=None, after=None, before=None, min_score=None) -> Filters:
    """`Filters` from what a caller passed (dates as `parse_date` takes them), each value checked."""
    if path is not None and not isinstance(path, str):
        raise InvalidInputError(f"path filter {path!r} is a {type(path).__name__}, not a glob; pass a string such as '*/2023/*'")
    path = path if path is None or path.strip() else None  # an empty glob is no filter, as in the CLI and HTTP API
    if min_score is not None and (isinstance(min_score, (bool, np.bool_)) or not isinstance(min_score, numbers.Real)):
        raise InvalidInputError(f"score filter {min_score!r} is a {type(min_score).__name__}, not a number; pass e.g. 0.3")
    return Filters(path_glob=path, after=parse_date(after, name="after", end_of_day=False),
                   before=parse_date(before, name="before", end_of_day=True), min_score=None if min_score is None else float(min_score))


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
            raise InvalidInputError(f"date filter: after {self.after:%Y-%m-%d} is later than before {self.before:%Y-%m-%d}; swap them")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise InvalidInputError(f"score filter {self.min_score} is not a finite number; pass e.g. 0.3, or drop it")
        if self.path_glob is not None and not self.path_glob.strip():
            raise InvalidInputError("path filter is empty; pass a glob such as '*/2023/*' or drop it")

    @property
    def active(self) -> bool:
        """Any filter given (each can leave no image)."""
        return self.restricts_ids or self.min_score is not None

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

    def __iter__(self):  # a result reads as its hits: `for hit in lib.search(...)`, `result[0]`, `len(result)`
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, index):
        return self.hits[index]

    def as_dict(self) -> dict:
        out = {"query": self.query, "results": [h.as_dict() for h in self.hits]}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def check_k(k: int, argument: str = "k") -> int:
    """A result count must be 1..MAX_K; `argument`: the parameter that gave it (`k`, `rerank_k`)."""
    whole = isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_))  # numpy integers too
    if not whole or k < 1 or k > MAX_K:
        what = "out of range" if whole else f"a {type(k).__name__}, not a whole number"
        raise InvalidInputError("{argument:{given}} is {what}; pass {argument} between 1 and {limit}", argument=argument,
                                given=repr(k), what=what, limit=MAX_K)
    return int(k)


def outcome_notes(hits: Sequence[Hit], *, glob: str | None, filtered: bool, sort: str) -> tuple[str, ...]:
    """What a search's hits alone do not say: a path glob that can match no recorded (absolute) path (how to
    write it), why there are no hits, and which hits were reranked when only some were (their scores are on
    another scale: ITM logit + ITC against the first stage's)."""
    notes = []
    if glob and not os.path.isabs(glob) and glob[0] not in "*?[":
        notes.append(f"path filter {glob!r} is relative, but photos are recorded by absolute path, so it matches none; "
                     "start it with '/' or '*/'")
    elif not hits:
        notes.append("no results: no photo passes the path, after, before or min-score filters; loosen them" if filtered else
                     Note("no results: the library has no searchable photos; run `{index}` first",
                          index=Spelled("Library.index(PHOTO_DIRS)", "blip2-search index PHOTO_DIR")))
    reranked = sum(h.itm_logit is not None for h in hits)
    if 0 < reranked < len(hits):
        if sort == "date":
            notes.append(f"{reranked} of these were reranked (those with an ITM logit; score = ITM logit + ITC); the others have "
                         "first-stage scores, on another scale; all are listed by date")
        elif all(h.itm_logit is not None for h in hits[:reranked]):
            notes.append(f"the first {reranked} were reranked (score = ITM logit + ITC); the rest keep the first stage's order and score")
        else:  # a candidate that could not be reread keeps its first-stage place
            notes.append(f"{reranked} of these were reranked (those with an ITM logit; score = ITM logit + ITC); the others keep their "
                         "first-stage place and score")
    return tuple(notes)
