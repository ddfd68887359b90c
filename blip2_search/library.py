"""A photo library on disk: the one object the CLI and HTTP edges talk to.

`Library.open` wires the collaborators (metadata store, vector store, encoder, captioner) in one place;
models load on first use, so `status` and `failures` never touch torch weights.
"""

from __future__ import annotations

import fcntl
import numbers
import os
import re
import reprlib
import shlex
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from . import settings
from .errors import (OPEN_FOLDER, PRUNE_MISSING, REEMBED, REEMBED_WITH, STORE_VIT, CorruptIndexError, IndexInterrupted, InvalidInputError, LibraryError,
                     ModelMismatchError, ModelNotFoundError, Note, Spelled)
from .models.loading import DEMO
from .store import (
    STATUS_INDEXED,
    VECTORS_FILENAME,
    EmbedderInfo,
    ImageRecord,
    MetadataStore,
    ModelRef,
    VectorStore,
    open_metadata,
    open_vectors,
)
from .store.engine import METADATA_FILENAME
from .store.index_choice import VECTOR_INDEX_MODES
from .store.exact_files import PRUNE_DEAD_SHARE
from .store.index_files import files_of_index, remove_leftovers, saved_generation, sidecar_path

LOCK_FILENAME = "index.lock"
FOLLOW_S = 30.0  # a reader beside a running `index` loads its checkpoints at most this often (see `_follow_due`)
FOLLOW_COST = 10.0  # ... and at most once per this many times the last load's duration
SMALL_VIT_PARAMS = 100_000_000  # below this, rerunning the ViT per rerank candidate is cheap on a CPU

NO_CAPTIONER = "none"  # captioner= value that stops a library captioning (a checkpoint folder named so: ./none)


@dataclass(frozen=True)
class LibraryStatus:
    """`images`: files known to the library (not deleted) that are on disk now; `pending`: images that
    wait to be embedded with the library's model after a `--reembed` (not searchable yet); `vectors`:
    query vectors searchable (indexed images x Q); `vector_index`: the first stage's index the library asked
    for (`exact`, `compact` or `auto`; see `index --vector-index`)."""

    images: int
    indexed: int
    captioned: int
    failed: int
    deleted: int
    vectors: int
    model: str | None
    captioner: str | None
    vit_tokens_bytes: int = 0
    pending: int = 0
    vector_index: str | None = None


@dataclass(frozen=True)
class PruneReport:
    """What `Library.prune` removed: image records, stored embeddings (`vectors`: their query vectors,
    embeddings x Q, the unit of `LibraryStatus.vectors`), ViT token files, and the metadata file's size
    (with its WAL) before and after; `compacted`: whether the file was rewritten without its free space
    (SQLite does that only once 10% of it is free; PostgreSQL always vacuums)."""

    images: int
    embeddings: int
    vectors: int
    vit_files: int
    bytes_before: int
    bytes_after: int
    missing: int = 0  # photos marked deleted first because their files were not on disk (`missing=True`)
    notes: tuple[str, ...] = ()  # what the caller should know (the vector index could not be saved)
    compacted: bool = False


@dataclass(frozen=True)
class DuplicatePhoto:
    """A photo of a near-duplicate group: `score` is its best image-to-image score with another photo of the
    group (mean over one photo's query vectors of the best match among the other's, the higher direction)."""

    id: int
    path: str
    score: float
    record: ImageRecord


class DuplicateGroups(list):
    """`Library.duplicates`'s groups (a list of lists of DuplicatePhoto), with `notes`: what the groups alone do not
    say, e.g. photos not compared because they wait to be re-embedded."""

    def __init__(self, groups=(), notes: tuple[str, ...] = ()):
        super().__init__(groups)
        self.notes = notes


@dataclass(frozen=True)
class FailureRecord:
    """A file that could not be indexed, and why."""

    path: str
    error: str


