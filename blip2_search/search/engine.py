"""The search engine: exact BLIP-2 ITC first stage, caption fusion, filters, ITM rerank, image queries.

Data flows one way: query -> term embeddings -> ITC over the vector store (filters inside) -> optional
fusion with caption matches -> optional ITM rerank -> hits with metadata.
"""

from __future__ import annotations

import reprlib
from dataclasses import replace
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import CorruptIndexError, InvalidInputError, Note
from ..models.encoder import Blip2Encoder
from ..store import MetadataStore, VectorStore
from ..store.scoring import mean_max
from .duplicates import closest_in_group, duplicate_groups
from ..models.text import has_words
from .query import Query
from .rerank import RecomputeVit, VitSource, rerank_hits
from .results import Filters, Hit, SearchResult

RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
FUSION_DEPTH = 100  # candidates taken from each ranked list before fusing
CAPTION_WEIGHT = 0.5  # each caption list counts half as much as the image ranking
EXACT_COMPOSITE_LIMIT = 50_000  # composite queries score every image exactly up to this size (vectors in RAM)
COMPOSITE_CANDIDATES = 200  # beyond it, at least this many candidates from each list (see `_first_stage`)


class SearchEngine:
    """Searches one library; collaborators are passed in and the encoder loads its parts lazily."""

    def __init__(self, metadata: MetadataStore, vectors: VectorStore, encoder: Blip2Encoder, *, vit_source: VitSource | None = None):
        self.metadata = metadata
        self.vectors = vectors
        self.encoder = encoder
        self.vit_source = vit_source or RecomputeVit(encoder, metadata.files_as_indexed)
        self._caption_matrix: tuple[np.ndarray, np.ndarray] | None = None
        self.index_behind = False  # the loaded vector index is older than the database: see `_redo_live`

    # ------------------------------------------------------------------ text
    def search_text(self, query: Query, k: int, *, filters: Filters = Filters(), rerank: bool = False, rerank_k: int = 32,
                    fusion: bool = True, sort: str = "score", vit_source: VitSource | None = None, live_only: bool = False) -> SearchResult:
        """Top `k` images for a (possibly composite) text query. `live_only`: see `_allowed`."""
        allowed = self._allowed(filters, live_only)
        notes = query_notes(self.encoder, query, reranked=rerank and rerank_k > 0)
        texts = [t.text for t in query.terms]
        weights = np.array([t.weight for t in query.terms], dtype=np.float32)
        emb = self.encoder.embed_texts(texts)  # [m, D]
        depth = max(k, rerank_k if rerank else 0, FUSION_DEPTH if fusion else 0)
        ids, itc = self._first_stage(emb, weights, query.is_simple, depth, allowed)
        found = len(ids)
        ids, itc = self._rescored_if_behind(ids, itc, lambda stored: composite_itc(stored, emb, weights))
        lost = len(ids) < found  # photos the database no longer holds (see `_rescored_if_behind`)
        keep = np.isfinite(itc) if filters.min_score is None else np.isfinite(itc) & (itc >= filters.min_score)
        ids, itc = ids[keep], itc[keep]  # -inf: a compact index's row the database no longer holds
        itc_of = dict(zip(ids.tolist(), itc.tolist()))
        order, fused = ids.tolist(), None
        if fusion:
            order, fused = self._fuse(query, emb, weights, order, allowed, itc_of, filters)
        pool = order[: max(k, rerank_k if rerank else 0)]
        hits = self._hits(pool, itc_of, fused)
        if (lost or len(hits) < len(pool)) and self._redo_live(allowed, live_only):
            return self.search_text(query, k, filters=filters, rerank=rerank, rerank_k=rerank_k, fusion=fusion, sort=sort,
                                    vit_source=vit_source, live_only=True)
        if rerank and hits:
            source = vit_source or self.vit_source
            head, n_missing = rerank_hits(self.encoder, source, query.itm_text, hits[:rerank_k])
            if n_missing:
                head = _unread_in_place(hits[:rerank_k], head, n_missing)
                notes.append(_not_reranked(n_missing, source))
            hits = head + hits[rerank_k:]
        hits = hits[:k]
        if sort == "date":
            hits = sorted(hits, key=lambda h: (h.taken_at is None, h.taken_at or 0))
        return SearchResult(query.raw, tuple(hits), tuple(notes))

    def _allowed(self, filters: Filters, live_only: bool = False) -> np.ndarray | None:
        """The photos a search may return: those the filters pass (indexed ones), or None for any; `live_only`: the
        indexed ones even without filters (reading every indexed id: see `_redo_live`)."""
        if not (filters.restricts_ids or live_only):
            return None
        return self.metadata.filter_ids(path_glob=filters.path_glob, after=filters.after, before=filters.before)

    def _first_stage(self, emb: np.ndarray, weights: np.ndarray, simple: bool, depth: int, allowed) -> tuple[np.ndarray, np.ndarray]:
        """Ids and ITC scores, best first (ties by id). Exact for simple queries at any depth."""
        if simple:
            ids, scores = self.vectors.search(emb[:1], depth, allowed_ids=allowed)
            return ids[0], _checked(scores[0], 1.0)
        if self.vectors.holds_vectors and len(self.vectors) <= EXACT_COMPOSITE_LIMIT:
            cand, stored = self.vectors.stored()
            if allowed is not None:
                rows = np.flatnonzero(np.isin(cand, allowed))
                cand, stored = cand[rows], stored[rows]
        else:
            # Candidates: each positive term's top list, and the top list of the query's combined direction
            # sum_i w_i t_i, which finds the images that match the positive terms but not the negative ones
            # (a positive list alone can be all images that match a negative term too); then exact
            # composite rescoring. Recall@10 of scoring every image, 81 queries with negative terms, 1,100
            # demo photos, compact index: 0.828 from the positive lists alone, 1.000 with the combined
            # list (bench/composite.py).
            lists = emb[weights > 0]
            combined = (weights[:, None] * emb).sum(axis=0)
            if len(weights) > 1 and np.linalg.norm(combined) > 0:
                lists = np.vstack([lists, combined / np.linalg.norm(combined)])
            found, _ = self.vectors.search(lists, max(4 * depth, COMPOSITE_CANDIDATES), allowed_ids=allowed)
            cand = np.unique(found[found >= 0])
            stored = self.vectors.vectors_for(cand)
        scores = composite_itc(stored, emb, weights)
        order = np.lexsort((cand, -scores))[:depth]
        return cand[order], _checked(scores[order], float(np.abs(weights).sum()))

    def _fuse(self, query: Query, emb, weights, order: list[int], allowed, itc_of: dict, filters: Filters):
        """Reciprocal rank fusion of the image ranking with caption full-text and caption-embedding ranks."""
        # each list maps id -> rank; equal caption scores share a rank (identical captions earn the same
        # bonus, so the image ranking decides between them)
        # the image ranking enters whole (it is as deep as k asks), so fusion never returns fewer than k
        lists: list[tuple[float, dict[int, int]]] = [(1.0, {i: r for r, i in enumerate(order)})]
        allowed_set = set(allowed.tolist()) if allowed is not None else None
        text = " ".join(t.text for t in query.terms if t.weight > 0)
        fts = [(i, s) for i, s in self.metadata.search_captions(text, FUSION_DEPTH * 2) if allowed_set is None or i in allowed_set]
        if fts:
            lists.append((CAPTION_WEIGHT, _shared_ranks([i for i, _ in fts], -np.array([s for _, s in fts]))[:FUSION_DEPTH]))
        cap_ids, cap_vecs = self._captions()
        if len(cap_ids):
            sims = composite_itc(cap_vecs[:, None, :], emb, weights)
            if allowed is not None:
                sims = np.where(np.isin(cap_ids, allowed), sims, -np.inf)
            top = np.lexsort((cap_ids, -sims))[:FUSION_DEPTH]
            top = [j for j in top if np.isfinite(sims[j])]
            lists.append((CAPTION_WEIGHT, _shared_ranks([int(cap_ids[j]) for j in top], np.round(sims[top], 5))))
        if len(lists) == 1:
            return order, None
        fused: dict[int, float] = {}
        for weight, ranks in lists:
            for image_id, rank in (ranks.items() if isinstance(ranks, dict) else ranks):
                fused[image_id] = fused.get(image_id, 0.0) + weight / (RRF_K + rank + 1)
        # found only through captions: give them their exact ITC. While the loaded index is behind the database (another
        # process's `index` run goes on) from the database's vectors: a photo that run changed scores by its new content,
        # one it removed drops out (NaN), one it added counts (`_hits` keeps only photos the database holds as indexed).
        new = np.array([i for i in fused if i not in itc_of], dtype=np.int64)
        if self.index_behind and len(new):
            vectors = self.metadata.vectors_for(new, missing="nan")
            for i, s in zip(new.tolist(), composite_itc(vectors, emb, weights).tolist()):
                if np.isfinite(s):
                    itc_of[i] = s
        elif len(new := self.vectors.present(new)):
            for i, s in zip(new.tolist(), composite_itc(self.vectors.vectors_for(new), emb, weights).tolist()):
                itc_of[i] = s
        if filters.min_score is not None:
            fused = {i: f for i, f in fused.items() if itc_of.get(i, -np.inf) >= filters.min_score}
        ranked = sorted((i for i in fused if i in itc_of), key=lambda i: (-fused[i], -itc_of[i], i))
        return ranked, fused

    def _captions(self) -> tuple[np.ndarray, np.ndarray]:
        """All caption vectors, loaded once per engine: `(ids [n], [n, D] float32)`."""
        if self._caption_matrix is None:
            # a caption of no words ("", "...": a captioner with nothing to say) embeds as one fixed text that ranks
            # photos by nothing they show; a library of before it was left unembedded still holds such vectors
            parts = list(self.metadata.iter_caption_vectors(keep=has_words))
            ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
            vecs = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, self.encoder.embed_dim), np.float32)
            self._caption_matrix = (ids, vecs)
        return self._caption_matrix

    def _rescored_if_behind(self, ids: np.ndarray, scores: np.ndarray, score) -> tuple[np.ndarray, np.ndarray]:
        """While the loaded vector index is older than the database (`index_behind`), the first stage's photos
        rescored from the database's vectors (`score`: `[n, Q, D]` -> `[n]`), best first (ties by id): a photo
        whose file the running `index` changed is scored by its new content, not the old one still in the index
        (photos it forgot score NaN and drop out: the caller then searches again, see `_redo_live`). Reads ~32 KB
        a candidate from the database, only then."""
        if not self.index_behind or not len(ids):
            return ids, scores
        fresh = np.asarray(score(self.metadata.vectors_for(ids, missing="nan")), dtype=np.float32)
        ids, fresh = ids[np.isfinite(fresh)], fresh[np.isfinite(fresh)]
        order = np.lexsort((ids, -fresh))
        return ids[order], fresh[order]

    def _redo_live(self, allowed, live_only: bool) -> bool:
        """Whether a search whose hits lost photos the database no longer holds as indexed runs again restricted to
        the indexed ones: when the loaded vector index is older than the database (`index_behind`: another
        process's `index` or `prune` is going on and has not saved it yet), so the answer is not short. Rare, and
        only then is every indexed id read."""
        return self.index_behind and allowed is None and not live_only

    def _hits(self, ids: Sequence[int], itc_of: dict, fused: dict | None) -> list[Hit]:
        """Hits of the given ids that the database holds as indexed, in order (others were removed since the loaded
        vector index was saved)."""
        records = {r.id: r for r in self.metadata.get_records(ids)}
        out = []
        for i in ids:
            r = records.get(i)
            if r is None or r.status != "indexed":
                continue
            score = fused[i] if fused is not None else itc_of[i]
            out.append(Hit(i, r.path, float(score), float(itc_of[i]), None, r.caption, r.taken_at))
        return out

    # ------------------------------------------------------------------ images
    def search_image(self, image: Image.Image, k: int, *, filters: Filters = Filters(), sort: str = "score", label: str = "") -> SearchResult:
        """Images most like `image`: mean over its query vectors of the best match among each image's."""
        return self._search_like(self.encoder.embed_images([image])[0], k, filters, sort, label)

    def search_like(self, image_id: int, k: int, *, filters: Filters = Filters(), sort: str = "score", label: str = "") -> SearchResult:
        """Images most like the library's image `image_id`, from its stored vectors (no file read, no model run: the
        photo itself scores 1.0 unless filtered out); InvalidInputError when it is not a searchable image."""
        return self._search_like(self._vectors_of([image_id])[0], k, filters, sort, label)

    def _search_like(self, q: np.ndarray, k: int, filters: Filters, sort: str, label: str, live_only: bool = False) -> SearchResult:
        """Images most like the query vectors `q` `[Q, D]` of an image (see `search_image`)."""
        allowed = self._allowed(filters, live_only)
        ids, scores = self.vectors.search_vectors(q[None], k, allowed_ids=allowed)
        found = ids.shape[1]
        ids, scores = self._rescored_if_behind(ids[0], _checked(scores[0], 1.0), lambda stored: mean_max(q, stored))
        lost = len(ids) < found  # photos the database no longer holds (see `_rescored_if_behind`)
        keep = np.isfinite(scores) if filters.min_score is None else np.isfinite(scores) & (scores >= filters.min_score)
        ids, scores = ids[keep], scores[keep]
        hits = self._hits(ids.tolist(), dict(zip(ids.tolist(), scores.tolist())), None)
        if (lost or len(hits) < len(ids)) and self._redo_live(allowed, live_only):
            return self._search_like(q, k, filters, sort, label, live_only=True)
        if sort == "date":
            hits = sorted(hits, key=lambda h: (h.taken_at is None, h.taken_at or 0))
        return SearchResult(label, tuple(hits))

    def rerank(self, query: Query, hits: Sequence[Hit], *, vit_source: VitSource | None = None) -> SearchResult:
        """ITM-rerank given hits against `query` (all of them), best first, scored as `search_text` reranks:
        ITC (weighted over the terms) recomputed from the stored vectors, so hits from another query (or
        built from ids) score correctly, plus the ITM logit of the positive terms. Hits that could not be
        read come last, by ITC, with `itm_logit` None and a note."""
        hits = list(hits)
        if not hits:
            return SearchResult(query.raw, ())
        emb = self.encoder.embed_texts([t.text for t in query.terms])
        weights = np.array([t.weight for t in query.terms], dtype=np.float32)
        itc = composite_itc(self._vectors_of([h.id for h in hits]), emb, weights)
        hits = [replace(h, itc=float(c), score=float(c), itm_logit=None) for h, c in zip(hits, itc.tolist())]
        source = vit_source or self.vit_source
        ranked, n_missing = rerank_hits(self.encoder, source, query.itm_text, hits)
        head = ranked[: len(ranked) - n_missing]
        tail = sorted(ranked[len(head):], key=lambda h: (-h.itc, h.id))
        notes = query_notes(self.encoder, query, reranked=True) + ([_not_reranked(n_missing, source)] if n_missing else [])
        return SearchResult(query.raw, tuple(head + tail), tuple(notes))

    def _vectors_of(self, ids: Sequence[int]) -> np.ndarray:
        """Full vectors `[n, Q, D] float32` of any indexed images, in order: from the vector index, or
        from the database for those newer than the loaded index; InvalidInputError for images no longer stored."""
        ids_a = np.array(ids, dtype=np.int64)
        # while the loaded index is behind the database (another process's run goes on), all from the database: a
        # photo that run changed is scored by its new content
        held = np.zeros(len(ids_a), bool) if self.index_behind else np.isin(ids_a, self.vectors.present(ids_a))
        if held.all():
            return self.vectors.vectors_for(ids_a)
        newer = ids_a[~held]
        indexed = {r.id for r in self.metadata.get_records(newer.tolist()) if r.status == "indexed"}
        out = self.metadata.vectors_for(ids_a, missing="nan")
        gone = ~held & (np.isnan(out[:, 0, 0]) | ~np.isin(ids_a, list(indexed)))
        if gone.any():
            raise InvalidInputError(f"images {ids_a[gone][:5].tolist()} are not searchable images of library {self.metadata.location} "
                                    "(gone, unreadable or waiting to be re-embedded); pass ids from current search results")
        if held.any():
            out[held] = self.vectors.vectors_for(ids_a[held])
        return out

    # ------------------------------------------------------------------ near duplicates
    def duplicates(self, threshold: float, *, neighbours: int = 10) -> list[list[int]]:
        """Groups (>= 2 images) whose image-to-image score reaches `threshold`, each sorted by id
        (candidates from summary vectors, scored exactly: see `duplicates.py`)."""
        if self.vectors.holds_vectors:  # the exact store: read its vectors in place
            all_ids, stored = self.vectors.stored()
            order = np.argsort(all_ids)
            sorted_ids = all_ids[order]

            def read(ids: np.ndarray) -> np.ndarray:
                return stored[order[np.searchsorted(sorted_ids, ids)]]

            return duplicate_groups(sorted_ids, read, threshold, neighbours=neighbours)
        return duplicate_groups(self.vectors.image_ids(), self.vectors.vectors_for, threshold, neighbours=neighbours)

    def closest_in_group(self, ids: Sequence[int]) -> np.ndarray:
        """`closest_in_group` of `duplicates.py` for a group's image ids: each one's best score with another member."""
        return closest_in_group(self.vectors.vectors_for(np.asarray(ids, dtype=np.int64)))


