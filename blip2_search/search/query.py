"""The query language: plain text, or weighted "quoted" terms joined by + and -.

A query without a double quote is always one term, exactly as typed (whitespace collapsed), so
ordinary sentences are never misread. A query with a double quote is split into terms at
stand-alone `+` / `-` operators; `W:"text"` weights a term. The engine scores an image by
sum_i weight_i * ITC(image, term_i). The full syntax, with examples, is in docs/queries.md.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from itertools import pairwise

from ..errors import InvalidInputError
from ..models.text import has_words, is_blank

_DROPPED = 'the marks . ! " ( ) * # : ; ~'

__all__ = ["MAX_QUERY_CHARS", "MAX_TERMS", "MAX_WEIGHT", "Query", "Term", "is_blank", "parse_query"]

MAX_QUERY_CHARS = 1000
MAX_TERMS = 16
MAX_WEIGHT = 100.0

# Straight and typographic ("smart") double quotes all delimit a quoted term: phone keyboards and
# word processors turn " into “ and ”.
_QUOTES = frozenset('"\u201c\u201d')
_OPERATORS = frozenset("+-")
# A weight chunk: optional operator signs, a plain decimal, a colon. Only ASCII digits count.
_WEIGHT = re.compile(r"(?P<signs>[+-]*)(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+):")
# Something that was meant as a weight but is not a decimal, e.g. 0,5: or 1.2.3: or 1e2:
_NUMBERISH = re.compile(r"(?P<signs>[+-]*)(?P<num>[0-9.,]*[0-9](?:[0-9.,]|[eE][+-]?[0-9])*):")
# A weight glued to unquoted text, e.g. 0.5:people (meant 0.5:"people"); a digit after the colon is a
# time or a ratio (12:30, 16:9), plain text.
_WEIGHT_ON_TEXT = re.compile(r"(?P<signs>[+-]*)(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+):(?P<rest>[^0-9:].*)", re.DOTALL)
# What a cut can leave dangling at the end of the kept text: an operator, or a weight (with its sign).
_DANGLING = re.compile(r"[+-]+|[+-]*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+):")
_SNIPPET_CHARS = 12


@dataclass(frozen=True)
class Term:
    """One part of a query: text to embed and its signed weight (negative demotes matches)."""

    text: str
    weight: float

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or is_blank(self.text) or self.text != self.text.strip():
            raise InvalidInputError(
                f"query term {self.text!r} is empty or has surrounding whitespace; pass stripped, non-empty text"
            )
        if not has_words(self.text):
            raise InvalidInputError(f"query term {self.text!r} has no words the model reads (it drops {_DROPPED}); pass text with words")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w == 0:
            raise InvalidInputError(
                f"query term {self.text!r} has weight {w!r}; pass a finite, nonzero number (negative to demote)"
            )
        object.__setattr__(self, "weight", float(w))


@dataclass(frozen=True)
class Query:
    """A parsed query: its terms in the order written, the text they came from, and whether it was cut.

    `raw` is the text that was parsed: the input, or when `truncated` its first part (at most
    MAX_QUERY_CHARS characters, cut at a word boundary where possible).
    """

    terms: tuple[Term, ...]
    raw: str
    truncated: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.terms, tuple) or not self.terms or not all(isinstance(t, Term) for t in self.terms):
            raise InvalidInputError("query has no terms; pass a non-empty tuple of Term")
        if not any(t.weight > 0 for t in self.terms):
            raise InvalidInputError("query has no positive term; add a term with a positive weight")

    @property
    def positive(self) -> tuple[Term, ...]:
        """Terms with a positive weight (what to look for)."""
        return tuple(t for t in self.terms if t.weight > 0)

    @property
    def negative(self) -> tuple[Term, ...]:
        """Terms with a negative weight (what to push down)."""
        return tuple(t for t in self.terms if t.weight < 0)

    @property
    def itm_text(self) -> str:
        """The one text ITM scores: the positive terms, in order (negatives shape the ITC ranking only)."""
        return " ".join(t.text for t in self.positive)

    @property
    def is_simple(self) -> bool:
        """True for a single term of weight 1.0: the engine can use its plain nearest-neighbour path."""
        return len(self.terms) == 1 and self.terms[0].weight == 1.0


def parse_query(text: str) -> Query:
    """Parse a search box query into weighted terms (syntax: docs/queries.md).

    Text longer than MAX_QUERY_CHARS is cut (at a word boundary where possible) and flagged with
    `truncated=True` rather than refused. Raises InvalidInputError, with the column (1-based, in `text`)
    and a fix, for an empty query or malformed syntax.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"query must be text, got {type(text).__name__}; pass a str such as 'a red car'")
    body, offset, truncated = _truncate(text)
    terms = _Parser(body, offset, truncated).terms()
    return Query(terms, body if truncated else text, truncated)


