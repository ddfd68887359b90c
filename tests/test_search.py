"""Searching a library: exact ITC ranking, composite terms, filters inside the search, rerank = HF."""

from __future__ import annotations

import json
import os
import re
import reprlib
import shutil
import subprocess
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from blip2_search.cli import main
from blip2_search.errors import InvalidInputError, LibraryError, worded
from blip2_search.images import open_image
from blip2_search.library import Library
from blip2_search.search.results import Hit

TEXTS = ["a red circle on the left", "blue square", "a photo of a dog on the beach"]


def _photo(path: Path, seed: int, date: str | None = None):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    exif = Image.Exif()
    if date:
        exif[0x0132] = date  # DateTime
    img.save(path, quality=95, exif=exif)


@pytest.fixture(scope="module")
def lib_dir(tiny_itm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    photos = root / "photos"
    for i in range(24):
        year = 2020 + i % 4
        _photo(photos / str(year) / f"img{i:02d}.jpg", i, f"{year}:0{1 + i % 9}:1{i % 10} 12:00:00")
    shutil.copy(photos / "2020" / "img00.jpg", photos / "copy.jpg")  # an exact duplicate: a tie
    _photo(photos / "undated.jpg", 500)
    with Library.open(root / "lib", model=str(tiny_itm_dir), captioner=False, create=True, batch_size=8) as lib:
        r = lib.index([photos])
        assert (r.indexed, r.reused) == (25, 1)  # the copy reuses img00's vectors
    return root / "lib"


@pytest.fixture(scope="module")
def lib(lib_dir):
    with Library.open(lib_dir) as lib:
        yield lib


def _brute_itc(lib, texts):
    """ITC of every indexed image with each text through HF's own forward: {path: [len(texts)]}."""
    from transformers import Blip2ForImageTextRetrieval

    recs = [r for r in lib.metadata.get_records(k.id for k in lib.metadata.known_files().values()) if r.status == "indexed"]
    enc = lib.encoder
    hf = Blip2ForImageTextRetrieval.from_pretrained(enc.source.path).eval()
    px = enc.preprocess([open_image(r.path) for r in recs])
    # indexing used the fast decode path; compare on the same pixels
    from blip2_search.images import decode_for_model

    px = enc.pixels_from_uint8(np.stack([decode_for_model(r.path, enc.image_size).pixels for r in recs]))
    tok = enc.tokenize(texts)
    with torch.no_grad():
        itc = hf(pixel_values=px, **tok, use_image_text_matching_head=False).logits_per_image.numpy()
    return recs, itc


def _ranking(recs, scores):
    order = sorted(range(len(recs)), key=lambda i: (-scores[i], recs[i].id))
    return [recs[i].id for i in order], [float(scores[i]) for i in order]


def test_text_ranking_equals_brute_force_for_every_k(lib):
    recs, itc = _brute_itc(lib, TEXTS)
    for t, text in enumerate(TEXTS):
        want_ids, want_scores = _ranking(recs, itc[:, t])
        for k in (1, 5, 26, 100):
            res = lib.search(text, k, rerank=False, fusion=False)
            got = [h.id for h in res.hits]
            assert len(got) == min(k, 26)
            np.testing.assert_allclose([h.itc for h in res.hits], want_scores[: len(got)], atol=1e-5)
            # equal up to ties, which are broken by id
            assert got == want_ids[: len(got)] or np.allclose(sorted(want_scores[: len(got)]), sorted(h.itc for h in res.hits), atol=1e-6)


def test_exact_duplicate_ties_are_broken_by_id(lib):
    res = lib.search(TEXTS[0], 26, rerank=False, fusion=False)
    by_path = {Path(h.path).name: h for h in res.hits}
    a, b = by_path["img00.jpg"], by_path["copy.jpg"]
    assert a.itc == b.itc
    ids = [h.id for h in res.hits]
    assert ids.index(min(a.id, b.id)) == ids.index(max(a.id, b.id)) - 1


def test_negative_terms_demote_and_equal_weighted_brute_force(lib):
    recs, itc = _brute_itc(lib, ["a red circle", "blue square"])
    res = lib.search('2:"a red circle" - "blue square"', 26, rerank=False, fusion=False)
    want_ids, want_scores = _ranking(recs, 2 * itc[:, 0] - itc[:, 1])
    np.testing.assert_allclose([h.score for h in res.hits], want_scores, atol=1e-5)
    worst_b = max(range(len(recs)), key=lambda i: itc[i, 1])
    plain = [h.id for h in lib.search('"a red circle"', 26, rerank=False, fusion=False).hits]
    neg = [h.id for h in res.hits]
    assert neg.index(recs[worst_b].id) >= plain.index(recs[worst_b].id)  # the most "blue square" image moved down


def test_filters_apply_inside_the_search(lib):
    recs, itc = _brute_itc(lib, TEXTS[:1])
    in_2021 = [i for i, r in enumerate(recs) if "/2021/" in r.path]
    want_ids, _ = _ranking([recs[i] for i in in_2021], itc[in_2021, 0])
    res = lib.search(TEXTS[0], 3, rerank=False, fusion=False, path="*/2021/*")
    assert [h.id for h in res.hits] == want_ids[:3]  # 3 results although the unfiltered top 3 may hold none
    dated = lib.search(TEXTS[0], 100, rerank=False, fusion=False, after=datetime(2022, 1, 1), before=datetime(2022, 12, 31, 23, 59))
    assert dated.hits and all(h.taken_at and h.taken_at.year == 2022 for h in dated.hits)
    assert len(dated.hits) == sum(1 for r in recs if r.taken_at and r.taken_at.year == 2022)
    undated = [r for r in recs if r.taken_at is None]  # left out silently before: the note says why they are missing
    assert undated and any(n.startswith(f"{len(undated)} photo") and "without a capture date" in n for n in dated.notes), dated.notes
    in_2021_undated = sum(1 for r in undated if "/2021/" in r.path)
    only_2021 = lib.search(TEXTS[0], 3, rerank=False, fusion=False, path="*/2021/*", after=datetime(2000, 1, 1)).notes
    assert any(f"{in_2021_undated} photo" in n for n in only_2021) if in_2021_undated else not any("capture date" in n for n in only_2021)
    assert not any("capture date" in n for n in res.notes)  # no date filter: no note
    ordered = sorted(itc[:, 0])
    cut = float(ordered[len(recs) // 2] + ordered[len(recs) // 2 + 1]) / 2  # between two scores: no rounding ties
    above = lib.search(TEXTS[0], 100, rerank=False, fusion=False, min_score=cut)
    assert all(h.itc >= cut for h in above.hits) and len(above.hits) == int((itc[:, 0] >= cut).sum())
    by_date = lib.search(TEXTS[0], 10, rerank=False, fusion=False, sort="date")
    dates = [h.taken_at for h in by_date.hits if h.taken_at]
    assert dates == sorted(dates)


def test_python_date_filters_take_dates_text_and_datetimes_alike(lib):
    from datetime import date

    def ids(**kw):
        return [h.id for h in lib.search(TEXTS[0], 100, rerank=False, fusion=False, **kw).hits]

    some = next(h for h in lib.search(TEXTS[0], 100, rerank=False, fusion=False).hits if h.taken_at)
    day = some.taken_at.date()  # taken at 12:00 that day
    whole_day = ids(after=datetime.combine(day, datetime.min.time()), before=datetime.combine(day, datetime.max.time()))
    assert some.id in whole_day
    assert ids(after=day.isoformat(), before=day.isoformat()) == whole_day == ids(after=day, before=day)
    basic = day.strftime("%Y%m%d")  # ISO's basic form: Python 3.11's datetime.fromisoformat read it as midnight, a moment
    assert ids(after=basic, before=basic) == whole_day
    assert some.id not in ids(before=datetime.combine(day, datetime.min.time()))  # a datetime is a moment
    for kw, fix in (({"after": "2023-13-01"}, "YYYY-MM-DD"), ({"after": "yesterday"}, "YYYY-MM-DD"),
                    ({"after": "2023-01-01T00:00:00+02:00"}, "time zone"), ({"after": 5}, "not a date"),
                    ({"after": "2023-05-01", "before": "2023-01-01"}, "swap"), ({"after": date(2023, 5, 1), "before": datetime(2023, 1, 1)}, "swap"),
                    ({"min_score": "0.5"}, "not a number"), ({"min_score": float("nan")}, "finite"), ({"path": 5}, "not a glob")):
        with pytest.raises(InvalidInputError, match=fix):
            lib.search(TEXTS[0], 3, rerank=False, **kw)
    note = lib.search(TEXTS[0], 3, rerank=False, path="2021/*")
    assert not note.hits and "absolute" in note.notes[-1]


def test_an_iso_week_date_bounds_the_whole_week():
    """`--before 2023-W28` read as that week's Monday (date.fromisoformat), leaving out the rest of the week."""
    from blip2_search.search.results import parse_date

    for week in ("2023-W28", "2023W28"):
        assert parse_date(week, name="after", end_of_day=False) == datetime(2023, 7, 10)
        assert parse_date(week, name="before", end_of_day=True) == datetime(2023, 7, 16, 23, 59, 59, 999999)
    assert parse_date("2023-W28-3", name="before", end_of_day=True) == datetime(2023, 7, 12, 23, 59, 59, 999999)  # one day


def test_iso_basic_and_week_dates_read_alike_on_python_3_10(monkeypatch):
    """pyproject allows Python 3.10, whose date.fromisoformat reads YYYY-MM-DD only: 20230715 and 2023-W28 (read by
    3.11's) were refused there. Here `date` is given 3.10's reading, and the forms the docs promise still parse."""
    import datetime as dt
    import re

    import blip2_search.search.results as results

    class Date310(dt.date):
        @classmethod
        def fromisoformat(cls, text):
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
                raise ValueError(f"Invalid isoformat string: {text!r}")
            return super().fromisoformat(text)

    monkeypatch.setattr(results, "date", Date310)
    assert results.parse_date("20230715", name="before", end_of_day=True) == datetime(2023, 7, 15, 23, 59, 59, 999999)
    assert results.parse_date("2023-W28", name="before", end_of_day=True) == datetime(2023, 7, 16, 23, 59, 59, 999999)
    assert results.parse_date("2023W283", name="after", end_of_day=False) == datetime(2023, 7, 12)


def test_rerank_of_given_hits_scores_like_the_search_rerank(lib):
    query = f'"{TEXTS[0]}" - "{TEXTS[1]}"'
    searched = lib.search(query, 4, rerank_k=4, fusion=False).hits
    again = lib.rerank(query, [Hit(h.id, h.path, 0.0, 0.0, None, h.caption, h.taken_at) for h in searched])
    assert [h.id for h in again.hits] == [h.id for h in searched] and again.notes == ()
    np.testing.assert_allclose([h.score for h in again.hits], [h.score for h in searched], atol=1e-5)
    moved = [Path(h.path) for h in searched[::2]]
    for p in moved:
        p.rename(p.with_name(p.name + ".away"))
    try:
        partly = lib.rerank(query, searched)  # two of the four photos cannot be read now
    finally:
        for p in moved:
            p.with_name(p.name + ".away").rename(p)
    assert [h.id for h in partly.hits[:2]] == [h.id for h in again.hits if h.id in {searched[1].id, searched[3].id}]
    assert [h.itm_logit for h in partly.hits[2:]] == [None, None]
    assert [h.itc for h in partly.hits[2:]] == sorted((h.itc for h in partly.hits[2:]), reverse=True)  # the unread by ITC
    assert partly.notes == ("2 candidates could not be reranked (file missing, unreadable or changed since it was indexed; index its folder again to refresh it, or "
                           "forget photos whose files are gone for good with `Library.prune(missing=True)`)",)
    by_id = lib.rerank(query, [h.id for h in searched[:2]] + [searched[2], searched[0].id])  # image ids or hits; a repeat counts once
    assert [h.id for h in by_id.hits] == [h.id for h in again.hits if h.id in {h.id for h in searched[:3]}]
    np.testing.assert_allclose([h.score for h in by_id.hits], [h.score for h in again.hits if h.id in {h.id for h in by_id.hits}], atol=1e-5)
    other = replace(searched[0], path=searched[1].path)  # e.g. a hit of another library's search: refused, not mixed
    with pytest.raises(InvalidInputError, match=rf"hit {other.id} \({re.escape(other.path)}\) is not image {other.id} of library .*, which is "
                       rf"{re.escape(searched[0].path)}; rerank hits of this library's own search results, or pass image ids"):
        lib.rerank(query, [searched[1], other])
    with pytest.raises(InvalidInputError, match="rerank source 'bogus'"):
        lib.rerank(query, [], rerank_source="bogus")
    link = Path(searched[0].path).parent / ".link-to-first.jpg"  # the same photo by another name (the server passes real paths)
    link.symlink_to(searched[0].path)
    try:
        assert [h.id for h in lib.rerank(query, [replace(searched[0], path=str(link))]).hits] == [searched[0].id]
    finally:
        link.unlink()
    with pytest.raises(InvalidInputError, match="quote"):
        lib.rerank('"unclosed', searched)
    with pytest.raises(InvalidInputError):
        lib.rerank("  ", [])


def test_reranking_no_hits_loads_no_model(tiny_itm_dir, tmp_path):
    Library.open(tmp_path / "lib", model=str(tiny_itm_dir), create=True, captioner=False).close()  # nothing indexed or recorded yet
    with Library.open(tmp_path / "lib") as lib:  # the default model (not on this machine) until an index run records one
        assert lib.rerank("a red circle", []).hits == () and lib._encoder is None


def _read_only_copy(lib_dir, tmp_path, monkeypatch):
    """A copy of the library that opens as if on read-only media (a DVD, a read-only share or snapshot)."""
    import blip2_search.store.metadata as metadata_module

    copy = tmp_path / "ro-lib"
    shutil.copytree(lib_dir, copy)
    real_access = os.access
    monkeypatch.setattr(metadata_module, "on_read_only_media", lambda folder: Path(folder) == copy)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == copy and mode == os.W_OK else real_access(p, mode, **kw))
    return copy


def test_a_library_on_read_only_media_is_searched_without_writing(lib, lib_dir, tmp_path, monkeypatch):
    copy = _read_only_copy(lib_dir, tmp_path, monkeypatch)
    want = lib.search(TEXTS[0], 5, rerank_k=4)
    with Library.open(copy) as ro:
        got = ro.search(TEXTS[0], 5, rerank_k=4)
        assert [(h.id, round(h.score, 5)) for h in got.hits] == [(h.id, round(h.score, 5)) for h in want.hits] and got.notes == want.notes
        assert ro.status().indexed == 26 and [h.id for h in ro.similar(want.hits[0].path, 2).hits][0] == want.hits[0].id
        with pytest.raises(LibraryError, match="read-only"):  # opened read-only: SQLite refuses any write
            ro.metadata.mark_deleted([want.hits[0].id])
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in lib_dir.iterdir())  # no journal, no file made


def test_a_library_of_the_previous_schema_on_read_only_media_is_still_searched(lib, lib_dir, tmp_path, monkeypatch):
    """Schema v3 adds only the change journal, which readers do without: a v2 library on read-only media (made by the
    previous version) is searched as it is, not refused until opened where writable; its index file behind the
    database is rebuilt in memory (there is no journal to bring it up to date)."""
    import sqlite3

    import blip2_search.store.metadata as metadata_module

    copy = tmp_path / "v2-lib"
    shutil.copytree(lib_dir, copy)
    gone = lib.search(TEXTS[0], 1, rerank=False).hits[0].id
    with Library.open(copy) as writable:  # the index file is left behind the database
        writable.metadata.mark_deleted([gone])
    with sqlite3.connect(copy / "metadata.sqlite") as raw:  # as the previous version left it
        raw.execute("DROP TABLE vector_changes")
        raw.execute("DELETE FROM library_info WHERE key = 'changes_since'")
        raw.execute("UPDATE library_info SET value = '2' WHERE key = 'schema_version'")
    raw.close()
    real_access = os.access
    monkeypatch.setattr(metadata_module, "on_read_only_media", lambda folder: Path(folder) == copy)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == copy and mode == os.W_OK else real_access(p, mode, **kw))
    database = (copy / "metadata.sqlite").read_bytes()
    with Library.open(copy) as ro:
        assert ro.metadata.info().schema_version == 2
        hits = ro.search(TEXTS[0], 5, rerank=False).hits
        assert len(hits) == 5 and gone not in {h.id for h in hits}
    assert (copy / "metadata.sqlite").read_bytes() == database and not (copy / "metadata.sqlite-wal").exists()  # not migrated


