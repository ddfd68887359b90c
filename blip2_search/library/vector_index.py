"""The library's vector index: opened or rebuilt from the database, followed while another process's `index`
runs, saved at the database's generation, and the lock an index or prune run holds (`Library` mixes this in)."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from .. import settings
from ..errors import OPEN_FOLDER, CorruptIndexError, LibraryError
from ..store import VECTORS_FILENAME, ModelRef, VectorStore, open_vectors
from ..store.exact_files import PRUNE_DEAD_SHARE
from ..store.index_files import files_of_index, remove_leftovers, saved_generation, sidecar_path
from .options import _check_vector_index


LOCK_FILENAME = "index.lock"
FOLLOW_S = 30.0  # a reader beside a running `index` loads its checkpoints at most this often (see `_follow_due`)
FOLLOW_COST = 10.0  # ... and at most once per this many times the last load's duration


class _VectorIndex:
    """The vector index of a `Library` (state set in `Library.__init__`)."""

    def vector_index_kind(self) -> str:
        """`exact`, `compact` or `auto`: what `index` will record, else what the library recorded,
        else the `vector_index` setting."""
        return self.vector_index or self.metadata.vector_index() or _check_vector_index(str(settings.get("vector_index")))

    @property
    def vectors(self) -> VectorStore:
        """The vector index, loaded from its file or rebuilt from the database when stale or of
        another kind than the library's (`vector_index_kind`)."""
        if self._vectors is None:
            with self._making:
                if self._vectors is not None:  # another thread opened it meanwhile
                    return self._vectors
                self._check_open()
                # A rebuilt index is saved unless another process's index run holds the lock: that run saves its own, and
                # two writers' index and sidecar files could interleave (a file that passes as current but is not).
                # Beside such a run, the file it saved as it went (`Indexer.checkpoint`) is brought up to date from the
                # change journal, or where the journal moved past it used as it is, behind the database (the search engine
                # makes up for it, see `index_behind`), rather than rebuilt.
                # An index or prune run (it holds the lock) opens an exact index lazily: it reads the vectors only if it
                # searches, and its save appends what it changed.
                writer = not self._locked and self._writer_running()
                started = time.monotonic()
                opened = self._open_vectors(save=not writer, lazy=self._locked, behind_from=self.metadata.embedder_since() if writer else None)
                done = time.monotonic()
                self._vectors, self._vectors_generation = opened.store, opened.generation
                self._vectors_file_generation = opened.generation if opened.file_generation is None else opened.file_generation
                self._vectors_loaded = (done, done - started)
                self._unsaved_index = opened.unsaved
        return self._vectors

    def _open_vectors(self, **options):
        """`open_vectors` of this library's index file, in its kind and memory budget (`options`: save, lazy, behind_from)."""
        budget = int(float(settings.get("vector_memory_gb")) * 2**30)
        return open_vectors(self.metadata, self.folder / VECTORS_FILENAME, kind=self.vector_index_kind(), memory_budget_bytes=budget,
                            distrust=self._distrusted_index, **options)

    def _follow_other_writers(self) -> None:
        """Pick up what another process (an `index` run beside a server) committed and saved since the
        vectors were loaded. While such a run is still going (its index file not yet saved at the
        database's generation) the loaded vectors keep serving, rather than rebuilding on every batch."""
        current, captions = self.metadata.generations()  # one database read per search
        self._seen_generation = current
        if self._engine is not None and captions != self._captions_generation:
            self._engine = None  # captions written since (after an `index` that captioned earlier photos)
        if self._vectors is None:
            return
        if current == self._vectors_generation or self._locked:  # or this library's own run: its store gets the changes
            return
        recorded = self.metadata.info().embedder
        if recorded is not None and not self._same_embedder(recorded):
            raise self._reembedded_elsewhere(recorded.model)
        path = self.folder / VECTORS_FILENAME
        saved = saved_generation(path) if sidecar_path(path).exists() else None
        if saved is None or saved == current or not self._writer_running():
            self._vectors, self._engine = None, None  # saved by that run, removed (a full disk's prune), or its run died
        elif self._vectors_generation is not None and self._vectors_generation != saved and self._follow_due():
            # reopened: that run's last save, brought up to date (see `vectors`). One served as it was (too far behind
            # to bring up to date) is reopened once the run saves again, not before: it would serve the same file.
            self._vectors, self._engine = None, None

    def _follow_due(self) -> bool:
        """Whether a newer checkpoint of another process's running `index` may be loaded now: FOLLOW_S after the
        last load, or FOLLOW_COST times its duration (an index that takes seconds to read is not read at every
        checkpoint; each load holds up the search that makes it)."""
        loaded_at, took = self._vectors_loaded
        return time.monotonic() - loaded_at >= max(FOLLOW_S, FOLLOW_COST * took)

    def _writer_running(self) -> bool:
        """Whether an `index` or `prune` holds the library's lock now (one killed, e.g. by SIGKILL, holds nothing)."""
        try:
            fd = os.open(self.folder / LOCK_FILENAME, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _reembedded_elsewhere(self, recorded: ModelRef) -> LibraryError:
        return LibraryError(
            f"library {self.folder} is being re-embedded with {recorded.describe()} by another process (or was), "
            f"so its vectors no longer match this process's model {self.model_name!r}; restart this process (the "
            "server) once that re-embedding run has finished"
        )

    def _remove_index_file(self) -> None:
        """Delete the vector index's files (damaged, or stale and unsavable): the next open rebuilds them."""
        for stale in files_of_index(self.folder / VECTORS_FILENAME):
            stale.unlink(missing_ok=True)

    def _drop_stale_vectors(self) -> None:
        """Forget loaded vectors that another process's changes made stale (they reopen on use)."""
        if self._vectors is not None and self._vectors_generation != self.metadata.vectors_generation():
            self._vectors = self._engine = None

    def _checkpoint_vectors(self, store: VectorStore) -> None:
        """An index run's save as it goes (`Indexer.checkpoint`) of `store`, the one the run changes, while it is the
        library's: after a save that found damaged rows the library drops its store, and one opened again would miss
        the run's later changes though saved at the database's generation (the save at the end rebuilds it instead)."""
        if self._vectors is store:
            self._save_vectors()

    def _save_vectors(self, *, compact: bool = False) -> None:
        """Save the vector index at the database's generation unless its file already holds that generation
        (a run that changed nothing neither reads nor writes the index; a stale file is opened and rebuilt).
        `compact` (prune): also a current one, rewritten without the rows of removed photos once they are a tenth."""
        with self._vectors_use:  # not while a search of another thread reads it
            path = self.folder / VECTORS_FILENAME
            generation = self.metadata.vectors_generation()
            saved = saved_generation(path)
            if saved == generation and (self._vectors is None or self._vectors_generation == generation):
                if not compact or getattr(self.vectors, "dead_share", 0.0) < PRUNE_DEAD_SHARE:
                    self.metadata.forget_vector_changes(generation)
                    return
            store = self.vectors  # opened before the run's changes, which it received: it matches the database
            self._vectors_generation = generation
            try:
                store.save(path, generation=generation, compact=compact)
            except CorruptIndexError:  # it read damaged rows from its file: leave the file stale, the next open rebuilds it
                self._vectors = self._engine = None
                return
            self._vectors_file_generation = generation
            self.metadata.forget_vector_changes(generation)  # the file holds them now

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One indexer per library at a time."""
        try:
            fd = os.open(self.folder / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LibraryError("cannot write to library {folder} ({reason}); make the folder writable or choose another library folder "
                               "({open})", folder=self.folder, reason=exc.strerror, open=OPEN_FOLDER) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:  # the run that holds it (maybe another thread's, with this library) keeps its state
            os.close(fd)
            raise LibraryError(f"library {self.folder} is being indexed or pruned by another process (or thread); wait for it to finish") from exc
        except BaseException:
            os.close(fd)
            raise
        try:
            self._locked = True
            remove_leftovers(self.folder / VECTORS_FILENAME)  # a save killed midway left one (index-sized files)
            yield
        finally:
            self._locked = False
            self._engine = None  # it read the caption vectors once: those the run wrote (new photos' captions) are read again
            if getattr(self._vectors, "opened_for_changes", False):  # it may count rows past the committed ones,
                self._vectors = None  # which the next holder of the lock overwrites: reopened on use
            os.close(fd)

    def _rebuilt_if_damaged(self, search, *, note: bool = True):
        """`search()`, once more after rebuilding the vector index from the database if its file turned out damaged
        (with a note on the result, unless `note` is False: a result that carries none)."""
        with self._vectors_use:  # this library's own index run (another thread) changes the index between
            try:
                return search()
            except CorruptIndexError as exc:
                path = self.folder / VECTORS_FILENAME
                # the file loaded, not a newer one (one brought up to date in memory beside a running index, or where it could
                # not be saved back, was read from a file of its own older generation)
                if saved_generation(path) == self._vectors_file_generation:
                    try:
                        self._remove_index_file()
                    except OSError:  # read-only media: rebuilt in memory instead, every time this process opens it
                        self._distrusted_index = f"damaged and not removable ({exc})"
                self._vectors = self._engine = None
            try:
                result = search()
            except CorruptIndexError:  # rebuilt from the database and still impossible: the stored vectors are bad
                raise LibraryError(f"library {self.folder}: the vectors stored in its database are damaged (not numbers, or scores "
                                   "impossible for unit vectors), so rebuilding the vector index from them did not help; move the library "
                                   "aside and index the photos into a new one") from None
            if not note:
                return result
            said = "the vector index was damaged (it gave scores impossible for unit vectors): rebuilt it from the database"
            return replace(result, notes=result.notes + (said,))