# ---------------------------------------------------------------------------------------------
# truncation


def _truncate(text: str) -> tuple[str, int, bool]:
    """(text to parse, its offset in `text`, truncated?). Surrounding whitespace does not count."""
    lead = len(text) - len(text.lstrip())
    end = len(text.rstrip())
    if end - lead <= MAX_QUERY_CHARS:
        return text, 0, False
    limit = lead + MAX_QUERY_CHARS
    cut = limit
    if not text[limit].isspace():
        # Back up to the last whitespace, unless that would drop more than half of what is allowed.
        floor = lead + MAX_QUERY_CHARS // 2
        for i in range(limit - 1, floor - 1, -1):
            if text[i].isspace():
                cut = i
                break
    return text[lead:cut].rstrip(), lead, True


# ---------------------------------------------------------------------------------------------
# lexing and parsing


@dataclass(frozen=True)
class _Item:
    """A lexical item. `start`/`end` index the parsed text; a phrase spans its quote marks."""

    kind: str  # "op", "phrase", "word", "weight" (W: glued to a quote), "loose_weight", "bad_weight"
    text: str  # op: "+"/"-"; phrase: the unquoted text; word: the word; weights: the raw chunk
    start: int
    end: int
    weight: float | None = None  # phrase: its weight when written W:"..."; weight: the value
    weight_start: int | None = None  # phrase: where its W: began