def test_a_read_only_library_with_an_unfinished_journal_says_how_to_fold_it_in(lib_dir, tmp_path, monkeypatch):
    copy = _read_only_copy(lib_dir, tmp_path, monkeypatch)
    (copy / "metadata.sqlite-wal").write_bytes(b"\0" * 4096)  # copied while a process had it open
    with pytest.raises(LibraryError, match=r"is on read-only media with an unfinished write-ahead log \(metadata.sqlite-wal\), which a read-only "
                       r"opening cannot fold in; open the library once where it is writable"):
        Library.open(copy)


def test_a_read_only_bind_mount_is_searched(lib, lib_dir, tmp_path):
    """The same on a real read-only mount, where this machine lets the tests make one."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    made = subprocess.run(["mount", "--bind", str(lib_dir.parent), str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({made.stderr.decode().strip()}); the simulated test covers the logic")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here; the simulated test covers the logic")
        with Library.open(mount / lib_dir.name) as ro:
            assert [h.id for h in ro.search(TEXTS[0], 5, rerank=False).hits] == [h.id for h in lib.search(TEXTS[0], 5, rerank=False).hits]
        res = CliRunner().invoke(main, ["index", str(mount / "photos"), "--library", str(mount / lib_dir.name)])
        assert res.exit_code == 2 and "Read-only file system" in res.stderr, res.output
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # busy: detached now, gone when released


def test_a_candidate_whose_file_was_only_touched_or_copied_back_is_still_reranked(lib, tmp_path):
    """Another modification time, the same bytes (`touch`, a copy back from a backup, a sync tool): its content
    hash says it is the picture indexed, so its rerank stays (the check read size and time alone at first)."""
    hits = lib.search(TEXTS[0], 3, rerank=False, fusion=False).hits
    target = Path(hits[0].path)
    kept = tmp_path / "kept.jpg"
    shutil.copy2(target, kept)
    before = lib.rerank(TEXTS[0], [h.id for h in hits])
    try:
        shutil.copyfile(kept, target)  # the same bytes, a new modification time
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 5_000_000_000))
        again = lib.rerank(TEXTS[0], [h.id for h in hits])
    finally:
        shutil.copy2(kept, target)
    assert again.notes == () and [h.id for h in again.hits] == [h.id for h in before.hits]
    np.testing.assert_allclose([h.score for h in again.hits], [h.score for h in before.hits], atol=1e-5)


@pytest.mark.parametrize("how", ["edited", "link re-pointed"])
def test_a_candidate_whose_file_changed_since_indexing_is_not_reranked_from_the_new_picture(lib, lib_dir, tmp_path, how):
    """Rerank (by id, or search's stage) reread whatever the path held now: a photo edited since indexing, or an
    outside link pointed at another picture, was ITM-scored as that other picture beside the ITC of the one
    indexed. It is now left unread, as a file gone, until `index` refreshes it."""
    hits = lib.search(TEXTS[0], 3, rerank=False, fusion=False).hits
    target = Path(hits[0].path)
    kept = tmp_path / "kept.jpg"
    shutil.copy2(target, kept)
    try:
        if how == "edited":
            _photo(target, 9001)  # another picture at the same path
        else:
            _photo(tmp_path / "other.jpg", 9001)
            target.unlink()
            target.symlink_to(tmp_path / "other.jpg")
        again = lib.rerank(TEXTS[0], [h.id for h in hits])
        searched = lib.search(TEXTS[0], 3, rerank_k=3, fusion=False)
    finally:
        target.unlink()
        shutil.copy2(kept, target)  # the picture indexed, with its size and time
    for result in (again, searched):
        unread = [h for h in result.hits if h.id == hits[0].id]
        assert unread and unread[0].itm_logit is None, result.hits
        assert all(h.itm_logit is not None for h in result.hits if h.id != hits[0].id)
        assert result.notes[0].startswith("1 candidate could not be reranked (file missing, unreadable or changed since it was indexed;")
    restored = lib.rerank(TEXTS[0], [hits[0].id])
    assert restored.hits[0].itm_logit is not None and restored.notes == ()


def test_a_candidate_that_cannot_be_reread_keeps_its_first_stage_place(lib, lib_dir):
    first = lib.search(TEXTS[0], 8, rerank=False, fusion=False).hits
    top = Path(first[0].path)
    top.rename(top.with_name(top.name + ".away"))
    try:
        got = lib.search(TEXTS[0], 3, rerank_k=8, fusion=False)
        cli = CliRunner().invoke(main, ["search", TEXTS[0], "-k", "3", "--rerank-k", "8", "--no-fusion", "--library", str(lib_dir)])
    finally:
        top.with_name(top.name + ".away").rename(top)
    assert got.hits[0].id == first[0].id and got.hits[0].itm_logit is None  # was appended after all 8, then cut at 3
    others = [h.id for h in lib.rerank(TEXTS[0], [h.id for h in first[1:]]).hits]
    assert [h.id for h in got.hits[1:]] == others[:2]  # the rest reranked as without it
    assert got.notes == ("1 candidate could not be reranked (file missing, unreadable or changed since it was indexed; index its folder again to refresh it, or "
                         "forget photos whose files are gone for good with `Library.prune(missing=True)`)",
                         "2 of these were reranked (those with an ITM logit; score = ITM logit + ITC); the others keep their "
                         "first-stage place and score")
    notes = [line for line in cli.stderr.splitlines() if line.startswith("note: ")]
    assert notes[0].endswith("gone for good with `prune --missing`)"), cli.output  # the CLI's own command
    assert cli.exit_code == 0 and cli.stderr.splitlines()[-1] == (
        "note: 2 of these were reranked (those with an ITM logit; score = ITM logit + ITC); the others keep their first-stage place and score"), cli.output


def test_a_query_longer_than_blip2_reads_says_where_it_was_cut(lib):
    words = (TEXTS[2] + " ") * 6  # 48 words, one token each in the test vocabulary; BLIP-2 reads [CLS] + 33 + [SEP]
    ws = words.split()
    cut = lib.search(words, 3, rerank=False, fusion=False)
    assert cut.notes == (f"the query is longer than the 35 tokens BLIP-2 reads: only the words up to {' '.join(ws[29:33])!r} were "
                         "searched; shorten it, or split it into terms (docs/queries.md)",)
    read = lib.search(" ".join(ws[:33]), 3, rerank=False, fusion=False)  # what was read: the same scores, nothing cut
    assert read.notes == () and [(h.id, h.score) for h in read.hits] == [(h.id, h.score) for h in cut.hits]
    assert len(lib.search(" ".join(ws[:34]), 3, rerank=False, fusion=False).notes) == 1
    term = lib.search(f'"{words}" - "{TEXTS[1]}"', 3, rerank=False, fusion=False)
    assert term.notes == (f"the term {reprlib.repr(words.strip())} is longer than the 35 tokens BLIP-2 reads: only the words up to "
                          f"{' '.join(ws[29:33])!r} were searched; shorten it, or split it into terms (docs/queries.md)",)
    assert lib.rerank(words, cut.hits).notes == cut.notes
    half = " ".join(ws[:24])  # two terms that each fit; joined for the reranker, 48 words do not
    joined = f"{half} {half}".split()
    two = f'"{half}" + "{half}"'
    assert lib.search(two, 3, rerank=False, fusion=False).notes == ()
    assert lib.search(two, 3, rerank_k=4, fusion=False).notes == lib.rerank(two, cut.hits).notes == (
        f"reranking reads the positive terms joined, and only their first 35 tokens (up to {' '.join(joined[29:33])!r}); "
        "shorten the terms to have all of them reranked",)


def test_a_long_lived_library_follows_an_index_run_of_another_process(tiny_itm_dir, tmp_path):
    """A server's Library sees photos added and deleted by an `index` run in another process once that run
    has saved its index (not mid-run)."""
    photos = tmp_path / "photos"
    for i in range(6):
        _photo(photos / f"p{i}.jpg", 100 + i)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([photos])
    server = Library.open(tmp_path / "lib")
    try:
        assert len(server.search(TEXTS[0], 50, rerank=False).hits) == 6
        (photos / "p0.jpg").unlink()
        for i in range(6, 9):
            _photo(photos / f"p{i}.jpg", 100 + i)
        res = CliRunner().invoke(main, ["index", str(photos), "--library", str(tmp_path / "lib")])
        assert res.exit_code == 0, res.output
        paths = {Path(h.path).name for h in server.search(TEXTS[0], 50, rerank=False).hits}
        assert paths == {f"p{i}.jpg" for i in range(1, 9)}
    finally:
        server.close()


def test_a_closed_library_says_so(lib_dir):
    lib = Library.open(lib_dir)
    lib.close()
    with pytest.raises(LibraryError, match="closed"):
        lib.search(TEXTS[0], 3, rerank=False)
    with pytest.raises(LibraryError, match="closed"):
        lib.status()


def test_pil_images_are_read_like_files(lib, tmp_path):
    deep = tmp_path / "deep.png"
    Image.fromarray((np.linspace(20000, 50000, 40 * 56).reshape(40, 56)).astype(np.uint16)).save(deep)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)).convert("CMYK").save(cmyk)
    for path in (deep, cmyk):
        by_path = lib.similar(path, 5)
        by_pil = lib.similar(Image.open(path), 5)
        assert [h.id for h in by_pil.hits] == [h.id for h in by_path.hits]
        np.testing.assert_allclose([h.score for h in by_pil.hits], [h.score for h in by_path.hits], atol=1e-6)


def test_rerank_equals_hf_forward(lib):
    from transformers import Blip2ForImageTextRetrieval

    res = lib.search(TEXTS[0], 6, rerank=True, rerank_k=6, fusion=False)
    enc = lib.encoder
    hf = Blip2ForImageTextRetrieval.from_pretrained(enc.source.path).eval()
    px = enc.preprocess([open_image(h.path) for h in res.hits])
    tok = enc.tokenize([TEXTS[0]] * len(res.hits))
    with torch.no_grad():
        itm = hf(pixel_values=px, **tok, use_image_text_matching_head=True).logits_per_image[:, 1].numpy()
    np.testing.assert_allclose([h.itm_logit for h in res.hits], itm, atol=1e-5)
    assert [h.score for h in res.hits] == sorted((h.score for h in res.hits), reverse=True)
    np.testing.assert_allclose([h.score for h in res.hits], [h.itm_logit + h.itc for h in res.hits], atol=1e-6)


def test_image_query_finds_itself_and_its_copy_first(lib):
    recs = lib.metadata.get_records(k.id for k in lib.metadata.known_files().values())
    target = next(r for r in recs if r.path.endswith("img00.jpg"))
    res = lib.similar(target.path, 3)
    assert {Path(h.path).name for h in res.hits[:2]} == {"img00.jpg", "copy.jpg"}
    assert res.hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_duplicates_groups_the_copy(lib, lib_dir):
    groups = lib.duplicates(0.999)
    assert [sorted(Path(r.path).name for r in g) for g in groups] == [["copy.jpg", "img00.jpg"]]
    assert [p.score for p in groups[0]] == pytest.approx([1.0, 1.0], abs=1e-4) and groups[0][0].record.path == groups[0][0].path
    res = CliRunner().invoke(main, ["duplicates", "--threshold", "0.999", "--library", str(lib_dir), "--json"])
    assert res.exit_code == 0 and [[(p["id"], p["path"], p["score"]) for p in g] for g in json.loads(res.stdout)] == [
        [(p.id, p.path, p.score) for p in groups[0]]]
    res = CliRunner().invoke(main, ["duplicates", "--threshold", "0.999", "--library", str(lib_dir)])
    assert res.stdout == "".join(f"{p.score:.4f}  {p.path}\n" for p in groups[0]) + "\n", res.output


def test_outcome_notes_say_which_hits_were_reranked_in_every_order():
    """Pure decision: reranked hits first (by score), spread out (sort=date), or one unread in its place."""
    from blip2_search.search.results import Hit, outcome_notes

    def hits(*reranked):
        return [Hit(i, f"/p/{i}.jpg", 1.0, 0.5, 2.0 if r else None, None, None) for i, r in enumerate(reranked)]

    assert outcome_notes(hits(1, 1, 0), glob=None, filtered=False, sort="score") == (
        "the first 2 were reranked (score = ITM logit + ITC); the rest keep the first stage's order and score",)
    assert outcome_notes(hits(1, 0, 1), glob=None, filtered=False, sort="score")[0].endswith("the others keep their first-stage place and score")
    for order in (hits(1, 0, 1), hits(1, 1, 0)):
        assert outcome_notes(order, glob=None, filtered=False, sort="date") == (
            "2 of these were reranked (those with an ITM logit; score = ITM logit + ITC); the others have first-stage scores, "
            "on another scale; all are listed by date",)
    assert outcome_notes(hits(1, 1), glob=None, filtered=True, sort="date") == ()
    assert outcome_notes([], glob=None, filtered=True, sort="score")[0].startswith("no results: no photo passes")
    assert outcome_notes([], glob="photos/*", filtered=True, sort="score")[0].startswith("path filter 'photos/*' is relative")


def test_closest_in_group_is_each_photos_best_score_with_another_in_either_direction():
    """What `duplicates` shows for each photo, against scores computed pair by pair."""
    from blip2_search.search.duplicates import closest_in_group

    rng = np.random.default_rng(3)
    v = rng.standard_normal((4, 5, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)

    def score(i, j):  # image j's score for image i: mean over i's vectors of the best match among j's
        return np.mean([max(float(a @ b) for b in v[j]) for a in v[i]])

    expected = [max(max(score(i, j), score(j, i)) for j in range(4) if j != i) for i in range(4)]
    assert score(0, 1) != pytest.approx(score(1, 0))  # the two directions differ
    np.testing.assert_allclose(closest_in_group(v), expected, atol=1e-6)
    from blip2_search.search import duplicates

    with pytest.MonkeyPatch.context() as large:  # a large group: each image against its nearest members (here: all 3)
        large.setattr(duplicates, "CLOSEST_EXACT_MAX", 2)
        large.setattr(duplicates, "CLOSEST_CANDIDATES", 3)
        np.testing.assert_allclose(closest_in_group(v), expected, atol=1e-6)
        large.setattr(duplicates, "CLOSEST_CANDIDATES", 1)  # fewer: never above the best
        assert (closest_in_group(v) <= np.array(expected) + 1e-6).all()


@pytest.mark.parametrize("args,fix", [
    (["", "--no-rerank"], "empty"), (["red", "-k", "0"], "-k"), (["red", "-k", "1000000"], "-k"),
    (["red", "--after", "2021-13-01"], "YYYY-MM-DD"), (["red", "--after", "yesterday"], "--after 'yesterday' is not a date"),
    (["red", "--after", "yesterday"], "e.g. --after 2023-06-01"), (["red", "--before", "2023-01-01T00:00+02:00"], "e.g. --before 2023-01-01T00:00"),
    (["red", "--after", "2022-01-01", "--before", "2021-01-01"], "swap"), (['red "unclosed'], "quote"),
    (["red", "--min-score", "nan"], "finite"), (["-cat"], "after '--'"), (["red", "--sort", "size"], "--help"),
    (["red", "--queries", "no such file.txt"], "--help"),
])
def test_bad_search_input_exits_2_with_the_fix(lib_dir, args, fix):
    before = (lib_dir / "metadata.sqlite").stat().st_mtime_ns
    res = CliRunner().invoke(main, ["search", *args, "--library", str(lib_dir)])
    assert res.exit_code == 2, res.output
    assert fix.lower() in res.output.lower() and "Traceback" not in res.output
    assert (lib_dir / "metadata.sqlite").stat().st_mtime_ns == before


def test_table_output_keeps_one_line_per_result(tiny_itm_dir, tmp_path):
    photos = tmp_path / "photos"
    _photo(photos / "two\nlines.jpg", 1)
    _photo(photos / "plain.jpg", 2)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([photos])
    res = CliRunner().invoke(main, ["search", "red", "--library", str(tmp_path / "lib"), "--no-rerank"])
    assert res.exit_code == 0 and len(res.stdout.strip().splitlines()) == 2 and "two\\nlines.jpg" in res.stdout


def test_bad_search_input_is_one_line(lib_dir):
    for args in (["red", "--sort", "size"], ["red", "--no-such-option"], ["-cat"], ["red", "-k", "ten"]):
        res = CliRunner().invoke(main, ["search", *args, "--library", str(lib_dir)])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def test_queries_that_start_with_a_minus_sign(lib_dir):
    def run(*args):
        res = CliRunner().invoke(main, ["search", "--library", str(lib_dir), "--no-rerank", "-k", "3", "--json", *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    negative = f'-"{TEXTS[1]}" + "{TEXTS[0]}"'
    assert run(negative) == run("--", negative)  # no '--' needed when it cannot be an option
    assert run("-5 degrees, " + TEXTS[0])["query"] == "-5 degrees, " + TEXTS[0]
    assert run("--path", "*", negative)["results"] == run(negative)["results"]
    res = CliRunner().invoke(main, ["search", "--library", str(lib_dir), "--afetr", "2023-01-01", "cat"])
    assert res.exit_code == 2 and "--afetr" in res.output and "'--'" not in res.output
    res = CliRunner().invoke(main, ["search", "--library", str(lib_dir), "-car"])
    assert res.exit_code == 2 and "search [OPTIONS] -- '-car'" in res.output


def test_relative_path_glob_is_taken_from_the_current_folder(lib_dir, lib, monkeypatch):
    folder = Path(lib.search(TEXTS[0], 1, rerank=False).hits[0].path).parent
    monkeypatch.chdir(folder.parent)
    res = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(lib_dir), "--no-rerank", "--path", f"{folder.name}/*", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["results"], res.output
    res = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(lib_dir), "--no-rerank", "--path", "elsewhere/*"])
    assert res.exit_code == 0 and "no results: no photo passes the path, after, before or min-score filters" in res.stderr
    unfiltered = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(lib_dir), "--no-rerank", "--json"])
    for empty in ("", "  "):  # no filter, as an empty `path` in the HTTP API
        res = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(lib_dir), "--no-rerank", "--path", empty, "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout) == json.loads(unfiltered.stdout), res.output
    res = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(lib_dir), "--no-rerank", "--path", f"./{folder.name}/../{folder.name}/*", "--json"])
    assert json.loads(res.stdout)["results"], res.output


def test_json_answers_say_which_hits_were_reranked_and_why_there_are_none(lib_dir, lib):
    """Scores of reranked hits (ITM logit + ITC) and of the rest (first stage) are on different scales, and an
    empty answer has a reason: JSON (and HTTP) readers get the notes the text output prints."""
    got = lib.search(TEXTS[0], 5, rerank_k=2)
    assert [h.itm_logit is not None for h in got.hits] == [True, True, False, False, False]
    assert "the first 2 were reranked (score = ITM logit + ITC); the rest keep the first stage's order and score" in got.notes
    assert not any("reranked" in n for n in lib.search(TEXTS[0], 2, rerank_k=2).notes + lib.search(TEXTS[0], 5, rerank=False).notes)
    res = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(lib_dir), "--no-rerank", "--path", "*/nowhere/*", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == {
        "query": TEXTS[0], "results": [], "notes": ["no results: no photo passes the path, after, before or min-score filters; loosen them"]}
    image = lib.search(TEXTS[0], 1, rerank=False).hits[0].path
    assert lib.similar(image, 3, min_score=1.5).notes == ("no results: no photo passes the path, after, before or min-score filters; loosen them",)


def test_no_results_without_filters_says_the_library_has_nothing_searchable(tiny_itm_dir, tmp_path):
    photos = tmp_path / "photos"
    _photo(photos / "only.jpg", 3)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([photos])
    res = CliRunner().invoke(main, ["duplicates", "--library", str(tmp_path / "lib")])
    assert res.exit_code == 0 and res.stdout == "" and "no near-duplicates at --threshold 0.95" in res.stderr, res.output
    (photos / "only.jpg").unlink()
    with Library.open(tmp_path / "lib") as lib:
        lib.index([photos])
    res = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(tmp_path / "lib"), "--no-rerank"])
    assert res.exit_code == 0 and res.stdout == "" and "filters" not in res.stderr and "--path" not in res.stderr
    assert "no results: the library has no searchable photos; run `blip2-search index PHOTO_DIR` first" in res.stderr
    with Library.open(tmp_path / "lib") as lib:  # a Python caller is named the call, not a command it did not run
        assert lib.search(TEXTS[0], 3, rerank=False).notes == (
            "no results: the library has no searchable photos; run `Library.index(PHOTO_DIRS)` first",)


def test_status_says_none_for_a_library_without_a_captioner(lib_dir):
    res = CliRunner().invoke(main, ["status", "--library", str(lib_dir)])
    assert res.exit_code == 0 and re.search(r"^captioner +none$", res.stdout, re.M) and "None" not in res.stdout, res.output
    res = CliRunner().invoke(main, ["status", "--library", str(lib_dir), "--json"])
    assert json.loads(res.stdout)["captioner"] is None
    assert json.loads(res.stdout)["vector_index"] == "auto"  # the kind the library asked for (the default)


def test_missing_library_exits_2(tmp_path):
    res = CliRunner().invoke(main, ["search", "red", "--library", str(tmp_path / "none")])
    assert res.exit_code == 2 and "--library" in res.output
    assert not (tmp_path / "none").exists()


def test_missing_default_library_says_it_is_under_the_current_folder(tmp_path, monkeypatch):
    """Indexing in ~ and searching elsewhere finds no library: the message says where the default one is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BLIP2_SEARCH_LIBRARY", raising=False)
    res = CliRunner().invoke(main, ["status"])
    assert res.exit_code == 2 and ("indexes/default under the current folder); work from the folder you indexed from, name the "
                                   "library's folder (--library FOLDER, or set BLIP2_SEARCH_LIBRARY)") in res.output
    monkeypatch.setenv("BLIP2_SEARCH_LIBRARY", str(tmp_path / "gone"))
    res = CliRunner().invoke(main, ["status"])
    assert res.exit_code == 2 and "(named by $BLIP2_SEARCH_LIBRARY); check that variable" in res.output
    assert not (tmp_path / "indexes").exists() and not (tmp_path / "gone").exists()


def test_cli_search_json_and_queries_file(lib_dir, tmp_path):
    res = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(lib_dir), "-k", "3", "--rerank-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["query"] == TEXTS[0] and len(out["results"]) == 3
    assert set(out["results"][0]) == {"id", "path", "score", "itc", "itm_logit", "caption", "taken_at"}
    assert all(r["itm_logit"] is not None for r in out["results"])
    res = CliRunner().invoke(main, ["search", TEXTS[0], "--library", str(lib_dir), "--no-rerank", "--json"])
    assert all(r["itm_logit"] is None for r in json.loads(res.stdout)["results"])
    qf = tmp_path / "q.txt"
    qf.write_text(f"{TEXTS[0]}\n\u200b\n{TEXTS[1]}\n{TEXTS[2]}\n\n")  # a zero-width space: blank to the eye
    res = CliRunner().invoke(main, ["search", "--queries", str(qf), "--library", str(lib_dir), "--no-rerank", "-k", "2"])
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [x["query"] for x in lines] == TEXTS and all(len(x["results"]) == 2 for x in lines)
    assert [list(x)[:2] for x in lines] == [["query", "line"]] * 3 and [x["line"] for x in lines] == [1, 3, 4]  # blank lines skipped
    assert res.exit_code == 0, res.output
    # a bad line is reported in place (with its line number) and the others still run; exit 2 at the end
    qf.write_text(f'{TEXTS[0]}\n"unclosed\n{TEXTS[1]}\n')
    res = CliRunner().invoke(main, ["search", "--queries", str(qf), "--library", str(lib_dir), "--no-rerank", "-k", "2"])
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.exit_code == 2 and "1 query of" in res.stderr
    assert [x["line"] for x in lines] == [1, 2, 3] and "quote" in lines[1]["error"]
    assert [x["query"] for x in lines] == [TEXTS[0], '"unclosed', TEXTS[1]] and len(lines[2]["results"]) == 2
    # a line that is not UTF-8 is a bad line like any other; a lone CR ends a line too (old Mac files)
    qf.write_bytes(f"{TEXTS[0]}\ncaf\xe9 red\r{TEXTS[1]}\r\n".encode("latin-1"))
    res = CliRunner().invoke(main, ["search", "--queries", str(qf), "--library", str(lib_dir), "--no-rerank", "-k", "2"])
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.exit_code == 2 and "Traceback" not in res.output and "1 query of" in res.stderr
    assert [x["query"] for x in lines] == [TEXTS[0], "caf\ufffd red", TEXTS[1]] and len(lines[2]["results"]) == 2
    assert lines[1]["error"] == f"line 2 of {qf} is not UTF-8 text (byte 0xe9); save the file as UTF-8"
    # UTF-16 (PowerShell's >) is refused whole: read as UTF-8 its lines would search NUL-laced garbage
    qf.write_bytes(f"{TEXTS[0]}\n{TEXTS[1]}\n".encode("utf-16"))
    res = CliRunner().invoke(main, ["search", "--queries", str(qf), "--library", str(lib_dir), "--no-rerank", "-k", "2"])
    assert res.exit_code == 2 and res.stdout == "" and "UTF-16 or UTF-32" in res.output and "Traceback" not in res.output
    qf.write_bytes(f"{TEXTS[0]}\n".encode("utf-16-le"))  # without a BOM
    res = CliRunner().invoke(main, ["search", "--queries", str(qf), "--library", str(lib_dir), "--no-rerank", "-k", "2"])
    assert res.exit_code == 2 and res.stdout == "" and "UTF-16 or UTF-32" in res.output
    # a bad option is not a bad line: one error, at once
    qf.write_text("\n".join(TEXTS) + "\n")
    res = CliRunner().invoke(main, ["search", "--queries", str(qf), "--library", str(lib_dir), "-k", "0"])
    assert res.exit_code == 2 and res.stdout == "" and "-k" in res.output and len(res.output.strip().splitlines()) == 1


def test_long_query_is_truncated_with_a_note(lib):
    res = lib.search("red " * 600, 2, rerank=False, fusion=False)
    assert res.notes and "truncated" in res.notes[0]


def test_text_search_loads_no_vit(lib_dir):
    with Library.open(lib_dir) as lib:
        lib.search(TEXTS[1], 3, rerank=False)
        assert lib.encoder.loaded_parts == ("text",)


def test_search_of_an_empty_library_is_a_clear_error(tmp_path):
    from blip2_search.store import open_metadata

    open_metadata(tmp_path / "empty", create=True).close()
    with Library.open(tmp_path / "empty") as lib, pytest.raises(LibraryError, match="index"):
        lib.search("red")


def test_k_validation_in_python(lib):
    with pytest.raises(InvalidInputError):
        lib.search("red", 0)


def test_stored_vit_tokens_rerank_like_recomputing(tiny_itm_dir, tmp_path):
    photos = tmp_path / "photos"
    for i in range(8):
        _photo(photos / f"v{i}.jpg", 40 + i)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([photos], store_vit=True)
        assert lib.status().vit_tokens_bytes > 0
        stored = lib.search(TEXTS[0], 5, rerank_k=5, fusion=False, rerank_source="stored")
        fresh = lib.search(TEXTS[0], 5, rerank_k=5, fusion=False, rerank_source="recompute")
        # a photo moved out and back in another run keeps its tokens, as it keeps its vectors
        tokens = lib.status().vit_tokens_bytes
        shutil.move(photos / "v0.jpg", tmp_path / "v0.jpg")
        assert lib.index([photos]).deleted == 1 and lib.status().vit_tokens_bytes == tokens
        shutil.move(tmp_path / "v0.jpg", photos / "v0.jpg")
        assert lib.index([photos]).reused == 1
        assert lib.search(TEXTS[0], 8, rerank_k=8, fusion=False, rerank_source="stored").notes == ()
        shutil.move(photos / "v0.jpg", tmp_path / "v0.jpg")  # gone for good: prune forgets its tokens with it
        assert lib.index([photos]).deleted == 1 and lib.prune().vit_files == 1
        assert lib.status().vit_tokens_bytes < tokens
    # stored tokens are fp16 and come from the fast decode path: close to, not equal to, recomputing
    a = {h.id: h.itm_logit for h in stored.hits}
    b = {h.id: h.itm_logit for h in fresh.hits}
    assert set(a) == set(b)
    np.testing.assert_allclose([a[i] for i in a], [b[i] for i in a], atol=0.05)


def test_store_vit_on_a_library_indexed_without_it_fills_the_tokens_in(tiny_itm_dir, tmp_path):
    photos = tmp_path / "photos"
    for i in range(5):
        _photo(photos / f"v{i}.jpg", 60 + i)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True, batch_size=2) as lib:
        lib.index([photos])
        vectors = lib.metadata.vectors_for(range(1, 6))
        lib.vit_store.enable()  # as if --store-vit had been passed once, then interrupted before any run stored a token
        missing = lib.search(TEXTS[0], 3, rerank_k=3, fusion=False, rerank_source="stored")
        assert all(h.itm_logit is None for h in missing.hits)
        assert missing.notes == ("3 candidates could not be reranked (no ViT tokens stored for them; run Library.index(PHOTO_DIRS, "
                                 "store_vit=True) to store the missing ones, or pass rerank_source='auto')",)
        assert lib.index([photos]).notes == ("5 photos of the library have no stored ViT tokens (a run storing them that was stopped?), "
                                             "so reranking reruns the ViT for them; run Library.index(PHOTO_DIRS, store_vit=True) to store them",)
        assert lib.status().vit_tokens_bytes == 0  # only --store-vit fills them in
        # v4 changes in place with its size and mtime kept: the run sees it unchanged, the backfill reads other bytes
        v4 = photos / "v4.jpg"
        st = v4.stat()
        other = tmp_path / "other.jpg"
        _photo(other, 99)
        v4.write_bytes(other.read_bytes()[: st.st_size].ljust(st.st_size, b"\0"))
        os.utime(v4, ns=(st.st_atime_ns, st.st_mtime_ns))
        seen = []
        report = lib.index([photos], store_vit=True, progress=seen.append)
        assert report.notes == ("stored the ViT tokens of 4 photos indexed without them",) and report.unchanged == 5
        last = [p for p in seen if p.stage == "vit"][-1]
        assert (last.done, last.total, last.indexed, last.failed) == (5, 5, 4, 1)  # a progress line for the backfill
        hashes = {r.path: r.content_hash for r in lib.metadata.get_records(range(1, 6))}
        assert lib.vit_store.stored_hashes() == {h for p, h in hashes.items() if not p.endswith("v4.jpg")}  # not v4's
        np.testing.assert_array_equal(lib.metadata.vectors_for(range(1, 6)), vectors)  # vectors untouched
        stored = lib.search(TEXTS[0], 4, rerank_k=4, fusion=False, rerank_source="stored", path="*/v[0-3].jpg")
        fresh = lib.search(TEXTS[0], 4, rerank_k=4, fusion=False, rerank_source="recompute", path="*/v[0-3].jpg")
        assert stored.notes == () and all(h.itm_logit is not None for h in stored.hits)
        a, b = ({h.id: h.itm_logit for h in r.hits} for r in (stored, fresh))
        np.testing.assert_allclose([a[i] for i in a], [b[i] for i in a], atol=0.05)  # fp16 tokens, fast decode


