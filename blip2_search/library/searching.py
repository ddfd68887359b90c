"""Searches of a library: text, image and like-a-photo searches, ITM rerank and near-duplicates, with their notes
(`Library` mixes this in)."""

from __future__ import annotations

import numbers
import os
import reprlib
from dataclasses import replace
from typing import Iterable

import numpy as np

from ..errors import REEMBED, STORE_VIT, InvalidInputError, LibraryError, ModelMismatchError, Note, Spelled
from ..store import STATUS_INDEXED
from .options import _check_flags, _check_rerank_source, _check_sort, _is_number, _left_out_note, _s
from .reports import DuplicateGroups, DuplicatePhoto


SMALL_VIT_PARAMS = 100_000_000  # below this, rerunning the ViT per rerank candidate is cheap on a CPU


class _Searching:
    """`Library`'s searches."""

    # ------------------------------------------------------------------ searching
    @property
    def engine(self):
        """The search engine over this library (text-only queries load no ViT); it follows changes that
        another process committed (see `_follow_other_writers`)."""
        self._follow_other_writers()
        engine = self._engine  # read once: another thread's `_follow_other_writers` may drop it meanwhile
        if engine is None:
            from ..search.engine import SearchEngine

            info = self.metadata.info()
            if info.embedder is None:
                raise LibraryError("library {folder} has no indexed images yet; index photos into it first ({index})", folder=self.folder,
                                   index=Spelled("Library.index(PHOTO_DIRS)", f"blip2-search index PHOTO_DIR --library {self.folder}"))
            enc = self.encoder
            recorded = self.metadata.info().embedder.model  # read again: loading the encoder may adopt a new fingerprint
            if recorded.model_id != enc.name and self.reembed:  # opened to re-embed with another model: its index run comes first
                raise ModelMismatchError(
                    "library {folder}'s vectors come from {recorded}, not {name!r}; run `{index}` to re-embed them before searching, "
                    "or open the library without {argument} to search with its own", argument="model", folder=self.folder,
                    recorded=recorded.describe(), name=enc.name,
                    index=Spelled("Library.index(PHOTO_DIRS)", f"blip2-search index PHOTO_DIR --library {self.folder} --model {enc.name} --reembed"))
            if recorded.model_id != enc.name:  # another process re-embedded it since this one chose its model
                raise self._reembedded_elsewhere(recorded)
            if recorded.revision and recorded.revision not in (enc.revision, self._unadopted_revision):
                raise ModelMismatchError(
                    "library {folder} was built with {recorded} but the files of {name!r} are now revision {revision}; re-embed every "
                    "image ({reembed}), or restore the original model files", folder=self.folder, recorded=recorded.describe(),
                    name=enc.name, revision=enc.revision, reembed=REEMBED)
            self._captions_generation = self.metadata.captions_generation()
            engine = self._engine = SearchEngine(self.metadata, self.vectors, enc)
        # serving vectors older than the database (another process's run is going on): the engine rescores candidates
        engine.index_behind = self._vectors_generation is not None and self._vectors_generation < self._seen_generation
        return engine

    def default_rerank_k(self) -> int:
        """How many candidates `search` reranks unless told: 128 on a GPU, as in the paper.

        On a CPU, 16 when the ViT tokens are stored or the ViT is small (ITM alone: ~6 s for 16
        candidates with ViT-g on 2 cores); 0 when a large ViT would have to rerun for every candidate
        (ViT-g: ~10 s an image on 2 cores, so ~170 s a query; docs/benchmarks.md).
        """
        enc = self.encoder
        if enc.placement.device == "cuda":
            return 128
        if self.vit_store.enabled or enc.vit_params < SMALL_VIT_PARAMS:
            return 16
        return 0

    def search(self, query: str, k: int = 10, *, rerank: bool = True, rerank_k: int | None = None, path: str | None = None,
               after=None, before=None, min_score: float | None = None, sort: str = "score", fusion: bool = True,
               rerank_source: str = "auto"):
        """Top `k` images for a text query (see docs/queries.md for composite terms); returns a `SearchResult`.

        `path`: a glob on the absolute recorded path, matched as given (`*` crosses `/`): unlike the CLI's
        --path, a relative glob is not taken from the current folder (a server's folder says nothing about
        its callers); it matches nothing, with a note. `after`/`before`: 'YYYY-MM-DD', a date or a datetime."""
        from ..search.query import parse_query
        from ..search.results import check_k, make_filters

        k = check_k(k)
        q = parse_query(query)
        filters = make_filters(path, after, before, min_score)
        _check_flags(rerank=rerank, fusion=fusion)
        _check_rerank_source(rerank_source)
        return self._rebuilt_if_damaged(lambda: self._search(q, k, rerank, rerank_k, filters, sort, fusion, rerank_source, path))

    def _search(self, q, k, rerank, rerank_k, filters, sort, fusion, rerank_source, path):
        from ..search.results import check_k

        engine = self.engine
        rk = check_k(rerank_k, "rerank_k") if rerank_k is not None else self.default_rerank_k()
        if rerank and rk == 0:
            result = engine.search_text(q, k, filters=filters, rerank=False, fusion=fusion, sort=_check_sort(sort))
            note = Note("not reranked: on a CPU each candidate would rerun this model's ViT (minutes a query); store the ViT tokens "
                        "({store_vit}), pass {argument:N} to force it, or use a GPU", argument="rerank_k", store_vit=STORE_VIT)
            return self._with_index_note(self._with_result_notes(replace(result, notes=result.notes + (note,)), path, filters, sort))
        source = self._vit_source(rerank_source) if rerank else None
        result = engine.search_text(q, k, filters=filters, rerank=rerank, rerank_k=rk, fusion=fusion, sort=_check_sort(sort), vit_source=source)
        return self._with_index_note(self._with_result_notes(result, path, filters, sort))

    def _with_index_note(self, result):
        """`result`, noting photos not searchable yet (waiting to be re-embedded), and a vector index that had to be
        rebuilt and could not be saved (each process rebuilds it)."""
        notes = []
        pending = self.metadata.pending_count()
        if pending:
            notes.append(_left_out_note(pending, "found yet"))
        if self._unsaved_index is not None:
            notes.append(f"the vector index was rebuilt in memory but not saved ({self._unsaved_index}); every process rebuilds it "
                         "until then (deleting its stale files, vectors.faiss.json and the vectors.faiss, vectors.*.f32 or vectors.*.ids beside it, "
                         "also frees their space)")
        return replace(result, notes=result.notes + tuple(notes)) if notes else result

    def similar(self, image, k: int = 10, *, path: str | None = None, after=None, before=None, min_score: float | None = None, sort: str = "score"):
        """Images most like `image` (a path, a PIL image, or an image file's bytes or binary file object), by their 32 query vectors;
        or like the library's image of that id (an int: a hit's `id`), from its stored vectors: no file is read and no picture is embedded."""
        from PIL import Image

        from ..images import model_image, upright_rgb
        from ..search.results import check_k, make_filters

        k = check_k(k)
        filters = make_filters(path, after, before, min_score)
        if isinstance(image, numbers.Integral) and not isinstance(image, bool):
            image_id = int(image)
            record = self.metadata.get_records([image_id]) if 0 <= image_id < 2**63 else []
            if not record or record[0].status != STATUS_INDEXED:
                raise InvalidInputError(f"image id {image_id} is not an indexed image of library {self.folder}; pass an id from current "
                                        "search results (a hit's id)")
            return self._rebuilt_if_damaged(lambda: self._with_index_note(self._with_result_notes(
                self.engine.search_like(image_id, k, filters=filters, sort=_check_sort(sort), label=record[0].path),
                path, filters, sort)))
        if isinstance(image, Image.Image):
            label, pil = "<image>", upright_rgb(image)
        elif isinstance(image, (str, os.PathLike, bytes)) or hasattr(image, "read"):  # what open_image reads
            label = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<image bytes>"
            pil = model_image(image, *self.encoder.image_input)  # as `index` decoded the library's photos
        else:
            fix = "convert it with Image.fromarray(a)" if isinstance(image, np.ndarray) else "pass a path, a PIL image, an image file's bytes, or a library image's id"
            raise InvalidInputError(f"example image {reprlib.repr(image)} ({type(image).__name__}) is not a picture; {fix}")
        return self._rebuilt_if_damaged(lambda: self._with_index_note(self._with_result_notes(
            self.engine.search_image(pil, k, filters=filters, sort=_check_sort(sort), label=label), path, filters, sort)))

    def _with_result_notes(self, result, glob: str | None, filters, sort: str):
        """`result` with `outcome_notes` added (what its hits alone do not say), and with a date filter how many
        photos (under the path filter) it left out for having no capture date: nothing else says why they are
        missing."""
        from ..search.results import outcome_notes

        notes = outcome_notes(result.hits, glob=glob, filtered=filters.active, sort=sort)
        if filters.after is not None or filters.before is not None:
            undated = len(self.metadata.filter_ids(path_glob=filters.path_glob, undated=True))
            if undated:
                notes += (f"{undated} photo{_s(undated)} without a capture date (no EXIF date) {'is' if undated == 1 else 'are'} "
                          "left out by the after/before filters",)
        return replace(result, notes=result.notes + notes) if notes else result

    def rerank(self, query: str, hits, *, rerank_source: str = "auto"):
        """ITM-rerank `hits` (a `search` result, its `Hit`s, or image ids) against `query` (the same syntax, scored as
        `search` reranks): a `SearchResult`, best first by ITM logit + ITC; hits whose photo could not be read
        come last (by ITC, `itm_logit` None), with a note."""
        from ..search.query import parse_query
        from ..search.results import Hit, SearchResult

        q = parse_query(query)
        _check_rerank_source(rerank_source)
        if isinstance(hits, SearchResult):
            hits = hits.hits
        if isinstance(hits, (str, bytes, Hit)) or not isinstance(hits, Iterable):
            raise InvalidInputError(f"hits to rerank must be a search result, a list of its Hits or image ids, not {type(hits).__name__}")
        hits = self._hits_of(list(hits))
        if not hits:
            return SearchResult(q.raw, ())
        return self._rebuilt_if_damaged(lambda: self.engine.rerank(q, hits, vit_source=self._vit_source(rerank_source)))

    def _hits_of(self, items: list) -> list:
        """`items` (Hits and image ids) as Hits of this library, each photo once; InvalidInputError for anything else,
        for ids that are not indexed images, and for a Hit whose path is not its id's (another library's)."""
        from ..search.results import Hit

        bad = [i for i in items if not isinstance(i, Hit) and (not isinstance(i, numbers.Integral) or isinstance(i, (bool, np.bool_)))]
        if bad:
            raise InvalidInputError(f"cannot rerank {bad[0]!r} ({type(bad[0]).__name__}); pass Hits from search or integer image ids")
        ids = list(dict.fromkeys(h.id if isinstance(h, Hit) else int(h) for h in items))  # each photo once, first place kept
        records = {r.id: r for r in self.metadata.get_records(ids) if r.status == "indexed"}
        unknown = [i for i in ids if i not in records]
        if unknown:
            raise InvalidInputError(f"images {unknown[:5]} are not indexed images of library {self.folder}; pass ids from search results")
        foreign = next((h for h in items if isinstance(h, Hit) and h.path != records[h.id].path
                        and os.path.realpath(h.path) != os.path.realpath(records[h.id].path)), None)
        if foreign is not None:
            raise InvalidInputError(f"hit {foreign.id} ({foreign.path}) is not image {foreign.id} of library {self.folder}, which is "
                                    f"{records[foreign.id].path}; rerank hits of this library's own search results, or pass image ids")
        return [h if isinstance(h, Hit) else Hit(h, records[h].path, 0.0, 0.0, None, records[h].caption, records[h].taken_at) for h in ids]

    def duplicates(self, threshold: float = 0.95) -> DuplicateGroups:
        """Groups of near-duplicate images (image-to-image score >= threshold), each photo with its best score
        with another photo of its group (a group is linked pair by pair, so two of its photos may score lower);
        `notes` name photos that could not be compared (waiting to be re-embedded)."""
        from ..errors import InvalidInputError

        if not _is_number(threshold) or not 0.0 < threshold <= 1.0:
            raise InvalidInputError("duplicate threshold {given} is not a number in (0, 1]; try {argument:0.95}", argument="threshold",
                                    given=repr(threshold))
        groups = self._rebuilt_if_damaged(lambda: self._duplicates(float(threshold)), note=False)
        pending = self.metadata.pending_count()
        notes = (_left_out_note(pending, "compared with the others yet"),) if pending else ()
        if not groups and not pending and (indexed := self.metadata.counts().indexed) < 2:  # no threshold finds a pair
            notes = (f"library {self.folder} has {indexed} searchable photo{_s(indexed)}, and near-duplicates take two; index more photos",)
        return DuplicateGroups(groups, notes)

    def _duplicates(self, threshold: float) -> list[list[DuplicatePhoto]]:
        engine = self.engine
        if engine.index_behind:  # another process's run goes on: its last save may hold photos since removed or changed
            engine = self._current_engine()
        groups = engine.duplicates(threshold)
        records = {r.id: r for r in self.metadata.get_records([i for g in groups for i in g])}
        out = []
        for group in groups:
            members = [records[i] for i in group if i in records and records[i].status == STATUS_INDEXED]
            if len(members) > 1:
                scores = engine.closest_in_group([r.id for r in members])
                out.append([DuplicatePhoto(r.id, r.path, float(s), r) for r, s in zip(members, scores)])
        return out

    def _current_engine(self):
        """A search engine over the database's vectors as they are now, for this call only (the library keeps
        the index it loaded): the file if another process saved it current meanwhile, else rebuilt in memory."""
        from ..search.engine import SearchEngine

        return SearchEngine(self.metadata, self._open_vectors(save=False).store, self.encoder)

    def _vit_source(self, rerank_source: str):
        from ..search.rerank import RecomputeVit, StoredVit

        enc, as_indexed = self.encoder, self.metadata.files_as_indexed  # not self.engine: it rereads the database's generations
        if rerank_source == "recompute" or (rerank_source == "auto" and not self.vit_store.enabled):
            return RecomputeVit(enc, as_indexed)
        if rerank_source == "stored" and not self.vit_store.enabled:
            raise InvalidInputError("library {folder} stores no ViT tokens; store them first ({store_vit}), or pass {argument:'recompute'}",
                                    argument="rerank_source", folder=self.folder, store_vit=STORE_VIT)
        _check_rerank_source(rerank_source)

        def hash_of(ids):
            return {r.id: r.content_hash for r in self.metadata.get_records(ids)}

        return StoredVit(enc, self.vit_store, hash_of, stored_only=rerank_source == "stored", as_indexed=as_indexed)
