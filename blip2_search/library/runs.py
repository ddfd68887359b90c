"""The runs that change a library: `index` (and what it fills in afterwards) and `prune` (`Library` mixes this in)."""

from __future__ import annotations

import os
import reprlib
import shlex
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from ..errors import PRUNE_MISSING, STORE_VIT, IndexInterrupted, InvalidInputError, LibraryError, Note, Spelled
from ..store import ModelRef
from ..store.engine import METADATA_FILENAME
from .options import _check_flags, _is_number, _missing_folders, _REEMBED_ARG, _s, THUMBS_DIRNAME
from .reports import NOT_COMPACTED, PruneReport


class _Runs:
    """`Library.index` and `Library.prune`."""

    # ------------------------------------------------------------------ indexing
    def index(self, dirs: Iterable[str | os.PathLike], *, progress: Callable | None = None, fast_decode: bool = True, store_vit: bool = False,
              rehash: bool = False):
        """Index photo folders (incremental; resumable after a crash). Returns an `IndexReport`.

        Ctrl-C commits what was done, then raises `IndexInterrupted` (a KeyboardInterrupt) whose `report`
        says what; running again resumes.

        `progress`: called on this thread with a `Progress` after each file (and each step of the `vit` and `caption`
        stages that follow the run); an exception it raises stops the run.
        `store_vit`: from now on keep each image's ViT tokens (fp16) so reranking need not rerun the ViT.
        `rehash`: read and hash every file, also those whose size and mtime are unchanged (finds content
        replaced under the same size and time; unchanged content is reused, not embedded again).
        """
        from ..indexing.pipeline import Indexer
        from ..indexing.scan import check_roots

        _check_flags(fast_decode=fast_decode, store_vit=store_vit, rehash=rehash)
        if progress is not None and not callable(progress):
            raise InvalidInputError(f"progress {reprlib.repr(progress)} is not callable; pass a function that takes a Progress, or None")
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        dirs = list(dirs) if isinstance(dirs, Iterable) and not isinstance(dirs, bytes) else dirs
        if not isinstance(dirs, list) or not all(isinstance(d, (str, os.PathLike)) for d in dirs):
            raise InvalidInputError(f"folders to index {reprlib.repr(dirs)} are not paths; pass a folder or a list of folders (str or Path)")
        self._check_gone_folders(dirs)
        roots = check_roots(dirs, library=self.folder)
        with self._lock():
            self._drop_stale_vectors()
            info = self._embedder_info()
            cap = self.captioner if self.captioner_name else None  # found before anything is recorded
            notes = []
            if self.reembed:
                recorded = self.metadata.info().embedder
                if recorded is not None and recorded != info:
                    self.metadata.reset_embedder(info)
                    self._vectors = None
                elif recorded is not None and (pending := self.metadata.pending_count()):  # a stopped --reembed run: resumed
                    notes.append(f"the library is being re-embedded with {self.model_name!r} already: this run resumes it "
                                 f"({pending} photos were waiting)")
                elif recorded is not None:
                    notes.append(Note("the library's vectors already come from {model!r}, so {reembed} had nothing to redo; it "
                                      "re-embeds when {model_arg} names another model", model=self.model_name, reembed=_REEMBED_ARG,
                                      model_arg=Spelled("model=", "--model")))
            self.metadata.ensure_embedder(info)
            if cap is not None:  # with the embedder, so a run that fails later still captions next time
                self.metadata.set_captioner(ModelRef(cap.name, cap.revision))
            elif self._forget_captioner and self.metadata.info().captioner is not None:
                self.metadata.set_captioner(None)
                notes.append(Note("the library no longer captions new photos (captions already written stay in search); {again} "
                                  "captions again", again=Spelled("Library.open(FOLDER, captioner=C).index(PHOTO_DIRS)", "index --captioner C")))
            kind = self.vector_index_kind()
            if self.metadata.vector_index() != kind:
                self.metadata.set_vector_index(kind)
                self._vectors = None
                _ = self.vectors  # reopened now: rebuilt (and saved) when the file is of another kind
            if store_vit:
                self.vit_store.enable()
            indexer = Indexer(self.metadata, lambda: self.vectors, self.encoder, self.captioner, batch_size=self.encoder.batch_size,
                              workers=self.workers, fast_decode=fast_decode, skip=[str(self.folder)], vit_store=self.vit_store, rehash=rehash,
                              checkpoint=self._checkpoint_vectors, vectors_lock=self._vectors_use)
            report = indexer.run(roots, progress)
            if report.interrupted and self._vectors is not None:
                try:  # it holds what was committed: servers follow it, and the next run needs no rebuild
                    self._save_vectors()
                except (KeyboardInterrupt, LibraryError):  # a second Ctrl-C, or a full disk: the next command rebuilds it
                    pass
            if not report.interrupted:
                known = self.metadata.known_files() if self.vit_store.enabled else {}  # read once for the token store's two uses
                self._prune_vit_tokens(known)
                self._save_vectors()
                started = time.perf_counter()
                try:
                    self._fill_in(indexer, store_vit, progress, notes, known)
                except KeyboardInterrupt:
                    report = replace(report, interrupted=True)
                report = replace(report, seconds=round(report.seconds + time.perf_counter() - started, 3))
                if self.metadata.counts().pending:
                    notes.append(self._waiting_note())
            report = replace(report, notes=report.notes + tuple(notes)) if notes else report
            if report.interrupted:
                raise IndexInterrupted(report)
            return report

    def _check_gone_folders(self, dirs: list) -> None:
        """A named folder that is gone but holds photos of the library: say how to keep or forget them (indexing cannot
        tell a folder removed for good from a drive that is unplugged)."""
        for folder in dirs:
            path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
            if not os.fspath(folder) or os.path.lexists(path):
                continue
            recorded = self.metadata.photos_under(path)
            if recorded:
                raise InvalidInputError("photo folder {folder!r} does not exist, but the library has {recorded} photo{s} recorded under "
                                        "{path}; reconnect its drive (or move it back) and index it again, or, if it is gone for good, "
                                        "forget them with `{forget}`", folder=os.fspath(folder), recorded=recorded, s=_s(recorded), path=path,
                                        forget=Spelled(f"Library.prune(missing=[{path!r}])", f"prune --missing-under {shlex.quote(path)}"))

    def _fill_in(self, indexer, store_vit: bool, progress, notes: list[str], known: dict) -> None:
        """After a run: what photos indexed earlier lack. Their ViT tokens with `store_vit`, and captions when
        the library has a captioner (photos indexed with captions off). Appends to `notes`; the run itself is
        done and saved, so an error here is a note, not a lost report (Ctrl-C is raised)."""
        filled = 0
        try:
            filled = indexer.fill_vit_tokens(progress) if store_vit else 0
        except (OSError, MemoryError) as exc:
            notes.append(Note("could not store the ViT tokens of the photos indexed without them ({exc}); free disk space (0.72 MB "
                              "a photo for ViT-g) and run {store_vit} again", exc=exc, store_vit=STORE_VIT))
        except LibraryError as exc:  # a full disk, said by the token store
            notes.append(f"not all photos indexed without ViT tokens got them: {exc}")
        if filled:
            notes.append(f"stored the ViT tokens of {filled} photo{_s(filled)} indexed without them")
        elif not store_vit and self.vit_store.enabled:  # e.g. a --store-vit run that was killed: say so, fill in only when asked
            stored = self.vit_store.stored_hashes()
            lacking = len({k.content_hash for k in known.values() if k.status == "indexed"} - stored)
            if lacking:
                notes.append(Note("{lacking} photo{s} of the library {have} no stored ViT tokens (a run storing them that was stopped?), "
                                  "so reranking reruns the ViT for them; run {store_vit} to store them", lacking=lacking, s=_s(lacking),
                                  have="has" if lacking == 1 else "have", store_vit=STORE_VIT))
        embedded = indexer.fill_caption_vectors()
        if embedded:
            notes.append(f"embedded the captions of {embedded} photo{_s(embedded)} that had none embedded (after a re-embed without captions)")
        if indexer.captioner is None:
            return
        try:
            indexer.fill_captions(progress)
        except (OSError, MemoryError, SQLAlchemyError) as exc:
            notes.append(f"could not caption the photos indexed without captions ({exc}); fix that and run index again")
        finally:  # also after Ctrl-C: what was done is kept, and said
            counts = indexer.caption_counts
            if counts.captioned:
                notes.append(f"captioned {counts.captioned} photo{_s(counts.captioned)} indexed without captions")
            if counts.unreadable:
                notes.append(Note("{n} photo{s} indexed without captions could not be read to caption (changed or missing since); run "
                                  "index on their folders, or `{prune}` for photos gone for good", n=counts.unreadable,
                                  s=_s(counts.unreadable), prune=PRUNE_MISSING))

    def _waiting_note(self) -> str:
        """What to do about photos still waiting to be embedded with the library's model (after --reembed)."""
        waiting = [p for p, k in self.metadata.known_files().items() if k.status == "pending"]
        missing = sum(1 for p in waiting if not os.path.lexists(p))
        n = len(waiting)
        head = f"{n} photo{'s' if n != 1 else ''} still wait{'' if n != 1 else 's'} to be embedded with {self.model_name!r} and cannot be searched"
        if missing == n:
            return Note("{head}: their files were not found (a disconnected drive?); reconnect them and run index again, or forget "
                        "them with `{prune}`", head=head, prune=PRUNE_MISSING)
        return (f"{head} ({missing} of them not found on disk), e.g. {waiting[0]}; run index on the folders that hold them"
                if missing else f"{head}, e.g. {waiting[0]}; run index on the folders that hold them")

    def _prune_vit_tokens(self, known: dict | None = None) -> int:
        """Delete stored ViT tokens of content no indexed or deleted image has (a deleted photo keeps them, as
        it keeps its vectors, for when it comes back; `prune` forgets both); return how many files went.
        `known`: the library's known files, when the caller has read them."""
        if not self.vit_store.enabled:
            return 0
        known = self.metadata.known_files() if known is None else known
        return self.vit_store.prune(k.content_hash for k in known.values() if k.status in ("indexed", "deleted") and k.content_hash)

    def prune(self, older_than_days: float | None = None, *, missing=False) -> PruneReport:
        """Forget photos that were deleted from disk: their records, their stored vectors (unless a
        live copy shares them) and ViT tokens go for good, and metadata.sqlite shrinks once a tenth of
        it is free space (until then later indexing reuses the space).

        Until then a deleted photo that comes back reuses its vectors; after it, it is embedded
        again. `older_than_days`: only photos found deleted at least this long ago. `missing`: first
        mark deleted every photo whose file is not on disk now, wherever it is (True: a drive gone for
        good, a folder nobody will index again; a drive that is only disconnected loses its photos'
        records and vectors too), or only under the given folder(s) (a path or a list of paths).
        """
        under = _missing_folders(missing)
        if older_than_days is not None and (not _is_number(older_than_days) or not older_than_days >= 0):
            reason = "negative" if _is_number(older_than_days) and older_than_days < 0 else "not a number of days"
            raise InvalidInputError(f"older_than_days {older_than_days!r} is {reason}; pass 0 or more days, or None for all")
        before = None
        if older_than_days is not None:
            before = datetime.now(timezone.utc) - timedelta(days=min(float(older_than_days), 36_500))  # beyond: none qualify
        with self._lock():
            # A run that marked photos deleted but died before saving left vectors.faiss behind the
            # database; a server still serving it would look up the rows pruned here. Bring the file up
            # to date first: servers then reload it (without those photos) at their next search.
            self._drop_stale_vectors()
            embedder = self.metadata.info().embedder
            embedded = embedder is not None  # else nothing was ever embedded: no index
            gone, notes = [], []
            if missing is not False:
                live = self.metadata.live_paths()
                gone = [i for i, p in live if (under is None or p.startswith(under)) and not os.path.lexists(p)]
                for folder in under or ():  # a mistyped folder (or a relative one from another folder) matched nothing
                    if not any(p.startswith(folder) for _, p in live):
                        notes.append(f"the library has no photos recorded under {folder.rstrip(os.sep) or os.sep}; check the folder "
                                     "(a relative one is taken from the current folder)")
            if gone and embedded:
                with self._vectors_use:  # not while a search of another thread reads it
                    self.vectors.remove(np.asarray(gone, dtype=np.int64))  # loaded (or rebuilt) before the database changes
            missing_photos = self.metadata.mark_deleted(gone)  # failures of files never indexed are dropped, not counted
            if embedded:
                try:
                    self._save_vectors(compact=True)  # the space of removed photos' rows too
                except LibraryError as exc:  # a full disk: drop the stale file (a rebuild follows), free the space anyway
                    self._remove_index_file()
                    notes.append(f"{exc}; removed the stale vector index instead (the next command rebuilds it)")
            size_before = self._metadata_bytes()
            images, embeddings = self.metadata.forget_deleted(before)
            vit_files = self._prune_vit_tokens()
            self._prune_thumbnails()
            try:
                compacted = self.metadata.vacuum()
            except LibraryError as exc:  # a full disk: VACUUM writes a second copy; the photos are forgotten all the same
                compacted = False
                notes.append(f"{NOT_COMPACTED}: {exc}")
            return PruneReport(images, embeddings, embeddings * (embedder.num_query_tokens if embedded else 0), vit_files, size_before,
                               self._metadata_bytes(), missing_photos, tuple(notes), compacted)

    def _prune_thumbnails(self) -> int:
        """Delete the server's cached thumbnails (`thumbs/ID-...jpg`) of images the library no longer has."""
        folder = self.folder / THUMBS_DIRNAME
        if not folder.is_dir():
            return 0
        known = {k.id for k in self.metadata.known_files().values()}
        removed = 0
        for path in folder.glob("*.jpg"):
            head = path.name.split("-", 1)[0]
            if head.isdigit() and int(head) not in known:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _metadata_bytes(self) -> int:
        files = (self.folder / METADATA_FILENAME, self.folder / f"{METADATA_FILENAME}-wal")
        return sum(f.stat().st_size for f in files if f.exists())