@pytest.mark.parametrize("damaged", [2, 4])  # some files, or all of them alike (empty after a power loss, say)
def test_store_vit_stores_again_the_tokens_whose_file_is_damaged(tiny_itm_dir, tmp_path, damaged):
    """A token file cut short (a crash, a full disk) counted as stored: the note's fix, index --store-vit, never rewrote it."""
    photos = tmp_path / "photos"
    for i in range(4):
        _photo(photos / f"v{i}.jpg", 80 + i)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True) as lib:
        lib.index([photos], store_vit=True)
        want = lib.search(TEXTS[0], 4, rerank_k=4, fusion=False, rerank_source="stored")
        files = sorted((tmp_path / "lib" / "vit").glob("*/*.npy"))
        for f in files[:damaged]:
            f.write_bytes(f.read_bytes()[:100])
        notes = lib.search(TEXTS[0], 4, rerank_k=4, fusion=False, rerank_source="stored").notes
        assert notes[0] == (f"{damaged} candidates could not be reranked (no ViT tokens stored for them; run Library.index(PHOTO_DIRS, "
                            "store_vit=True) to store the missing ones, or pass rerank_source='auto')")
        assert lib.index([photos], store_vit=True).unchanged == 4
        again = lib.search(TEXTS[0], 4, rerank_k=4, fusion=False, rerank_source="stored")
        assert again.notes == () and [(h.id, h.itm_logit) for h in again.hits] == [(h.id, h.itm_logit) for h in want.hits]


