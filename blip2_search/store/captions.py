"""Full-text search over captions: SQLite FTS5 with BM25, PostgreSQL text search with ts_rank.

User text never reaches FTS5 syntax: it is split into words and each word becomes a quoted
FTS5 string, so quotes, ``AND``/``OR``/``NOT``/``NEAR``, ``*``, ``^``, ``:`` and parentheses in a
query are matched as text (or dropped as punctuation), never parsed as operators. On PostgreSQL
each word is a bound parameter of ``plainto_tsquery``, which has no operators at all.
"""

from __future__ import annotations

import re

from functools import reduce

from sqlalchemy import Connection, and_, func, literal_column, or_, select, text

from blip2_search.store.records import STATUS_INDEXED
from blip2_search.store.schema import images

MAX_QUERY_TERMS = 32
"""Words beyond this many are ignored, bounding the cost of one query."""

_WORD = re.compile(r"[^\W_]+")

_FTS_SEARCH = text(
    "SELECT images_fts.rowid AS image_id, bm25(images_fts) AS rank "
    "FROM images_fts JOIN images ON images.id = images_fts.rowid "
    "WHERE images_fts MATCH :query AND images.status = :status "
    "ORDER BY rank, images_fts.rowid LIMIT :limit"
)


def query_terms(user_text: str) -> list[str]:
    """The words of ``user_text`` (letters and digits, case kept), at most ``MAX_QUERY_TERMS``."""
    return _WORD.findall(user_text)[:MAX_QUERY_TERMS]


def fts5_query(user_text: str, *, require_all: bool = True) -> str | None:
    """A safe FTS5 MATCH expression for ``user_text``, or None when it has no words.

    Each word is a double-quoted FTS5 string (words contain no quotes); words are joined by
    implicit AND when ``require_all`` else by OR.
    """
    terms = query_terms(user_text)
    if not terms:
        return None
    joiner = " " if require_all else " OR "
    return joiner.join(f'"{term}"' for term in terms)


def search_captions(
    connection: Connection, user_text: str, limit: int, *, require_all: bool = True
) -> list[tuple[int, float]]:
    """Indexed images whose caption matches ``user_text``: ``[(image_id, rank)]``, best first.

    On SQLite ``rank`` is FTS5's BM25 (lower, i.e. more negative, is better; ties by id). On
    PostgreSQL it is minus ``ts_rank`` (same order: lower is better), over whole lower-cased words
    as on SQLite, but diacritics must match. Elsewhere every word must occur in the caption
    (case-insensitive substring) and rank is 0.0, ordered by id.
    """
    if limit <= 0:
        return []
    dialect = connection.dialect.name
    if dialect == "sqlite":
        query = fts5_query(user_text, require_all=require_all)
        if query is None:
            return []
        rows = connection.execute(_FTS_SEARCH, {"query": query, "status": STATUS_INDEXED, "limit": limit})
        return [(int(row.image_id), float(row.rank)) for row in rows]
    terms = query_terms(user_text)
    if not terms:
        return []
    if dialect == "postgresql":
        return _search_postgres(connection, terms, limit, require_all=require_all)
    matches = [images.c.caption.ilike(f"%{term}%") for term in terms]
    condition = and_(*matches) if require_all else or_(*matches)
    statement = (
        select(images.c.id)
        .where(images.c.status == STATUS_INDEXED, condition)
        .order_by(images.c.id)
        .limit(limit)
    )
    return [(int(image_id), 0.0) for image_id in connection.scalars(statement)]


def _search_postgres(
    connection: Connection, terms: list[str], limit: int, *, require_all: bool
) -> list[tuple[int, float]]:
    config = literal_column("'simple'::regconfig")
    document = func.to_tsvector(config, func.coalesce(images.c.caption, literal_column("''")))  # = the index's
    queries = [func.plainto_tsquery(config, term) for term in terms]
    query = reduce(lambda a, b: a.op("&&" if require_all else "||")(b), queries)
    rank = (-func.ts_rank(document, query)).label("rank")
    statement = (
        select(images.c.id, rank)
        .where(images.c.status == STATUS_INDEXED, document.op("@@")(query))
        .order_by(rank, images.c.id)
        .limit(limit)
    )
    return [(int(image_id), float(score)) for image_id, score in connection.execute(statement)]