def _checked(scores: np.ndarray, bound: float) -> np.ndarray:
    """`scores` of unit vectors, which cannot pass `bound` (1 for one term; the sum of |weights| for several):
    a larger one comes from a damaged index file (CorruptIndexError), not from the photos."""
    finite = scores[np.isfinite(scores)]
    if len(finite) and float(np.abs(finite).max()) > bound * 1.02 + 1e-3:  # slack: half-precision vectors are unit within ~1%
        raise CorruptIndexError(f"the vector index returned a score of {float(np.abs(finite).max()):.4g}, impossible for unit "
                                "vectors: its files are damaged; delete the library's vectors.faiss.json and the index is rebuilt from the database")
    return scores


def query_notes(encoder: Blip2Encoder, query: Query, *, reranked: bool = False) -> list[str]:
    """What was not read of `query`: past the character limit, in each term past the tokens BLIP-2 reads
    (`encoder.max_tokens`, 35), and (`reranked`) past them in the positive terms joined, which is what ITM reads."""
    notes = [f"query truncated to {len(query.raw)} characters"] if query.truncated else []
    if reranked and sum(t.weight > 0 for t in query.terms) > 1:  # one term: its own note says it
        last = encoder.cut_short(query.itm_text)
        if last is not None:
            read = f"up to {last!r}" if last else "only their beginning"
            notes.append(f"reranking reads the positive terms joined, and only their first {encoder.max_tokens} tokens ({read}); "
                         "shorten the terms to have all of them reranked")
    for term in query.terms:
        last = encoder.cut_short(term.text)
        if last is not None:
            what = "the query" if len(query.terms) == 1 else f"the term {reprlib.repr(term.text)}"
            read = f"only the words up to {last!r} were searched" if last else "only its beginning was searched"
            notes.append(f"{what} is longer than the {encoder.max_tokens} tokens BLIP-2 reads: {read}; "
                         "shorten it, or split it into terms (docs/queries.md)")
    return notes