def test_a_full_disk_while_storing_vit_tokens_is_one_line_and_keeps_what_was_committed(tiny_itm_dir, tmp_path, monkeypatch):
    """Writing a token file on a full disk was a numpy traceback ("N requested and M written", exit code 1) that left
    its temporary file behind."""
    import blip2_search.store.vit_tokens as vit_tokens

    photos = tmp_path / "photos"
    for i in range(4):
        _photo(photos / f"v{i}.jpg", 90 + i)
    lib_dir = tmp_path / "lib"
    with Library.open(lib_dir, model=str(tiny_itm_dir), captioner=False, create=True, batch_size=2) as lib:
        lib.index([photos])
    _photo(photos / "v4.jpg", 95)
    class FullDisk:  # a file whose writes fail as on a full disk, once it has been created
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(vit_tokens, "open", FullDisk, raising=False)
    res = CliRunner().invoke(main, ["index", str(photos), "--library", str(lib_dir), "--store-vit"])
    last = res.stderr.strip().splitlines()[-1]  # after the model's loading report
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.output
    assert last.startswith(f"Error: cannot store ViT tokens in {lib_dir / 'vit'} (No space left on device); free disk space"), res.stderr
    assert not [p for p in (lib_dir / "vit").rglob("*") if p.is_file()]  # no temporary file left behind
    monkeypatch.delattr(vit_tokens, "open")
    with Library.open(lib_dir) as lib:
        assert lib.status().indexed == 4  # the photo whose tokens could not be stored waits for the next run
        assert lib.index([photos], store_vit=True).indexed == 1 and len(lib.vit_store.stored_hashes()) == 5