class _Parser:
    """Turns one (possibly truncated) query text into terms; every error names its column."""

    def __init__(self, text: str, offset: int, truncated: bool):
        self.text = text
        self.offset = offset
        self.truncated = truncated

    # -- errors ---------------------------------------------------------------------------------

    def _where(self, index: int) -> str:
        """'column N (snippet...)' for a position in the parsed text."""
        snippet = self.text[index : index + _SNIPPET_CHARS]
        more = "..." if index + _SNIPPET_CHARS < len(self.text) else ""
        snippet = "".join(" " if c.isspace() else c for c in snippet)
        return f"column {self.offset + index + 1} ({snippet}{more})"

    def _fail(self, what: str, index: int, fix: str) -> InvalidInputError:
        """The error for `what` (a phrase with an `{at}` slot for the column and snippet) and its fix."""
        return InvalidInputError(f"query: {what.replace('{at}', 'at ' + self._where(index))}; {fix}")

    # -- parsing -------------------------------------------------------------------------------

    def terms(self) -> tuple[Term, ...]:
        """The terms of the query, in the order written."""
        if is_blank(self.text):
            raise InvalidInputError(
                f"query: nothing to search for at column {self.offset + 1} (the query is empty, or only whitespace and invisible characters); "
                "type a description of the photos, e.g. a red car on a beach"
            )
        if not any(c in _QUOTES for c in self.text):
            words = self.text.split()
            while self.truncated and len(words) > 1 and _DANGLING.fullmatch(words[-1]):
                words.pop()  # an operator or weight the cut separated from its (quoted) term
            if not has_words(" ".join(words)):
                raise self._no_words(self.text.index(words[0]))
            return (Term(" ".join(words), 1.0),)
        segments = self._segments(self._attach_weights(self._lex()))
        if not segments:
            raise InvalidInputError(
                f"query: nothing to search for at column {self.offset + 1} (only operators survived truncation); "
                "shorten the query so that its terms come first"
            )
        if len(segments) > MAX_TERMS:
            sign, items = segments[MAX_TERMS]
            raise self._fail(
                f"too many terms ({len(segments)}, the limit is {MAX_TERMS}): term {MAX_TERMS + 1} starts {{at}}",
                (sign or items[0]).start,
                f"merge or remove terms so that at most {MAX_TERMS} remain",
            )
        terms = tuple(self._term(sign, items) for sign, items in segments)
        if not any(t.weight > 0 for t in terms):
            sign, items = segments[0]
            raise self._fail(
                "every term is negative, so there is nothing to look for: the first is {at}",
                (sign or items[0]).start,
                'add a term to look for, e.g. "sunset" - "people"',
            )
        return terms

    def _lex(self) -> list[_Item]:
        """Split the text into operators, quoted phrases, weights and words, left to right."""
        text, n = self.text, len(self.text)
        items: list[_Item] = []
        i = 0
        while i < n:
            if text[i].isspace():
                i += 1
            elif text[i] in _QUOTES:
                phrase = self._phrase(i)
                if phrase is not None:
                    items.append(phrase)
                i = phrase.end if phrase is not None else n
            else:
                j, chars = i, []
                while j < n and not text[j].isspace() and text[j] not in _QUOTES:
                    if text[j] == "\\" and j + 1 < n and text[j + 1] in _QUOTES:
                        chars.append(text[j + 1])
                        j += 2
                    else:
                        chars.append(text[j])
                        j += 1
                items.extend(self._chunk(text[i:j], "".join(chars), i, j))
                i = j
        if self.truncated:
            # The cut may have split an operator or weight from the term that followed it.
            while items and items[-1].kind in ("op", "weight", "loose_weight", "bad_weight"):
                items.pop()
        return items

    def _phrase(self, start: int) -> _Item | None:
        """The quoted phrase opening at `start`; None for an unclosed, blank phrase cut off by truncation."""
        text, n = self.text, len(self.text)
        j, chars, escaped = start + 1, [], False
        while j < n:
            c = text[j]
            if c == "\\" and j + 1 < n and text[j + 1] in _QUOTES:
                chars.append(text[j + 1])
                escaped = True
                j += 2
            elif c in _QUOTES:
                break
            else:
                chars.append(c)
                j += 1
        else:
            if not self.truncated:
                hint = " (a \\\" inside quotes is a literal quote mark, not the end)" if escaped else ""
                raise self._fail(
                    "unclosed quote opened {at}", start, f'close it with ", or write \\" for a literal quote mark{hint}'
                )
            # Truncation cut the phrase: keep what there is, or drop it when nothing is left.
            content = "".join(chars).strip()
            return _Item("phrase", content, start, n) if content else None
        content = " ".join("".join(chars).split())
        if is_blank(content):
            raise self._fail("empty quoted term {at}", start, "put text between the quotes or remove them")
        return _Item("phrase", content, start, j + 1)

    def _chunk(self, raw: str, literal: str, start: int, end: int) -> list[_Item]:
        """Classify a run of non-space, unquoted characters: operator, weight, or a word of text."""
        glued = end < len(self.text) and self.text[end] in _QUOTES  # directly before an opening quote
        if raw in _OPERATORS:
            return [_Item("op", raw, start, end)]
        if set(raw) <= _OPERATORS:
            raise self._fail("two operators in a row {at}", start, "keep one: + to add a term, - to exclude it")
        m = _WEIGHT.fullmatch(raw)
        kind = ("weight" if glued else "loose_weight") if m else None
        if m is None:
            m = _NUMBERISH.fullmatch(raw)
            kind = "bad_weight" if m is not None and glued else None
        if kind is None and raw == literal and (on_text := _WEIGHT_ON_TEXT.fullmatch(raw)):
            # `W:text`: a weight missing its quotes when it starts a term (see _term), else text; a sign in
            # front makes it start one, as before a weight (`-0.5:people`).
            signs, cut = on_text.group("signs"), on_text.start("rest")
            if len(signs) > 1:
                raise self._fail("two operators in a row {at}", start, "keep one: + to add a term, - to exclude it")
            items = [_Item("op", signs, start, start + 1)] if signs else []
            return items + [_Item("loose_weight", raw[len(signs) : cut], start + len(signs), start + cut),
                            _Item("word", raw[cut:], start + cut, end)]
        if kind is None:
            return [_Item("word", literal, start, end)]
        signs, num = m.group("signs"), m.group("num")
        if len(signs) > 1:
            raise self._fail("two operators in a row {at}", start, "keep one: + to add a term, - to exclude it")
        items = [_Item("op", signs, start, start + 1)] if signs else []
        at = start + len(signs)
        if kind != "weight":
            # Text unless it starts a term; a sign in front makes it start one (see _term).
            items.append(_Item(kind, raw[len(signs) :], at, end))
            return items
        value = float(num)
        if not (math.isfinite(value) and 0 < value <= MAX_WEIGHT):
            raise self._fail(
                f"weight {num} {{at}} is out of range", at,
                f'use a number above 0 and at most {MAX_WEIGHT:g}, e.g. 2:"red car" or 0.5:"red car"',
            )
        items.append(_Item("weight", num, at, end, weight=value))
        return items

    def _attach_weights(self, items: list[_Item]) -> list[_Item]:
        """Fold each `W:` into the quoted phrase that directly follows it."""
        out: list[_Item] = []
        for item in items:
            if out and out[-1].kind == "weight" and item.kind == "phrase" and item.start == out[-1].end:
                w = out.pop()
                item = _Item("phrase", item.text, item.start, item.end, weight=w.weight, weight_start=w.start)
            out.append(item)
        return out

    def _segments(self, items: list[_Item]) -> list[tuple[_Item | None, list[_Item]]]:
        """Split at operators into (sign operator or None, items of one term)."""
        segments: list[tuple[_Item | None, list[_Item]]] = []
        sign: _Item | None = None
        current: list[_Item] = []
        for item in items:
            if item.kind != "op":
                current.append(item)
            elif current:
                segments.append((sign, current))
                sign, current = item, []
            elif sign is not None:
                raise self._fail("two operators in a row {at}", sign.start, "keep one: + to add a term, - to exclude it")
            else:
                sign = item
        if current:
            segments.append((sign, current))
        elif sign is not None:
            raise self._fail(
                f"operator {sign.text} {{at}} has no term after it", sign.start,
                f'add a term after it, e.g. {sign.text} "people", or remove the {sign.text}',
            )
        return segments

    def _not_a_number(self, weight: _Item) -> InvalidInputError:
        """The error for a `bad_weight` item (0,5: or 1e2: before a quote)."""
        return self._fail(f"weight {weight.text[:-1]} {{at}} is not a number", weight.start, 'write a decimal with a dot, e.g. 0.5:"people"')

    def _term(self, sign: _Item | None, items: list[_Item]) -> Term:
        """One term from the items between two operators; `sign` is the operator before them, if any."""
        first = items[0]
        if first.kind in ("loose_weight", "bad_weight"):
            start, label = first.start, first.text[:-1]
            if first.kind == "bad_weight":
                raise self._not_a_number(first)
            glued = items[1].text if len(items) > 1 and items[1].start == first.end and items[1].kind == "word" else None
            raise self._fail(
                f"weight {label}: {{at}} is not directly followed by a quoted term", start,
                f'quote the text: {label}:"{glued}", or remove the weight' if glued else
                f'write {label}:"text" with no space after the colon, or remove the weight',
            )
        for item in items[1:]:
            if item.kind == "bad_weight":
                raise self._not_a_number(item)
            if item.weight is not None:
                raise self._fail(
                    "weight {at} is in the middle of a term", item.weight_start,
                    "put + or - before it to make it a term of its own",
                )
        if first.weight is not None and len(items) > 1:
            nxt = items[1]
            follow = nxt.text if nxt.kind != "phrase" else f'"{nxt.text}"'
            follow = follow if len(follow) <= 2 * _SNIPPET_CHARS else follow[: 2 * _SNIPPET_CHARS] + "..."
            raise self._fail(
                "weighted term {at} is followed by more text in the same term", first.weight_start,
                f"put + or - before {follow}, or move it inside the quotes",
            )
        pieces = [items[0].text]
        for prev, item in pairwise(items):
            # Quote marks are dropped; text that touched them stays joined (a"b"c reads abc).
            pieces.append(item.text if item.start == prev.end else " " + item.text)
        weight = first.weight if first.weight is not None else 1.0
        if sign is not None and sign.text == "-":
            weight = -weight
        text = " ".join("".join(pieces).split())
        if not has_words(text):
            raise self._no_words(first.start)
        return Term(text, weight)

    def _no_words(self, index: int) -> InvalidInputError:
        return self._fail(f"nothing to search for in the term {{at}}: the model drops {_DROPPED}, and the term has nothing else",
                          index, "type a description of the photos, e.g. a red car on a beach")