def _unread_in_place(before: list[Hit], ranked: list[Hit], n_unread: int) -> list[Hit]:
    """`ranked` (reranked, then the `n_unread` that could not be read) with those at their first-stage places:
    the best ITC match stays near the top when its file is briefly unreadable, instead of dropping below `k`."""
    unread = {h.id for h in ranked[len(ranked) - n_unread :]}
    reranked = iter(ranked[: len(ranked) - n_unread])
    return [h if h.id in unread else next(reranked) for h in before]


def _not_reranked(n: int, source: VitSource) -> str:
    return Note("{n} candidate{s} could not be reranked ({reason})", n=n, s="s" if n != 1 else "", reason=source.missing_reason)


def _shared_ranks(ids: list[int], scores: np.ndarray) -> list[tuple[int, int]]:
    """`[(id, rank)]` in the given (best-first) order, where equal scores share the best rank."""
    out, rank, prev = [], 0, None
    for pos, (i, sc) in enumerate(zip(ids, scores.tolist())):
        if pos and sc != prev:
            rank = pos
        out.append((i, rank))
        prev = sc
    return out


def composite_itc(stored: np.ndarray, term_embeds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum over terms of weight x ITC (max over query vectors). `[n, Q, D]`, `[m, D]`, `[m]` -> `[n] float32`."""
    n, q, d = stored.shape
    if n == 0:
        return np.zeros(0, np.float32)
    sims = (stored.reshape(n * q, d) @ term_embeds.T).reshape(n, q, -1).max(axis=1)  # [n, m]
    return (sims @ weights).astype(np.float32)