def test_stored_source_without_store_names_the_fix(lib):
    with pytest.raises(InvalidInputError, match=r"store them first \(Library\.index\(PHOTO_DIRS, store_vit=True\)\), or pass rerank_source='recompute'"):
        lib.search(TEXTS[0], 3, rerank_source="stored")


def test_cpu_rerank_default_depends_on_the_vit_cost(lib_dir):
    with Library.open(lib_dir) as lib:
        assert lib.default_rerank_k() == 16  # the tiny test ViT is cheap to rerun
        lib.encoder.vit_params = 983_000_000  # ViT-g: ~10 s an image on 2 cores
        assert lib.default_rerank_k() == 0
        res = lib.search(TEXTS[0], 3)
        assert all(h.itm_logit is None for h in res.hits)
        note = next(n for n in res.notes if n.startswith("not reranked"))  # told as Python, and by each edge its way
        assert note.endswith("store the ViT tokens (Library.index(PHOTO_DIRS, store_vit=True)), pass rerank_k=N to force it, or use a GPU")
        assert worded(note, {"rerank_k": "--rerank-k"}.get).endswith(
            "store the ViT tokens (index PHOTO_DIR... --store-vit), pass --rerank-k N to force it, or use a GPU")
        assert lib.search(TEXTS[0], 3, rerank_k=2).hits[0].itm_logit is not None  # forcing it still works


