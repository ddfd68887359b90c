"""A photo library on disk: the one object the CLI and HTTP edges talk to.

`Library.open` wires the collaborators (metadata store, vector store, encoder, captioner) in one place;
models load on first use, so `status` and `failures` never touch torch weights. What it does is spread over
mixins by reason to change: `vector_index` (the index file's life), `runs` (index and prune), `searching`."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from .. import settings
from ..errors import OPEN_FOLDER, REEMBED_WITH, InvalidInputError, LibraryError, ModelMismatchError, ModelNotFoundError
from ..models.loading import DEMO
from ..store import EmbedderInfo, MetadataStore, ModelRef, VectorStore, open_metadata
from ..store.engine import METADATA_FILENAME
from .options import (
    _canonical,
    _check_flags,
    _check_vector_index,
    _default_captioner,
    default_library_path,
    _model_name,
    NO_CAPTIONER,
    _not_a_url,
    _REEMBED_ARG,
)
from .reports import FailureRecord, LibraryStatus
from .runs import _Runs
from .searching import _Searching
from .vector_index import _VectorIndex


class Library(_Searching, _Runs, _VectorIndex):
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
            from ..models.policy import detect_placement

            detect_placement(device, dtype)
        if create and not (folder / METADATA_FILENAME).exists():
            # A new library: find its embedder first, so a bad --model leaves no empty library behind.
            from ..models.loading import resolve_model
            from ..models.policy import detect_placement

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
                from ..models.encoder import Blip2Encoder
                from ..models.policy import indexing_batch_size

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
                    from ..models.captioner import Blip2Captioner

                    self._captioner = Blip2Captioner.load(self.captioner_name, device=self.device, dtype=self.dtype, batch_size=self.encoder.batch_size)
        return self._captioner

    @property
    def vit_store(self):
        """The optional on-disk ViT token store (on when `index --store-vit` created it)."""
        from ..store.vit_tokens import VitTokenStore

        return VitTokenStore(self.folder)

    def _embedder_info(self) -> EmbedderInfo:
        enc = self.encoder
        return EmbedderInfo(ModelRef(enc.name, enc.revision), enc.num_query_tokens, enc.embed_dim)

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

    def failures(self) -> list[FailureRecord]:
        """Files that could not be indexed, with a one-line reason each, by path."""
        return [FailureRecord(f.path, f.error) for f in self.metadata.failures()]
