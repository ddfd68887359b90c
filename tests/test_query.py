"""Tests for blip2_search.search.query: plain text stays literal, composite syntax, errors, truncation.

The examples and error tables in docs/queries.md are parsed here and checked against the parser, so
the documentation cannot drift from the behaviour.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blip2_search.errors import InvalidInputError
from blip2_search.search.query import MAX_QUERY_CHARS, MAX_TERMS, MAX_WEIGHT, Query, Term, has_words, is_blank, parse_query

DOCS = Path(__file__).resolve().parents[1] / "docs" / "queries.md"


def norm(text: str) -> str:
    """Whitespace-normalised text, as the parser stores it."""
    return " ".join(text.split())


def pairs(query: Query) -> list[tuple[str, float]]:
    return [(t.text, t.weight) for t in query.terms]


def raises(text: str) -> str:
    """The message of the InvalidInputError that parsing `text` raises."""
    with pytest.raises(InvalidInputError) as info:
        parse_query(text)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# plain text: always one term, exactly as typed


PLAIN = [
    "a red circle on the left",
    "t-shirt",
    "a well-lit kitchen with a t-shirt on the chair",
    "-5 degrees on a frozen lake",
    "- leading dash then text",
    "before - after",
    "sunset - people",
    "a + b written on a whiteboard",
    "C++ book on a desk",
    "+1 for this photo",
    "trailing dash -",
    "trailing plus +",
    "-",
    "+",
    "--",
    "before -- after",
    "the clock shows 12:30",
    "12:30",
    "2: dogs",
    "2:",
    "0.5:cats",
    "step 2: mix the flour",
    "don't walk sign",
    "'single quoted' words",
    "it's the dog's bone",
    "2 dogs",
    "3.5 kg of apples",
    "1e-1 meters",
    "100% cotton",
    "café in Zürich",
    "東京タワー at night",
    "a dog 🐶 and a cat 🐱",
    "👨‍👩‍👧 family picnic",
    "back\\slash and a/b path",
    "colon: at the end:",
    "a,b;c.d!e?f",
    "emoji then dash 🎉 - 🎈",
    "x - y + z",
    "100:cats",
    "0:nothing",
]


@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_is_one_term_exactly_as_typed(text):
    q = parse_query(text)
    assert pairs(q) == [(text, 1.0)]
    assert q.is_simple and q.raw == text and not q.truncated


@pytest.mark.parametrize("text, column", [("!!!", 1), ("...", 1), ("  #", 3), ('"!!!"', 1), ('\\"', 1),
                                           ('a red circle - "..."', 16), ('"a dog" - 2:"(:)"', 13)])
def test_a_term_of_only_the_marks_the_model_drops_is_refused(text, column):
    """BLIP-2's text normalisation drops .!"()*#:;~: such a term was searched as an empty text, silently (its
    ranking arbitrary; as a negative term it moved every ranking)."""
    with pytest.raises(InvalidInputError, match=rf"^query: nothing to search for in the term at column {column} .*the model drops"):
        parse_query(text)
    with pytest.raises(InvalidInputError, match="has no words the model reads"):
        Term("...", 1.0)
    assert parse_query("12:30 p.m.").terms == (Term("12:30 p.m.", 1.0),)  # read as "12 30 p m": words are left


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  a   red\tcircle \n on the left  ", "a red circle on the left"),
        ("\u00a0non-breaking\u2003spaces\u3000too ", "non-breaking spaces too"),
        ("Mixed CASE Is Kept", "Mixed CASE Is Kept"),
    ],
)
def test_plain_text_whitespace_is_collapsed_and_case_kept(text, expected):
    assert pairs(parse_query(text)) == [(expected, 1.0)]


# ---------------------------------------------------------------------------------------------
# composite queries


COMPOSITE = [
    ('"a red circle" - "on the left"', [("a red circle", 1.0), ("on the left", -1.0)]),
    ('2:"red circle" + "on the top"', [("red circle", 2.0), ("on the top", 1.0)]),
    ('sunset over the sea - 0.5:"people"', [("sunset over the sea", 1.0), ("people", -0.5)]),
    ('sunset over the sea -0.5:"people"', [("sunset over the sea", 1.0), ("people", -0.5)]),
    ('sunset +2:"sea"', [("sunset", 1.0), ("sea", 2.0)]),
    ('"a"-"b"', [("a", 1.0), ("b", -1.0)]),
    ('"a"+"b"', [("a", 1.0), ("b", 1.0)]),
    ('-"people" + "sunset"', [("people", -1.0), ("sunset", 1.0)]),
    ('- "people" + sunset', [("people", -1.0), ("sunset", 1.0)]),
    ('+ "a cat"', [("a cat", 1.0)]),
    ('"a cat"', [("a cat", 1.0)]),
    ('1:"a cat"', [("a cat", 1.0)]),
    ('a sign saying "open"', [("a sign saying open", 1.0)]),
    ('"red" "car"', [("red car", 1.0)]),
    ('a"b"c', [("abc", 1.0)]),
    ('a-"b"', [("a-b", 1.0)]),
    ('"  lots   of \n space  "', [("lots of space", 1.0)]),
    ('"a 12\\" vinyl record" - "turntable"', [('a 12" vinyl record', 1.0), ("turntable", -1.0)]),
    ('12\\" vinyl - "black"', [('12" vinyl', 1.0), ("black", -1.0)]),
    ('"back\\slash"', [("back\\slash", 1.0)]),
    ("\u201csnowy mountains\u201d - \u201cskiers\u201d", [("snowy mountains", 1.0), ("skiers", -1.0)]),
    ('"mixed\u201d - \u201dquotes"', [("mixed", 1.0), ("quotes", -1.0)]),
    ('"beach" + palm trees - "people" - 0.3:"cars"', [("beach", 1.0), ("palm trees", 1.0), ("people", -1.0), ("cars", -0.3)]),
    ('"t-shirt" + well-lit 12:30 - "don\'t"', [("t-shirt", 1.0), ("well-lit 12:30", 1.0), ("don't", -1.0)]),
    ('"cake" + step 2: mix', [("cake", 1.0), ("step 2: mix", 1.0)]),
    ('0.5:"dog" + 100:"frisbee"', [("dog", 0.5), ("frisbee", 100.0)]),
    ('.5:"a" + 3.:"b" + 007:"c"', [("a", 0.5), ("b", 3.0), ("c", 7.0)]),
    ('"🐶" - "🐱"', [("🐶", 1.0), ("🐱", -1.0)]),
    ('"a" 0,5 b', [("a 0,5 b", 1.0)]),  # a comma number not touching a quote is text
    ('"clock" + 12:30', [("clock", 1.0), ("12:30", 1.0)]),  # a time or ratio starting a term is text
    ('"tv" + 16:9 screen', [("tv", 1.0), ("16:9 screen", 1.0)]),
    ('"cake" + step 2:mix', [("cake", 1.0), ("step 2:mix", 1.0)]),  # W:text inside a term is text
]


@pytest.mark.parametrize("text, expected", COMPOSITE)
def test_composite_queries(text, expected):
    q = parse_query(text)
    assert pairs(q) == expected
    assert q.raw == text and not q.truncated


def test_positive_negative_and_is_simple():
    q = parse_query('"beach" + palm trees - "people" - 0.3:"cars"')
    assert [t.text for t in q.positive] == ["beach", "palm trees"]
    assert [t.text for t in q.negative] == ["people", "cars"]
    assert not q.is_simple
    assert parse_query('"beach"').is_simple
    assert not parse_query('2:"beach"').is_simple
    assert not parse_query('"beach" + "sun"').is_simple


# ---------------------------------------------------------------------------------------------
# errors: what, where (column and snippet), and the fix


ERRORS = [
    # (query, column, snippet at that column, a fragment of the fix)
    ("", 1, None, "type a description"),
    ("   \n\t ", 1, None, "type a description"),
    ("\u200b \ufeff\x00", 1, None, "type a description"),  # invisible characters only
    ('"a" + "\u200b"', 7, '"\u200b"', "put text between the quotes"),
    ('a "red circle', 3, '"red circle', 'close it with "'),
    ('"abc\\" d', 1, '"abc\\" d', "literal quote mark, not the end"),
    ('"a" - "b', 7, '"b', 'close it with "'),
    ('""', 1, '""', "put text between the quotes"),
    ('"cat" + ""', 9, '""', "put text between the quotes"),
    ('"cat" + "   "', 9, '"   "', "put text between the quotes"),
    ('"a" -', 5, "-", "add a term after it"),
    ('"a" +   ', 5, "+", "add a term after it"),
    ('"a" + - "b"', 5, '+ - "b"', "keep one"),
    ('"a" -- "b"', 5, '-- "b"', "keep one"),
    ('"x" + before -- after', 14, "-- after", "keep one"),
    ('"a" --2:"b"', 5, '--2:"b"', "keep one"),
    ('+ - "a"', 1, '+ - "a"', "keep one"),
    ('"a" + 2: "b"', 7, '2: "b"', "with no space after the colon"),
    ('"a" + 2: dogs', 7, "2: dogs", "with no space after the colon"),
    ('"a" + 2:', 7, "2:", "with no space after the colon"),
    ('"a" -0.5: "b"', 6, '0.5: "b"', "with no space after the colon"),
    ('0:"a"', 1, '0:"a"', "above 0 and at most 100"),
    ('0.0:"a"', 1, '0.0:"a"', "above 0 and at most 100"),
    ('100.5:"a"', 1, '100.5:"a"', "above 0 and at most 100"),
    ('"a" - 200:"b"', 7, '200:"b"', "above 0 and at most 100"),
    ("9" * 400 + ':"a"', 1, "9" * 12, "above 0 and at most 100"),
    ('"sunset" -0.5:people', 11, "0.5:people", 'quote the text: 0.5:"people"'),  # W:text starting a term
    ('"sunset" - 0.5:people', 12, "0.5:people", 'quote the text: 0.5:"people"'),
    ('"a" + 2:dogs', 7, "2:dogs", 'quote the text: 2:"dogs"'),
    ('"a" +-2:dogs', 5, "+-2:dogs", "keep one"),
    ('0,5:"a"', 1, '0,5:"a"', "write a decimal with a dot"),
    ('- 1e2:"people"', 3, '1e2:"people"', "write a decimal with a dot"),
    ('"x" 1e2:"y"', 5, '1e2:"y"', "write a decimal with a dot"),  # inside a term too
    ('"a" + 1e-2:"b"', 7, '1e-2:"b"', "write a decimal with a dot"),
    ('"a" + 1.2.3:"b"', 7, '1.2.3:"b"', "write a decimal with a dot"),
    ('car 2:"red"', 5, '2:"red"', "put + or - before it"),
    ('"a" 2:"b"', 5, '2:"b"', "put + or - before it"),
    ('2:"red" car', 1, '2:"red" car', "put + or - before car"),
    ('2:"red" "car"', 1, '2:"red" "car...', 'put + or - before "car"'),
    ('- "people"', 1, '- "people"', "add a term to look for"),
    ('-"people" - "cars"', 1, '-"people" - ', "add a term to look for"),
    ('- 0.5:"people" -"cars"', 1, '- 0.5:"peopl', "add a term to look for"),
]


@pytest.mark.parametrize("text, column, snippet, fix", ERRORS)
def test_errors_name_column_snippet_and_fix(text, column, snippet, fix):
    message = raises(text)
    assert "\n" not in message and message.startswith("query: ")
    assert f"column {column}" in message
    if snippet is not None:
        assert f"column {column} ({snippet}" in message
    _, _, remedy = message.partition("; ")
    assert remedy and fix in remedy, message


def test_error_columns_count_characters_not_bytes():
    message = raises('🐶🐱 "cat')
    assert 'column 4 ("cat)' in message


def test_error_snippet_is_one_line_and_shortened():
    message = raises('"a" -\n\n+ "b" and a long tail of words')
    assert "\n" not in message
    assert 'column 5 (-  + "b" and...)' in message


def test_too_many_terms():
    ok = " + ".join(f'"t{i}"' for i in range(MAX_TERMS))
    assert len(parse_query(ok).terms) == MAX_TERMS
    too_many = ok + ' - "extra"'
    message = raises(too_many)
    column = too_many.index(' - "extra"') + 2
    assert f"too many terms ({MAX_TERMS + 1}, the limit is {MAX_TERMS})" in message
    assert f'column {column} (- "extra")' in message
    assert "merge or remove terms" in message


def test_not_a_string():
    for bad in (None, b"bytes", 3, ["a"]):
        with pytest.raises(InvalidInputError, match="pass a str"):
            parse_query(bad)


# ---------------------------------------------------------------------------------------------
# truncation


def test_query_at_the_limit_is_not_truncated():
    text = ("word " * (MAX_QUERY_CHARS // 5))[: MAX_QUERY_CHARS - 1] + "x"
    assert len(text) == MAX_QUERY_CHARS
    q = parse_query(text)
    assert not q.truncated and q.raw == text


def test_whitespace_at_the_ends_does_not_count():
    text = "  " + "a" * MAX_QUERY_CHARS + " \n "
    q = parse_query(text)
    assert not q.truncated and q.terms[0].text == "a" * MAX_QUERY_CHARS


def test_long_plain_text_is_cut_at_a_word_boundary():
    words = [f"w{i:03d}" for i in range(400)]  # 5 characters each with the space: 2000 characters
    text = " ".join(words)
    q = parse_query(text)
    assert q.truncated
    assert len(q.raw) <= MAX_QUERY_CHARS
    assert q.raw == " ".join(words[: len(q.raw.split())])  # whole words only
    assert len(q.raw) > MAX_QUERY_CHARS - 5
    assert q.is_simple and q.terms[0].text == q.raw


def test_cut_exactly_at_a_space_keeps_the_full_limit():
    text = "a" * MAX_QUERY_CHARS + " tail"
    q = parse_query(text)
    assert q.truncated and q.raw == "a" * MAX_QUERY_CHARS


def test_a_single_long_word_is_cut_hard():
    q = parse_query("z" * (3 * MAX_QUERY_CHARS))
    assert q.truncated and q.raw == "z" * MAX_QUERY_CHARS


def test_leading_whitespace_does_not_eat_the_budget_and_columns_stay_in_the_input():
    pad = " " * 3000
    q = parse_query(pad + "cat " * 600)
    assert q.truncated and q.raw.startswith("cat") and len(q.raw) <= MAX_QUERY_CHARS
    message = raises(pad + '"a" + + "b" ' + "x " * 600)
    assert f"column {len(pad) + 5} (+ + " in message


def test_truncation_inside_a_quoted_term_keeps_its_start():
    text = '"sunset" - "' + "people " * 400 + '"'
    q = parse_query(text)
    assert q.truncated
    assert q.terms[0] == Term("sunset", 1.0)
    assert q.terms[1].weight == -1.0 and q.terms[1].text.startswith("people people")
    assert len(q.terms) == 2


def test_truncation_drops_a_dangling_operator_or_weight():
    head = '"' + "x " * 498 + '"'  # 998 characters
    for tail in (' - "people"', ' -2:"people"', ' -     "people"', ' - "', '2:"people"'):
        q = parse_query(head + tail + " " * 5 + "y" * 2000)
        assert q.truncated
        assert len(q.raw) <= MAX_QUERY_CHARS
        assert [t.weight for t in q.terms] == [1.0], tail


def test_a_cut_that_keeps_no_quote_reads_plain_and_drops_what_dangles():
    """The kept text decides: without a quote it is one plain term (a '-' inside it stays text, never an
    exclusion), and an operator or weight the cut separated from its quoted term is dropped."""
    for tail in ('- "bbbbbbbbbb"', '+ 2:"bbbbbbbbbb"', '-0.5:"bbbbbbbbbb"'):
        q = parse_query("a " * 499 + tail)
        assert q.truncated and [t.text for t in q.terms] == [" ".join(["a"] * 499)], tail
    long = "a beach at sunset - no people " + "word " * 200 + 'he said "hi"'
    q = parse_query(long)
    assert q.truncated and [(t.text, t.weight) for t in q.terms] == [(" ".join(q.raw.split()), 1.0)] and "- no people" in q.raw
    assert parse_query("2: mix the flour " + "word " * 200 + '"hi"').terms[0].text.startswith("2: mix the flour")


def test_truncation_does_not_hide_errors_before_the_cut():
    message = raises('"a" + + "b" ' + "word " * 500)
    assert "two operators in a row at column 5" in message


# ---------------------------------------------------------------------------------------------
# data model


def test_terms_and_queries_are_frozen_and_validated():
    t = Term("cat", 2)
    assert t.weight == 2.0 and isinstance(t.weight, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.text = "dog"
    for text, weight in [("", 1.0), (" cat", 1.0), ("cat", 0.0), ("cat", math.inf), ("cat", math.nan), ("cat", True), ("cat", "1")]:
        with pytest.raises(InvalidInputError):
            Term(text, weight)
    with pytest.raises(InvalidInputError):
        Query((), "", False)
    with pytest.raises(InvalidInputError):
        Query((Term("cat", -1.0),), '-"cat"', False)
    q = Query((Term("cat", 1.0),), "cat")
    assert q.is_simple and not q.truncated


# ---------------------------------------------------------------------------------------------
# docs/queries.md is the specification


def _doc_tables(heading: str) -> list[list[str]]:
    """Rows (cells, stripped) of the markdown table(s) under `## heading` in docs/queries.md."""
    section = DOCS.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows[1:]  # drop the header row


def _code(cell: str) -> str:
    m = re.fullmatch(r"`(.*)`", cell)
    assert m, cell
    return m.group(1)


def test_docs_examples_parse_to_the_documented_terms():
    rows = _doc_tables("Examples")
    assert len(rows) >= 10
    for query_cell, terms_cell in rows:
        text = _code(query_cell)
        documented = [
            (m.group(1), float(m.group(2).replace("\u2212", "-")))
            for m in re.finditer(r"\(`(.*?)`, ([\u2212-]?[0-9.]+)\)", terms_cell)
        ]
        assert documented, terms_cell
        assert pairs(parse_query(text)) == documented, text


def test_docs_plain_table_rows_are_single_terms():
    rows = _doc_tables("The one rule to remember: no double quote, no syntax")
    assert len(rows) >= 8
    for query_cell, _ in rows:
        for text in re.findall(r"`([^`]*)`", query_cell):
            assert pairs(parse_query(text)) == [(text, 1.0)], text


def test_docs_error_table_matches_the_messages():
    rows = _doc_tables("Errors")
    assert len(rows) >= 10
    for _, example_cell, message_cell in rows:
        if not example_cell.startswith("`"):
            continue  # "17 terms": covered by test_too_many_terms
        text = _code(example_cell).replace("\\n", "\n")
        message = raises(text)
        for fragment in message_cell.split("..."):
            fragment = fragment.strip(" ;")
            assert fragment in message, (text, fragment, message)


def test_docs_state_the_limits():
    doc = DOCS.read_text(encoding="utf-8")
    assert f"`MAX_TERMS` = {MAX_TERMS}" in doc
    assert f"`MAX_QUERY_CHARS` = {MAX_QUERY_CHARS}" in doc
    assert f"0 < W <= {MAX_WEIGHT:g}" in doc


# ---------------------------------------------------------------------------------------------
# properties

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

_QUOTE_CHARS = '"\u201c\u201d'
no_quotes = st.text(
    alphabet=st.characters(blacklist_characters=_QUOTE_CHARS, blacklist_categories=("Cs",)), min_size=1, max_size=80
).filter(has_words)


@FAST
@given(no_quotes)
def test_text_without_quotes_is_one_literal_term(text):
    q = parse_query(text)
    assert pairs(q) == [(norm(text), 1.0)]
    assert not q.truncated and q.raw == text


_WEIGHTISH = re.compile(r"[+-]*[0-9.,]*[0-9][0-9.,]*:")
plain_words = st.lists(
    st.text(
        alphabet=st.characters(blacklist_characters=_QUOTE_CHARS + "\\", blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
        min_size=1,
        max_size=8,
    ),
    min_size=1,
    max_size=8,
).filter(
    lambda ws: all(w.strip() == w and not set(w) <= set("+-") and not _WEIGHTISH.fullmatch(w) for w in ws) and has_words(" ".join(ws))
    and not _WEIGHTISH.match(ws[0])
)  # words of only the marks BLIP-2 drops are refused (test_a_term_of_only_the_marks_the_model_drops_is_refused); a first word
# W:text is a weight missing its quotes (refused: test_errors_name_column_snippet_and_fix), so not bare text


@FAST
@given(plain_words, st.sampled_from(["+", "-"]))
def test_bare_text_beside_a_quoted_term_stays_one_term(words, op):
    """In a query with quotes, text without stand-alone operators or a leading W: is one literal term."""
    text = " ".join(words)
    words_are_one = len(text.split()) == len(words)  # some "letters" are whitespace to str.split
    q = parse_query(f'"anchor" {op} {text}')
    if words_are_one:
        assert pairs(q) == [("anchor", 1.0), (norm(text), 1.0 if op == "+" else -1.0)]


term_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20
).map(norm).filter(has_words)
weights = st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.5, 100.0])
terms = st.lists(st.tuples(term_text, weights, st.booleans()), min_size=1, max_size=MAX_TERMS).filter(
    lambda ts: any(not negative for _, _, negative in ts)
)


def render(parts: list[tuple[str, float, bool]]) -> str:
    """A canonical query for (text, weight, negative) parts: every term quoted, quotes escaped."""
    out = []
    for i, (text, weight, negative) in enumerate(parts):
        escaped = re.sub(r'(["\u201c\u201d])', r"\\\1", text)
        if escaped.endswith("\\"):
            escaped += " "  # a backslash before the closing quote would escape it (docs/queries.md)
        op = "- " if negative else ("+ " if i else "")
        out.append(f'{op}{weight:g}:"{escaped}"')
    return " ".join(out)


@FAST
@given(terms)
def test_rendered_terms_parse_back(parts):
    text = render(parts)
    q = parse_query(text)
    if len(text.strip()) <= MAX_QUERY_CHARS:
        assert pairs(q) == [(t, -w if neg else w) for t, w, neg in parts]


syntax_soup = st.text(
    alphabet=st.sampled_from(list('""“”\\+-:.,0123456789 \n\tab-c') + ["🐶", "é", "\u00a0"]), max_size=60
)


@FAST
@given(st.one_of(syntax_soup, st.text(max_size=60)))
def test_arbitrary_text_parses_or_raises_invalid_input(text):
    try:
        q = parse_query(text)
    except InvalidInputError as error:
        message = str(error)
        assert message.startswith("query: ") and "\n" not in message and "column " in message and "; " in message
        return
    assert 1 <= len(q.terms) <= MAX_TERMS and q.positive
    for t in q.terms:
        assert t.text == norm(t.text) and t.text
        assert 0 < abs(t.weight) <= MAX_WEIGHT


def test_huge_input_is_fast_and_flagged():
    q = parse_query('"a" - "b" ' + "x" * 5_000_000)  # no space after the 10th character: a hard cut
    assert q.truncated and len(q.raw) == MAX_QUERY_CHARS
    assert q.terms[0] == Term("a", 1.0) and q.terms[1].weight == -1.0 and q.terms[1].text.startswith("b xxx")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('.!"()*#:;~ \t\n\u200b\u00a0\ufeffaZ09é日-_,?')), max_size=12))
def test_has_words_is_the_normalised_text_not_being_blank(text):
    """has_words answers most texts from a letter or digit alone (fusion asks it of every caption): the same answer as
    normalising the text as BLIP-2 does and asking whether anything is left."""
    from blip2_search.models.text import pre_caption

    assert has_words(text) == (not is_blank(pre_caption(text)))