@pytest.mark.parametrize("call, message", [
    (lambda lib: lib.rerank("red", "abc"), "must be a search result, a list of its Hits or image ids"),
    (lambda lib: lib.rerank("red", [1, "2"]), r"cannot rerank '2' \(str\)"),
    (lambda lib: lib.rerank("red", [True]), r"cannot rerank True \(bool\)"),
    (lambda lib: lib.rerank("red", [987654]), r"images \[987654\] are not indexed images"),
    (lambda lib: lib.duplicates("0.9"), "threshold '0.9' is not a number"),
    (lambda lib: lib.duplicates(1.5), "threshold 1.5 is not a number in"),
    (lambda lib: lib.index(None), "folders to index None are not paths"),
    (lambda lib: lib.index([5]), r"folders to index \[5\] are not paths"),
    (lambda lib: lib.index(""), r"photo folder '' is empty; pass a folder to index \('.' for the current one\)"),
    (lambda lib: lib.similar(np.zeros((8, 8, 3), np.uint8)), r"example image .* \(ndarray\) is not a picture; convert it with Image.fromarray"),
    (lambda lib: lib.similar(5.0), r"example image 5.0 \(float\) is not a picture; pass a path, a PIL image, an image file's bytes, or a library image's id"),
    (lambda lib: lib.prune("30"), "older_than_days '30' is not a number of days"),
    (lambda lib: lib.prune(float("nan")), "older_than_days nan is not a number of days"),
    (lambda lib: lib.prune(-1), "older_than_days -1 is negative"),
    (lambda lib: lib.search("red", rerank="no"), "rerank='no' is a str; pass True or False"),
    (lambda lib: lib.index([], store_vit="no"), "store_vit='no' is a str; pass True or False"),  # "no" read as True kept ViT tokens for good
    (lambda lib: lib.index([], rehash="false"), "rehash='false' is a str; pass True or False"),
    (lambda lib: lib.index([], fast_decode=None), "fast_decode=None is a NoneType; pass True or False"),
    (lambda lib: lib.index([], progress="yes"), "progress 'yes' is not callable; pass a function that takes a Progress, or None"),
    (lambda lib: lib.search("red", fusion=None), "fusion=None is a NoneType"),
    (lambda lib: lib.search("red", rerank=False, rerank_source="foo"), "rerank source 'foo' is not auto, stored or recompute"),
    (lambda lib: lib.search("red", k="5"), "k='5' is a str, not a whole number"),
])
def test_python_api_arguments_of_the_wrong_kind_are_one_line_errors(lib, call, message):
    with pytest.raises(InvalidInputError, match=message) as caught:
        call(lib)
    assert "\n" not in str(caught.value)