_REEMBED_ARG = Spelled("reembed=True", "--reembed")


def default_library_path() -> Path:
    """`BLIP2_SEARCH_LIBRARY`, else `indexes/default` under the current directory."""
    return Path(_not_a_url(settings.get("library")))


def _without_password(url: str) -> str:
    """`url` with everything between :// and its last @ (user and password: a password may hold '/' or '@')
    shown as ***."""
    return re.sub(r"://.*@", "://***@", url, flags=re.DOTALL)


def _not_a_url(path):
    """`path`, unless it is a URL (`postgresql://...`): a library is a folder, and a URL taken as one would
    make a folder named after it (with its password). InvalidInputError, the password hidden."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        shown = _without_password(text)
        raise InvalidInputError(
            "library {shown} is a URL, but a library is a folder (its metadata in metadata.sqlite inside it); name a folder: "
            "{open} (metadata on a PostgreSQL server is tested at the store level only, not yet reachable from here)",
            shown=shown, open=OPEN_FOLDER,
        )
    return path


class Library:
    """Images, vectors and models of one photo collection. Create with `Library.open`."""

    def __init__(self, folder: Path, metadata: MetadataStore, *, model: str | None, captioner: str | None,
                 device: str = "auto", dtype: str = "auto", batch_size: int = 0, workers: int = 0, reembed: bool = False,
                 vector_index: str | None = None, embedder_source=None):
        self.folder = folder
        self.vector_index = _check_vector_index(vector_index)
        self.reembed = reembed
        self.metadata = metadata
        self.model_name = model
        self.captioner_name = captioner
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.workers = workers
        self._embedder_source = embedder_source  # the `ModelSource` `open` resolved for a new library, reused
        self._encoder = None
        self._captioner = None
        self._vectors: VectorStore | None = None
        self._vectors_generation: int | None = None
        self._vectors_file_generation: int | None = None  # the saved file's generation the vectors were read from (see `_rebuilt_if_damaged`)
        self._seen_generation = 0  # the database's vectors generation at the last search (`_follow_other_writers`)
        self._vectors_loaded = (0.0, 0.0)  # when the vector index was last opened (time.monotonic()) and how long that took
        self._engine = None
        self._captions_generation: int | None = None
        self._unsaved_index: str | None = None  # why the rebuilt vector index is in memory only
        self._unadopted_revision: str | None = None  # the files' new fingerprint when it could not be recorded
        self._distrusted_index: str | None = None  # why the index file must be rebuilt though current (damaged, unremovable)
        self._forget_captioner = False  # opened with captioner="none": the next index run clears the record
        self._model_pending = False  # no model named and none recorded when opened: read the record at first use
        self._model_recorded = False  # the model is the one the library recorded, not one the caller named
        self._locked = False  # this process holds the library lock (an index or prune of its own runs)
        self._making = threading.RLock()  # held while a collaborator is made: threads asking at once share one (models are GBs)
        # held by a search while it reads the vector index, and by this library's own index run while it changes or saves
        # it (another thread's search): FAISS's storage moves under a reader as vectors are added
        self._vectors_use = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None = None,
        *,
        model: str | None = None,
        captioner: str | bool | None = None,
        create: bool = False,
        reembed: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        vector_index: str | None = None,
    ) -> "Library":
        """Open (or with `create`, make) the library at `path` (default: `default_library_path()`).

        `model`: the embedder; None means the one the library was built with (or the default for a new one).
        A different model than recorded raises ModelMismatchError unless `reembed`.
        `vector_index`: `exact`, `compact` or `auto`, recorded by the next `index` run; None keeps
        the library's (new libraries: the `vector_index` setting, `auto`).
        `captioner`: a checkpoint name, False for no captions in this run, `"none"` for no captions from the
        next `index` on (it forgets the library's captioner; captions already written stay), None for the
        library's own (new libraries: the demo captioner with `model="demo"`, else the BLIP-2 OPT-2.7B checkpoint).
        """
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"library path {path!r} ({type(path).__name__}) is not a path; pass a folder as str or Path")
        folder = Path(_not_a_url(path)) if path is not None else default_library_path()
        _check_flags(create=create, reembed=reembed)
        model = _model_name(model, "model")
        captioner = captioner if captioner is False else _model_name(captioner, "captioner")
        forget_captioner = captioner == NO_CAPTIONER
        if forget_captioner:
            captioner = False
        folder = folder.expanduser().absolute()
        if folder.exists() and not folder.is_dir():
            raise LibraryError("library path {folder} is a file, not a folder; name a folder: {open}", folder=folder, open=OPEN_FOLDER)
        if folder.is_symlink() and not folder.exists():  # not "no library here", nor a new library made in its place
            raise LibraryError("library folder {folder} is a link to {target}, which does not exist (a drive unplugged?); reconnect "
                               "it, fix the link, or name another folder: {open}", folder=folder, target=os.readlink(folder), open=OPEN_FOLDER)
        # settings, given or from the environment, are checked before anything is made
        batch_size = settings.given("batch_size", batch_size) or int(settings.get("batch_size"))
        workers = int(settings.given("workers", workers))
        settings.get("vector_memory_gb")
        _check_vector_index(vector_index)
        source = None
        if device != "auto" or dtype != "auto":  # a --device or --dtype this machine cannot do: said now, not at the first search
            from .models.policy import detect_placement

            detect_placement(device, dtype)
        if create and not (folder / METADATA_FILENAME).exists():
            # A new library: find its embedder first, so a bad --model leaves no empty library behind.
            from .models.loading import resolve_model
            from .models.policy import detect_placement

            if vector_index is None:  # the kind its first run records: a bad BLIP2_SEARCH_VECTOR_INDEX refused now
                _check_vector_index(str(settings.get("vector_index")))
            source = resolve_model(_canonical(model) if model else str(settings.get("model")), role="embedder")
            if captioner is not False:  # and its captioner, named or the default (Flan-T5 refuses float16)
                cap_source = resolve_model(_canonical(str(captioner)) if captioner else _default_captioner(source.name), role="captioner")
                detect_placement(device, dtype, is_t5=(cap_source.config().get("text_config") or {}).get("model_type") == "t5")
        if path is None and not create and not (folder / METADATA_FILENAME).exists():  # the default is under the current folder
            if os.environ.get("BLIP2_SEARCH_LIBRARY"):
                raise LibraryError("no library at {folder} (named by $BLIP2_SEARCH_LIBRARY); check that variable, name the library's "
                                   "folder ({open}), or index photos first", folder=folder, open=OPEN_FOLDER)
            raise LibraryError("no library at {folder} (the default library is indexes/default under the current folder); work from "
                               "the folder you indexed from, name the library's folder ({open}, or set BLIP2_SEARCH_LIBRARY), or index "
                               "photos first", folder=folder, open=OPEN_FOLDER)
        metadata = open_metadata(folder, create=create)
        info = metadata.info()
        recorded = info.embedder.model.model_id if info.embedder else None
        name = _canonical(model) if model else (recorded or str(settings.get("model")))
        if recorded and name != recorded and not reembed:
            metadata.close()
            raise ModelMismatchError(
                "library {folder} was built with model {recorded!r}, not {name!r}; omit {argument} to use the library's, "
                "or pass {reembed} to re-embed every image with {name!r}",
                argument="model", folder=folder, recorded=recorded, name=name, reembed=_REEMBED_ARG,
            )
        if captioner is False:
            cap = None
        elif captioner:
            cap = _canonical(str(captioner))
        elif info.embedder is not None:
            cap = info.captioner.model_id if info.captioner else None
        else:
            cap = _default_captioner(name)
        library = cls(folder, metadata, model=name, captioner=cap, device=device, dtype=dtype, reembed=reembed, vector_index=vector_index,
                      embedder_source=source if source is not None and source.name == name else None,
                      batch_size=batch_size, workers=workers)
        library._forget_captioner = forget_captioner
        library._model_pending = not model and recorded is None  # another process's first `index` may record one
        library._model_recorded = not model and recorded is not None
        return library

    def close(self) -> None:
        """Release the database, and the models and vector index loaded (GBs for BLIP-2), also while the
        caller still holds the library (a notebook's variable); a closed library cannot be used again."""
        self._closed = True
        self.metadata.close()
        with self._making:  # one that another thread is making now is let go too, once made
            self._engine = self._vectors = self._encoder = self._captioner = None

    def _check_open(self) -> None:
        """Called before a collaborator is made: after `close` it would be loaded again and kept (GBs)."""
        if self._closed:
            raise LibraryError(f"library {self.folder} was closed; open it again (Library.open) to use it")

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ collaborators (lazy)
    @property
    def encoder(self):
        """The embedder / ITM model, loaded on first use."""
        if self._encoder is None:
            with self._making:
                if self._encoder is not None:  # another thread made it meanwhile
                    return self._encoder
                self._check_open()
                from .models.encoder import Blip2Encoder
                from .models.policy import indexing_batch_size

                if self._model_pending:  # a library whose first index run (another process) has recorded its model since
                    recorded = self.metadata.info().embedder
                    if recorded is not None and recorded.model.model_id != self.model_name:
                        self.model_name, self._embedder_source = recorded.model.model_id, None
                        self._model_recorded = True

                try:
                    encoder = Blip2Encoder.load(self._embedder_source or self.model_name, device=self.device, dtype=self.dtype)
                except ModelNotFoundError as exc:
                    if not self._model_recorded or self.model_name == DEMO:
                        raise  # a model the caller named: its message names the option that names it (the demo's: reinstall)
                    # The library's own model is gone (a folder moved, a hub id not cached offline): `search` and `serve`
                    # take no --model, so the fix is to bring it back or to re-embed with another one.
                    reason = str(exc).split("; ", 1)[0]
                    back = ("put the folder back at that path" if os.path.isabs(self.model_name) else
                            f"download it once with `hf download {self.model_name}` into the HF cache")
                    raise ModelNotFoundError("{reason}; library {folder} was indexed with it: {back}, or re-embed the library with "
                                             "another model ({reembed})", reason=reason, folder=self.folder, back=back,
                                             reembed=REEMBED_WITH) from None
                encoder.batch_size = indexing_batch_size(self.batch_size, encoder.device.type, captions=bool(self.captioner_name))
                self._adopt_fingerprint(encoder)
                self._encoder = encoder
        return self._encoder

    def _same_embedder(self, recorded: EmbedderInfo) -> bool:
        """Whether the library's recorded embedder is this process's: equal, or the same files under the fingerprint
        this process could not record itself (another process adopted it since)."""
        mine = self._embedder_info()
        return recorded == mine or (replace(recorded, model=replace(recorded.model, revision=mine.model.revision)) == mine
                                    and recorded.model.revision == self._unadopted_revision)

    def _adopt_fingerprint(self, encoder) -> None:
        """A library that recorded its local model's revision with an older fingerprint (`ModelSource.older_revisions`:
        without the processor and tokenizer files, or only the first and last MiB of each weights file) records the
        current one when the files still give the older one (the same files, as far as that one could tell). Where
        the library cannot be written, the older one is compared instead."""
        older = encoder.source.older_revisions
        recorded = self.metadata.info().embedder if older else None
        if (recorded is None or recorded.model.model_id != encoder.name or recorded.model.revision == encoder.revision
                or recorded.model.revision not in older):
            return
        try:
            self.metadata.adopt_embedder_revision(recorded, encoder.revision)
        except (LibraryError, SQLAlchemyError):  # read-only (or busy): compare what was recorded
            self._unadopted_revision = encoder.revision
            encoder.source = replace(encoder.source, revision=recorded.model.revision)

    @property
    def captioner(self):
        """The caption model, or None when captions are off; loaded on first use."""
        if self._captioner is None and self.captioner_name:
            with self._making:
                if self._captioner is None:
                    self._check_open()
                    from .models.captioner import Blip2Captioner

                    self._captioner = Blip2Captioner.load(self.captioner_name, device=self.device, dtype=self.dtype, batch_size=self.encoder.batch_size)
        return self._captioner

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

    @property
    def vit_store(self):
        """The optional on-disk ViT token store (on when `index --store-vit` created it)."""
        from .store.vit_tokens import VitTokenStore

        return VitTokenStore(self.folder)

    def _vit_source(self, rerank_source: str):
        from .search.rerank import RecomputeVit, StoredVit

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

    def _embedder_info(self) -> EmbedderInfo:
        enc = self.encoder
        return EmbedderInfo(ModelRef(enc.name, enc.revision), enc.num_query_tokens, enc.embed_dim)

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
        from .indexing.pipeline import Indexer
        from .indexing.scan import check_roots

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

    # ------------------------------------------------------------------ searching
    @property
    def engine(self):
        """The search engine over this library (text-only queries load no ViT); it follows changes that
        another process committed (see `_follow_other_writers`)."""
        self._follow_other_writers()
        engine = self._engine  # read once: another thread's `_follow_other_writers` may drop it meanwhile
        if engine is None:
            from .search.engine import SearchEngine

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
        from .search.query import parse_query
        from .search.results import check_k, make_filters

        k = check_k(k)
        q = parse_query(query)
        filters = make_filters(path, after, before, min_score)
        _check_flags(rerank=rerank, fusion=fusion)
        _check_rerank_source(rerank_source)
        return self._rebuilt_if_damaged(lambda: self._search(q, k, rerank, rerank_k, filters, sort, fusion, rerank_source, path))

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

    def _search(self, q, k, rerank, rerank_k, filters, sort, fusion, rerank_source, path):
        from .search.results import check_k

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

        from .images import model_image, upright_rgb
        from .search.results import check_k, make_filters

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
        from .search.results import outcome_notes

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
        from .search.query import parse_query
        from .search.results import Hit, SearchResult

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
        from .search.results import Hit

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
        from .errors import InvalidInputError

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
        from .search.engine import SearchEngine

        return SearchEngine(self.metadata, self._open_vectors(save=False).store, self.encoder)

    # ------------------------------------------------------------------ reading
    def status(self) -> LibraryStatus:
        """Counts of images by state, and the models on record."""
        info = self.metadata.info()
        counts = self.metadata.counts()
        on_disk = sum(1 for _, p in self.metadata.live_paths() if os.path.lexists(p))
        q = info.embedder.num_query_tokens if info.embedder else 0
        return LibraryStatus(
            images=on_disk, indexed=counts.indexed, captioned=counts.captioned, failed=counts.failed,
            deleted=counts.deleted, vectors=counts.indexed * q,
            model=info.embedder.model.model_id if info.embedder else None,
            captioner=info.captioner.model_id if info.captioner else None,
            vit_tokens_bytes=self.vit_store.size_bytes(), pending=counts.pending, vector_index=self.metadata.vector_index(),
        )

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

    def _metadata_bytes(self) -> int:
        files = (self.folder / METADATA_FILENAME, self.folder / f"{METADATA_FILENAME}-wal")
        return sum(f.stat().st_size for f in files if f.exists())

    def failures(self) -> list[FailureRecord]:
        """Files that could not be indexed, with a one-line reason each, by path."""
        return [FailureRecord(f.path, f.error) for f in self.metadata.failures()]


NOT_COMPACTED = "the deleted photos were forgotten, but the metadata could not be compacted"
"""How a prune's note starts when its compaction failed (the CLI's summary then leaves out why it did not compact)."""


def _check_vector_index(kind: str | None) -> str | None:
    if kind is not None and kind not in VECTOR_INDEX_MODES:
        raise InvalidInputError("vector index {given} is not one of {modes}; pass {argument:'exact'}, {argument:'compact'} or "
                                "{argument:'auto'} (or fix BLIP2_SEARCH_VECTOR_INDEX)", argument="vector_index", given=repr(kind),
                                modes=", ".join(VECTOR_INDEX_MODES))
    return kind


def _check_sort(sort: str) -> str:
    from .errors import InvalidInputError

    if sort not in ("score", "date"):
        raise InvalidInputError("sort {given} is not 'score' or 'date'; pass {argument:'score'} or {argument:'date'}", argument="sort",
                                given=repr(sort))
    return sort


THUMBS_DIRNAME = "thumbs"  # the server's thumbnail cache inside the library folder (server/photos.py)


def _model_name(name, what: str) -> str | None:
    """`name` as text (a Path too); InvalidInputError for anything that cannot name a checkpoint."""
    if name is not None and (not isinstance(name, (str, os.PathLike)) or not os.fspath(name)):
        raise InvalidInputError(f"{what} {name!r} is not a checkpoint name; pass a hub id, a local folder or 'demo'")
    return None if name is None else os.fspath(name)


def _default_captioner(model: str) -> str:
    """A new library's captioner when none is named: the demo one for the demo embedder, else the setting."""
    return DEMO if model == DEMO else str(settings.get("captioner"))


def _canonical(name: str) -> str:
    """Local directories are recorded as absolute paths; hub ids and "demo" as given."""
    if name == DEMO:
        return name
    p = Path(name).expanduser()
    return str(p.absolute()) if p.exists() else name


__all__ = ["DuplicateGroups", "DuplicatePhoto", "FailureRecord", "Library", "LibraryStatus", "PruneReport", "default_library_path"]


def _missing_folders(missing) -> tuple[str, ...] | None:
    """`prune`'s `missing`: None for everywhere (True), else the absolute folders (each ending in a separator)
    under which photos not on disk are forgotten; InvalidInputError for anything else."""
    if missing is True or missing is False:
        return None
    folders = [missing] if isinstance(missing, (str, os.PathLike)) else missing
    if not isinstance(folders, (list, tuple)) or not folders or not all(isinstance(f, (str, os.PathLike)) and os.fspath(f) for f in folders):
        raise InvalidInputError(f"missing={reprlib.repr(missing)} is not True or a folder; pass True to forget every photo not on "
                                "disk, or the folder (or list of folders) of a drive gone for good")
    return tuple(os.path.join(os.path.abspath(os.path.expanduser(os.fspath(f))), "") for f in folders)


def _left_out_note(pending: int, cannot: str) -> str:
    """The note on a search or duplicates answer that `pending` photos, waiting to be re-embedded, are left out:
    they cannot be `cannot` ("found yet")."""
    return (f"{pending} photo{_s(pending)} of the library wait{'s' if pending == 1 else ''} to be embedded with its model and cannot be "
            f"{cannot} (a re-embedding run is going on, was stopped, or did not find their files); run index on their folders")


def _s(n: int) -> str:
    """The plural ending for `n` things."""
    return "" if n == 1 else "s"


def _check_rerank_source(source) -> None:
    if source not in ("auto", "stored", "recompute"):
        raise InvalidInputError(f"rerank source {source!r} is not auto, stored or recompute; pass one of those")


def _check_flags(**flags) -> None:
    """Yes/no arguments must be bools (or 0/1): a string such as "no" would read as True."""
    for name, value in flags.items():
        if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1))):
            raise InvalidInputError(f"{name}={value!r} is a {type(value).__name__}; pass True or False")


def _is_number(value) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