def test_threads_searching_a_new_library_at_once_share_one_model_and_index(lib_dir, monkeypatch):
    """A web backend's first requests arrive together: each thread made its own encoder (and vector index), and the
    library kept two models in memory for good, one in its engine and one for reranking."""
    import threading
    import time

    from blip2_search.models.encoder import Blip2Encoder

    made, load = [], Blip2Encoder.load.__func__

    def slow_load(cls, *args, **kwargs):  # the seconds a real checkpoint takes to resolve, so the threads meet
        made.append(1)
        time.sleep(0.3)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Blip2Encoder, "load", classmethod(slow_load))
    with Library.open(lib_dir) as lib:
        start = threading.Barrier(4)
        results, errors = [], []

        def search():
            start.wait()
            try:
                results.append([(h.id, h.score) for h in lib.search(TEXTS[0], 3)])
            except Exception as exc:  # noqa: BLE001 - the test reports whatever a thread raised
                errors.append(exc)

        threads = [threading.Thread(target=search) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(results) == 4 and all(r == results[0] for r in results)
        assert len(made) == 1
        assert lib.engine.encoder is lib.encoder and lib.engine.vectors is lib.vectors


def _indexed_a_and_b(model_dir, tmp_path, n, seed):
    """Folders `photos/a` and `photos/b` of `n` photos each, `a` indexed into `tmp_path/lib`: `photos`."""
    photos = tmp_path / "photos"
    for i in range(n):
        _photo(photos / "a" / f"a{i}.jpg", seed + i)
        _photo(photos / "b" / f"b{i}.jpg", seed + 100 + i)
    with Library.open(tmp_path / "lib", model=str(model_dir), captioner=False, create=True, batch_size=4) as lib:
        lib.index([photos / "a"])
    return photos


def test_a_refused_index_or_prune_leaves_the_running_one_alone(tiny_itm_dir, tmp_path):
    """A second index or prune of a library whose run is going on (another thread's, with the same Library) is
    refused; the refusal reset the run's state, and the run saved a vector index that looked current but lacked
    the photos it had added, for every later process."""
    photos = _indexed_a_and_b(tiny_itm_dir, tmp_path, 12, 300)
    refused = []

    def progress(p):  # runs inside the index run: as a second thread's call would, while the run holds the lock
        try:
            lib.prune()
        except LibraryError as exc:
            refused.append(str(exc))

    with Library.open(tmp_path / "lib", batch_size=4) as lib:
        assert lib.index([photos / "a", photos / "b"], progress=progress).indexed == 12
    with Library.open(tmp_path / "lib") as lib:
        saved = [(h.id, round(h.score, 5)) for h in lib.search(TEXTS[0], 24, rerank=False)]
    (tmp_path / "lib" / "vectors.faiss.json").unlink()  # rebuilt from the database
    with Library.open(tmp_path / "lib") as lib:
        assert [(h.id, round(h.score, 5)) for h in lib.search(TEXTS[0], 24, rerank=False)] == saved
    assert len(saved) == 24
    assert refused and "is being indexed or pruned by another process (or thread)" in refused[0]


def test_a_search_during_the_save_of_an_index_run_in_another_thread_keeps_the_runs_vectors(tiny_itm_dir, tmp_path, monkeypatch):
    """A thread searching while another thread's index run (same Library) saved a checkpoint took the save for another
    process's and reopened the vectors; the run went on adding to its own copy, and its last save wrote the reopened
    one at the database's generation: a file that passed as current but lacked every photo indexed after."""
    import threading

    import blip2_search.library.vector_index as library_module
    from blip2_search.indexing import pipeline

    photos = _indexed_a_and_b(tiny_itm_dir, tmp_path, 16, 500)
    monkeypatch.setattr(pipeline, "CHECKPOINT_S", 0.0)
    monkeypatch.setattr(pipeline, "CHECKPOINT_COST", 0.0)
    monkeypatch.setattr(library_module, "FOLLOW_S", 0.0)
    following, in_save, searched, errors = threading.Event(), threading.Event(), threading.Event(), []
    with Library.open(tmp_path / "lib", batch_size=4) as lib:
        lib.search(TEXTS[0], 3, rerank=False)
        save, info, checkpoint = type(lib.vectors).save, type(lib.metadata).info, Library._checkpoint_vectors

        def checkpoint_once_a_search_follows(self, store):  # the run committed a batch; a search comes meanwhile
            if not searched.is_set() and self.metadata.vectors_generation() != self._vectors_generation:
                following.wait(2)  # (a search that leaves the run's vectors alone does not wait for the save)
                checkpoint(self, store)
                searched.set()
                return
            checkpoint(self, store)

        def slow_save(store, *args, **kwargs):  # a large index: its save takes seconds
            if threading.current_thread() is threading.main_thread() and following.is_set() and not searched.is_set():
                in_save.set()
                searched.wait(10)
            return save(store, *args, **kwargs)

        def info_during_the_save(store):  # the search, behind the database, reads the library while the run saves
            if threading.current_thread() is not threading.main_thread() and not searched.is_set():
                following.set()
                in_save.wait(10)
            return info(store)

        def search():
            try:
                while not searched.is_set():
                    lib.search(TEXTS[0], 3, rerank=False)
                    if in_save.is_set():  # this search came during the save
                        searched.set()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                searched.set()

        monkeypatch.setattr(Library, "_checkpoint_vectors", checkpoint_once_a_search_follows)
        monkeypatch.setattr(type(lib.vectors), "save", slow_save)
        monkeypatch.setattr(type(lib.metadata), "info", info_during_the_save)
        searcher = threading.Thread(target=search)
        searcher.start()
        try:
            assert lib.index([photos / "a", photos / "b"]).indexed == 16
        finally:
            searched.set()
            searcher.join()
    monkeypatch.undo()
    assert errors == []
    with Library.open(tmp_path / "lib") as lib:
        assert len(lib.vectors) == 32


def test_close_lets_the_models_and_the_vectors_go(lib_dir):
    import gc
    import weakref

    lib = Library.open(lib_dir)
    lib.search(TEXTS[0], 3)
    encoder, vectors = weakref.ref(lib.encoder), weakref.ref(lib.vectors)
    lib.close()
    gc.collect()
    assert encoder() is None and vectors() is None  # the caller still holds `lib`
    with pytest.raises(LibraryError, match="was closed; open it again"):
        lib.search(TEXTS[0], 3)


def test_a_closed_library_makes_no_model_or_index_again(lib_dir, monkeypatch):
    """After close(), `lib.encoder` loaded the model again (a hub model: GBs, maybe a download) and kept it; and a
    model or vector index another thread was making when close() ran was kept once made."""
    import threading
    import time

    import blip2_search.library.vector_index as library_module
    from blip2_search.models.encoder import Blip2Encoder

    made, load = [], Blip2Encoder.load.__func__
    monkeypatch.setattr(Blip2Encoder, "load", classmethod(lambda cls, *a, **kw: made.append(1) or load(cls, *a, **kw)))
    lib = Library.open(lib_dir)
    lib.close()
    for part in ("encoder", "vectors"):
        with pytest.raises(LibraryError, match="was closed; open it again"):
            getattr(lib, part)
    assert made == []

    opening, open_vectors = threading.Event(), library_module.open_vectors

    def slow_open(*args, **kwargs):  # a large index file: seconds to read
        opened = open_vectors(*args, **kwargs)
        opening.set()
        time.sleep(0.3)
        return opened

    monkeypatch.setattr(library_module, "open_vectors", slow_open)
    lib = Library.open(lib_dir)
    reader = threading.Thread(target=lambda: lib.vectors)
    reader.start()
    opening.wait(10)
    lib.close()
    reader.join()
    assert lib._vectors is None


def test_numpy_numbers_are_numbers_and_a_result_reads_as_its_hits(lib, lib_dir):
    result = lib.search(TEXTS[0], np.int64(3), rerank=0, min_score=np.float32(-1.0))
    assert len(result) == 3 and list(result) == list(result.hits) and result[0] == result.hits[0]
    assert [h.id for h in lib.rerank(TEXTS[0], result)] == [h.id for h in lib.rerank(TEXTS[0], list(result.hits))]
    assert lib.duplicates(np.float32(0.99)) == lib.duplicates(0.99)
    with Library.open(lib_dir, batch_size=np.int64(8), workers=np.int32(1)) as again:
        assert (again.batch_size, again.workers) == (8, 1)


def test_similar_takes_a_path_a_pil_image_or_the_bytes_of_a_file(lib):
    some = lib.search(TEXTS[0], 1, rerank=False).hits[0]
    by_path = [(h.id, round(h.score, 5)) for h in lib.similar(some.path, 3).hits]
    assert by_path[0][0] == some.id
    assert [(h.id, round(h.score, 5)) for h in lib.similar(Path(some.path).read_bytes(), 3).hits] == by_path
    assert [h.id for h in lib.similar(open_image(some.path), 3).hits][0] == some.id
    with open(some.path, "rb") as f:
        assert [(h.id, round(h.score, 5)) for h in lib.similar(f, 3).hits] == by_path


def test_an_empty_path_filter_is_no_filter_in_python_too(lib):
    assert [h.id for h in lib.search(TEXTS[0], 3, rerank=False, path="").hits] == [h.id for h in lib.search(TEXTS[0], 3, rerank=False).hits]
    searched = lib.search(TEXTS[0], 3, rerank=False)
    assert [h.id for h in lib.rerank(TEXTS[0], searched).hits] == [h.id for h in lib.rerank(TEXTS[0], searched.hits).hits]


@pytest.mark.parametrize("kwargs, message", [
    ({"path": 5}, r"library path 5 \(int\) is not a path"),
    ({"workers": -1}, "workers=-1 is not a whole number >= 0 and <= 256"),
    ({"workers": 2.5}, "workers=2.5 is not a whole number"),
    ({"batch_size": "8"}, "batch_size='8' is not a whole number >= 0 and <= 4096"),
    ({"batch_size": 5000}, "batch_size=5000 is not"),
    ({"reembed": "no"}, "reembed='no' is a str; pass True or False"),
    ({"create": "no"}, "create='no' is a str; pass True or False"),
])
def test_library_open_checks_its_arguments(lib_dir, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        Library.open(**{"path": lib_dir, **kwargs})


def test_bfloat16_vectors_are_not_taken_for_a_damaged_index(tiny_itm_dir, tmp_path):
    """A photo searched by itself scores ~1; vectors normalised in bf16 had norms off by up to 0.5%, which
    the damage check took for a damaged index (deleted, rebuilt, still failing)."""
    photos = tmp_path / "photos"
    for i in range(24):
        _photo(photos / f"b{i}.jpg", 200 + i)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True, dtype="bfloat16", vector_index="exact") as lib:
        lib.index([photos])
        vectors = lib.metadata.vectors_for(range(1, 25))
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)  # unit in float32
        for i in range(24):
            found = lib.similar(photos / f"b{i}.jpg", 1)
            assert found.notes == () and found.hits[0].itc <= 1.0 + 1e-5


def test_cli_image_search_refuses_text_only_options(lib_dir, lib):
    """`search --image` with --rerank, --rerank-k, --rerank-source or --fusion: refused, not silently ignored;
    --no-rerank and --no-fusion (what an image search does anyway) pass."""
    photo = lib.search(TEXTS[0], 1, rerank=False).hits[0].path
    base = ["search", "--image", photo, "--library", str(lib_dir), "-k", "2", "--json"]
    for extra in (["--rerank"], ["--rerank-k", "4"], ["--rerank-source", "stored"], ["--fusion"]):
        res = CliRunner().invoke(main, [*base, *extra])
        assert res.exit_code == 2 and f"{extra[0]} applies to text queries only" in res.output, res.output
    plain = CliRunner().invoke(main, base)
    assert plain.exit_code == 0 and json.loads(plain.stdout)["results"][0]["path"] == photo
    for extra in (["--no-rerank"], ["--no-fusion"]):
        assert CliRunner().invoke(main, [*base, *extra]).stdout == plain.stdout


@pytest.mark.parametrize("blank", ["", " ", "...", "(~)"])
def test_a_blank_caption_embedded_by_an_earlier_version_adds_nothing_to_fusion(tiny_itm_dir, tmp_path, blank):
    """A caption that normalises to nothing ("" or only the marks BLIP-2 drops) was embedded and fused like a
    real one: as the only caption vector it ranked first in the caption list and lifted its photo to the top of
    every query. A library still holding such vectors ranks as if the photo had no caption."""
    from blip2_search.store import CaptionUpdate

    for i in range(8):
        _photo(tmp_path / "photos" / f"p{i}.jpg", 700 + i)
    with Library.open(tmp_path / "lib", model=str(tiny_itm_dir), captioner=False, create=True, batch_size=8) as lib:
        lib.index([tmp_path / "photos"])
        plain = [h.id for h in lib.search(TEXTS[0], 8, rerank=False, fusion=False).hits]
        last = plain[-1]
        lib.metadata.set_captions([CaptionUpdate(last, blank, "some captioner", lib.encoder.embed_texts([blank])[0])])
    with Library.open(tmp_path / "lib") as lib:
        assert lib.metadata.get_records([last])[0].caption == blank  # the record keeps what the captioner wrote
        for text in TEXTS:
            fused = lib.search(text, 8, rerank=False, fusion=True).hits
            assert [h.id for h in fused] == [h.id for h in lib.search(text, 8, rerank=False, fusion=False).hits], text
