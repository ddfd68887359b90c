"""Index photo folders into a library: scan -> read/decode (worker threads) -> embed (batched) -> write.

Decoding runs in a pool of threads (Pillow and hashlib release the GIL) a batch ahead of the main thread,
which runs the models, so the model is not left waiting. On a GPU the threads decode while the models
compute; on the CPU they pause during each forward (see `decode_during_forward`). Every batch is
committed in one transaction before the vector index sees it, so a kill at any point loses nothing
committed; the vector index is saved at the end when the run changed anything (a run that changes nothing
never reads it) and every minute or so as it goes (`checkpoint`: servers beside the run follow it), and rebuilt
from the database when a crash left it behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from contextlib import AbstractContextManager, closing, contextmanager, nullcontext
from itertools import islice
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from ..errors import PRUNE_MISSING, LibraryError, Note
from ..models.captioner import Blip2Captioner
from ..models.encoder import Blip2Encoder
from ..store import CaptionUpdate, FailedFile, IndexedImage, MetadataStore, VectorStore
from ..store.records import STATUS_DELETED, STATUS_FAILED, STATUS_INDEXED, STATUS_PENDING, KnownFile
from ..models.sharing import share_vit
from .embed import HostCopy, QueuedBatch, embed_batch, embed_captions
from .read import ReadResult, header_info, read_and_decode
from .scan import (ChangePlan, FoundFile, closest_root, empty_roots, no_images_note, plan_changes, scan, stat_files,
                   unreadable_folder_note)


def decode_during_forward(devices: Iterable[str]) -> bool:
    """Whether decode threads may run while the models compute on `devices` (torch device types).

    On a GPU, yes: the CPU is free meanwhile. On the CPU, no: torch's threads already use every core, and
    a decode thread that takes a core from one of them can hold up the whole forward at its next barrier.
    In bench/pipeline.py the forward inside `Library.index` took about the decode's whole time longer per
    image than alone (913 vs 851 ms with a 65 ms decode; 204 vs 181 ms with 24 ms), where sharing the two
    cores fairly would cost half of it; decoding between forwards, on every core, costs that half.
    """
    return all(d != "cpu" for d in devices)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise it: a commit and what must follow it (the
    vector index, the counts) happen together or not at all. Only the main thread receives signals, so
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # None: a handler installed outside Python, which could not be put back
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


@dataclass(frozen=True)
class IndexReport:
    """Counts of one run. `reused`: files whose content was already embedded (moves, renames,
    duplicates); `deleted`: photos gone from disk this run (failure records of files gone, or of a folder
    readable again, are dropped without counting)."""

    scanned: int
    indexed: int
    unchanged: int
    reused: int
    failed: int
    deleted: int
    seconds: float
    interrupted: bool = False
    notes: tuple[str, ...] = ()  # what the caller should know, e.g. an option that had nothing to do


@dataclass(frozen=True)
class Progress:
    """Where a run is: `done` of `total` files needing work. `stage`: `index` (the files found), `vit` (photos
    indexed before --store-vit, their tokens stored after the run; `indexed` counts those stored, `failed`
    those unreadable), or `caption` (photos indexed without captions; `indexed` counts those captioned)."""

    done: int
    total: int
    indexed: int
    reused: int
    failed: int
    stage: str = "index"


@dataclass
class _Counts:
    indexed: int = 0
    reused: int = 0
    failed: int = 0
    done: int = 0


_DETAILS = ("width", "height", "taken_at", "camera_make", "camera_model")


def _details(source) -> dict:
    """What a photo's record says of it (upright size, date, camera), from an `ImageInfo` or a record of the
    same content; all None for None."""
    return {name: getattr(source, name, None) for name in _DETAILS}


CHECKPOINT_S = 60.0
"""How often a long run saves the vector index as it goes (at least; a save that takes long spaces them out, see
`Indexer.checkpoint`): a server beside the run finds the photos embedded so far within about that time, and a
run killed outright leaves an index file that far behind instead of one from before the run."""

CHECKPOINT_COST = 20.0
"""A checkpoint waits at least this many times the last one's duration (a compact index at 1M images is
rewritten whole: ~1.3 GB), so saving costs a run at most ~5% of its time."""

CAPTIONS_SIGNAL_S = 300.0
"""How often a long caption backfill tells servers to reload the caption vectors (each reload reads them all)."""


@dataclass
class CaptionCounts:
    """Where the caption backfill is, in photos (records)."""

    total: int = 0
    captioned: int = 0
    unreadable: int = 0
    done: int = 0
    signalled: float = field(default_factory=time.monotonic)  # when servers were last told to reload


class Indexer:
    """Runs the stages for one library; collaborators are passed in."""

    def __init__(
        self,
        metadata: MetadataStore,
        vectors: Callable[[], VectorStore],
        encoder: Blip2Encoder,
        captioner: Blip2Captioner | None,
        *,
        batch_size: int = 32,
        workers: int = 0,
        fast_decode: bool = True,
        skip: Iterable[str] = (),
        vit_store=None,
        queue_ahead: bool | None = None,
        rehash: bool = False,
        checkpoint: Callable[[VectorStore], None] | None = None,
        vectors_lock: AbstractContextManager | None = None,
    ):
        self.metadata = metadata
        # held while this run changes the vector index: searches of the same library in other threads hold it too
        self._vectors_lock = vectors_lock if vectors_lock is not None else nullcontext()
        self._checkpoint = checkpoint  # saves this run's vector store at the database's generation (see `checkpoint`)
        self._next_checkpoint = time.monotonic() + CHECKPOINT_S
        self._open_vectors = vectors  # opened on first change: a run that changes nothing never reads the index
        self._vectors: VectorStore | None = None
        self.encoder = encoder
        self.captioner = captioner
        self.batch_size = max(1, batch_size)
        self.workers = workers or max(1, os.cpu_count() or 1)
        self.fast_decode = fast_decode
        self.skip = tuple(skip)
        self.rehash = rehash  # read and hash every file, not only those whose size or mtime changed
        self.vit_store = vit_store if vit_store is not None and vit_store.enabled else None
        self._shared_vit: bool | None = None
        self._queued: tuple[list[ReadResult], QueuedBatch] | None = None  # embedded, not yet committed
        self._store_failed = False
        self._found: set[str] = set()  # paths found by this run's scan
        self._found_by_name: dict[str, list[str]] | None = None
        self._roots: list[str] = []  # the folders this run indexes
        self._live_ids: dict[int, str | None] = {}  # images searchable when this run started: their content hash
        self._known: Mapping[str, KnownFile] = {}  # what the library knew when this run started, by path
        self._gone_by_hash: dict[str, list[int]] = {}  # live records whose files this run found gone, by content
        self._moved: set[int] = set()  # records this run moved to a new path
        self._vanished: list[str] = []  # files found by the scan but gone when read (deleted or moved meanwhile)
        self._aliases: set[str] = set()  # other names (ending in a separator) of this run's folders, seen to resolve to them
        devices = [encoder.device.type] + ([captioner.device.type] if captioner is not None else [])
        self.decode_during_forward = decode_during_forward(devices)
        # Keep one embedded batch queued while the last is written: on a GPU (see `_write_batch`), or when asked.
        self.queue_ahead = self.decode_during_forward if queue_ahead is None else queue_ahead
        self._not_in_forward = threading.Event()  # cleared while a forward runs, when decoding must wait
        self._not_in_forward.set()
        self.caption_counts = CaptionCounts()  # of the last `fill_captions`

    @property
    def vectors(self) -> VectorStore:
        """The library's vector index, opened on first use."""
        if self._vectors is None:
            self._vectors = self._open_vectors()
        return self._vectors

    def run(self, roots: list[str], progress: Callable[[Progress], None] | None = None) -> IndexReport:
        """Index `roots` (absolute folders). Ctrl-C stops after committing nothing partial; see `interrupted`."""
        start = time.perf_counter()
        self._next_checkpoint = time.monotonic() + CHECKPOINT_S
        known = self.metadata.known_files()
        self._live_ids = {k.id: k.content_hash for k in known.values() if k.status == "indexed"}
        found = list(scan(roots, skip=self.skip))
        empty = empty_roots(roots, found)
        found += self._waiting_elsewhere(known, roots, {f.path for f in found})
        self._found, self._found_by_name = {f.path for f in found}, None
        self._roots = list(roots)
        plan = plan_changes(found, known, roots, rehash=self.rehash)
        unreachable = self._behind_dangling_links(plan.gone, roots)
        if unreachable:
            plan = replace(plan, gone=tuple(p for p in plan.gone if p not in unreachable))
        counts = _Counts()
        was_live = [known[f.path].id for f in plan.unreadable if f.path in known and known[f.path].id in self._live_ids]
        if plan.work or plan.gone or was_live:
            _ = self.vectors  # opened before the database changes, while its file still matches the database
        gone_by_hash: dict[str, list[int]] = {}
        for p in plan.gone:
            if known[p].content_hash and known[p].status in ("indexed", "pending"):
                gone_by_hash.setdefault(known[p].content_hash, []).append(known[p].id)
        moved: set[int] = set()
        self._moved, self._aliases, self._vanished = moved, set(), []
        interrupted = False
        try:
            if plan.unreadable:
                with _interrupts_deferred():
                    self.metadata.mark_failed([FailedFile(f.path, f.error or "unreadable") for f in plan.unreadable])
                    if was_live:
                        with self._vectors_lock:
                            self.vectors.remove(np.array(was_live, dtype=np.int64))
                    counts.failed += len(plan.unreadable)
            if plan.work:  # else nothing to read: the models (their processors' imports cost seconds) stay unloaded
                self._process(plan, known, gone_by_hash, moved, counts, progress)
        except KeyboardInterrupt:
            interrupted = True
        deleted = 0
        if not interrupted:
            try:
                aliased = self._gone_under_other_names(known)
                if aliased:
                    _ = self.vectors  # opened before the database changes (a run with nothing else to do has not yet)
                gone_ids = [known[p].id for p in plan.gone if known[p].id not in moved] + aliased + self._vanished_ids(known)
                twins = self._failed_twins(known, roots)
                with _interrupts_deferred():
                    deleted = self.metadata.mark_deleted(gone_ids)
                    if gone_ids:
                        with self._vectors_lock:
                            self.vectors.remove(np.array(gone_ids, dtype=np.int64))
                    self.metadata.mark_deleted(twins)  # retired failures (removed; one indexed before keeps its vectors): nothing was searchable
            except KeyboardInterrupt:  # held until the deletions were complete
                interrupted = True
        notes = tuple(no_images_note(r) for r in empty) + tuple(unreadable_folder_note(f) for f in plan.unreadable if f.folder)
        if unreachable:
            links = sorted(unreachable.values())
            notes += (Note("{n} photo{s} under {link!r}{others}, a link to a folder that is missing (a drive unplugged?), kept as they "
                           "were; reconnect it and index again, or `{prune}` if it is gone for good", n=len(unreachable),
                           s="" if len(unreachable) == 1 else "s", link=links[0], prune=PRUNE_MISSING,
                           others=f" and {len(set(links)) - 1} other links" if len(set(links)) > 1 else ""),)
        return IndexReport(len(found), counts.indexed, len(plan.unchanged), counts.reused, counts.failed, deleted,
                           round(time.perf_counter() - start, 3), interrupted, notes)

    @staticmethod
    def _behind_dangling_links(gone: tuple[str, ...], roots: list[str]) -> dict[str, str]:
        """Of the paths `gone` (not found under `roots`), those below a symlink inside a root whose target is
        missing (a folder linked from a drive that is unplugged, or a share not mounted): unreachable, not
        deleted, like the photos of a folder that cannot be read. Path -> the link. One lstat per folder."""
        prefixes = tuple(r.rstrip(os.sep) + os.sep for r in roots)
        dangling: dict[str, bool] = {}
        out = {}
        for path in gone:
            root = closest_root(path, prefixes)
            folder = root.rstrip(os.sep)
            for part in path[len(root):].split(os.sep)[:-1]:
                folder = folder + os.sep + part
                if folder not in dangling:
                    dangling[folder] = os.path.islink(folder) and not os.path.exists(folder)
                if dangling[folder]:
                    out[path] = folder
                    break
        return out

    def _gone_under_other_names(self, known: Mapping[str, KnownFile]) -> list[int]:
        """Records under another name of one of this run's folders (a symlinked alias of it, either way round,
        seen when a photo found here was recorded there) whose file is gone: deleted like those found gone
        under the folder's own name. Only a missing file counts (not one behind a folder that cannot be read),
        and only under a name that resolves to the folder now: an absent folder (an unplugged drive, a folder
        renamed) is never taken for one, as a copy of its photo found here cannot tell those apart."""
        if not self._aliases:
            return []
        aliases = tuple(self._aliases)
        gone = []
        for path, k in known.items():
            if path.startswith(aliases) and k.status != STATUS_DELETED and k.id not in self._moved and path not in self._found:
                try:
                    os.lstat(path)
                except (FileNotFoundError, NotADirectoryError):
                    gone.append(k.id)
                except OSError:  # unreadable (a folder without permission): its photo is kept as it was
                    pass
        return gone

    def _vanished_ids(self, known: Mapping[str, KnownFile]) -> list[int]:
        """Records of the files deleted (or moved) between this run's scan and their read: gone like those the scan
        did not find. Not where the file's folder went too (a drive unplugged meanwhile, as for a missing folder
        at the start of a run): those are left as they were, for the next run to see."""
        ids = []
        for path in self._vanished:
            k = known.get(path)
            if k is not None and k.status != STATUS_DELETED and k.id not in self._moved and os.path.isdir(os.path.dirname(path)):
                ids.append(k.id)
        return ids

    def _failed_twins(self, known: Mapping[str, KnownFile], roots: list[str]) -> list[int]:
        """Failure records of files this run found under another name of one of its folders (a symlinked
        alias of it, or the folder itself after an alias): the failure now lives under the found name.
        The same test as a move (`_elsewhere`: same relative path under another name of the root), so a
        link inside an album to a broken photo elsewhere is a copy and leaves that failure alone.
        A file-name check comes first: no disk access for failures of files this run did not see."""
        prefixes = tuple(r.rstrip(os.sep) + os.sep for r in roots)
        failed = [(p, k.id) for p, k in known.items()  # not one this run took as a photo's move (it keeps the photo's content)
                  if k.status == "failed" and p not in self._found and not p.startswith(prefixes) and k.id not in self._moved]
        if not failed:
            return []
        twins = []
        for path, image_id in failed:
            for found in self._found_named(os.path.basename(path)):
                if self._same_file_under_another_root_name(path, found):
                    twins.append(image_id)
                    break
        return twins

    def _found_named(self, name: str) -> list[str]:
        """Paths found by this run whose file name is `name` (an index built on first use)."""
        if self._found_by_name is None:
            self._found_by_name = {}
            for f in self._found:
                self._found_by_name.setdefault(os.path.basename(f), []).append(f)
        return self._found_by_name.get(name, [])

    @staticmethod
    def _waiting_elsewhere(known: Mapping[str, KnownFile], roots: list[str], seen: set[str]) -> list[FoundFile]:
        """Photos outside `roots` that wait to be embedded (pending: a `--reembed` changed the model) and are
        on disk: a re-embed covers the whole library, not only the folders named. A file that is one
        of `roots` under another name is left to the scan (it moves its record)."""
        waiting = [p for p, k in known.items() if k.status == STATUS_PENDING and p not in seen]
        if not waiting:
            return []
        real_roots = tuple(os.path.realpath(r).rstrip(os.sep) + os.sep for r in roots)
        elsewhere = [p for p in waiting if not os.path.realpath(p).startswith(real_roots)]
        return [f for f in stat_files(elsewhere) if f.error is None]

    def fill_vit_tokens(self, progress: Callable[[Progress], None] | None = None) -> int:
        """Store the ViT tokens of indexed photos that have none (indexed before `--store-vit`) or whose file is
        damaged: one ViT pass each, their vectors and captions untouched. A file changed since it was indexed is left to
        the next run. Returns how many were stored; Ctrl-C keeps those already written."""
        if self.vit_store is None:
            return 0
        todo: dict[str, FoundFile] = {}
        stored = self.vit_store.intact_hashes()  # a damaged file is stored again
        for path, k in self.metadata.known_files().items():
            if k.status == STATUS_INDEXED and k.content_hash and k.content_hash not in stored and k.content_hash not in todo:
                todo[k.content_hash] = FoundFile(path, k.size, k.mtime_ns)
        model_input, done, seen, batch = self.encoder.image_input, 0, 0, []
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool, \
                closing(self._read_ahead(pool, list(todo.values()), (model_input,), ())) as results:
            expected = iter(todo)
            for result in results:
                seen += 1
                if result.error is None and result.content_hash == next(expected):
                    batch.append(result)
                if len(batch) >= self.batch_size or seen == len(todo):
                    done += self._put_vit_tokens(batch) if batch else 0
                    batch = []
                    if progress:
                        progress(Progress(seen, len(todo), done, 0, seen - done, stage="vit"))
        return done

    def fill_captions(self, progress: Callable[[Progress], None] | None = None) -> tuple[int, int]:
        """Caption indexed photos that have no caption (indexed with captions off): decode each at the
        captioner's size, caption it, embed the caption, store both; vectors untouched. One photo per
        content (a caption applies to every copy), read from whichever of its records' files reads. A photo
        none of whose files reads as indexed (changed or missing since) is left uncaptioned. Returns
        `(captioned, unreadable)` in photos, also kept in `caption_counts` (read it after Ctrl-C, which
        keeps the batches already written). Long-lived readers (a server) are told to reload the caption
        vectors at the end and every CAPTIONS_SIGNAL_S seconds (a killed run leaves them at most that stale)."""
        if self.captioner is None:
            return 0, 0
        page = max(1024, self.batch_size)
        records = self.metadata.uncaptioned(limit=page)
        if not records:  # the usual case: nothing to count
            return 0, 0
        status = self.metadata.counts()
        counts = self.caption_counts = CaptionCounts(total=status.indexed - status.captioned)
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
                while records:
                    self._caption_page(pool, records, counts, progress)
                    records = self.metadata.uncaptioned(limit=page, after=records[-1].id)
        finally:
            if counts.captioned:
                self.metadata.captions_changed()
        return counts.captioned, counts.unreadable

    def fill_caption_vectors(self) -> int:
        """Embed the captions of indexed photos that have a caption but no caption vector (a re-embed with
        captions off reset the vectors and wrote none): the text encoder only, no image read. Returns how
        many photos (records) got one; servers are told to reload the caption vectors."""
        done, after = 0, 0
        while records := self.metadata.captions_without_vectors(limit=max(1024, self.batch_size), after=after):
            after = records[-1].id
            first = {r.content_hash: r for r in reversed(records)}  # one per content: a caption applies to every copy
            vectors = dict(zip(first, embed_captions(self.encoder, [r.caption for r in first.values()])))
            embedded = [CaptionUpdate(r.id, r.caption, r.caption_model or "", v) for r in first.values() if (v := vectors[r.content_hash]) is not None]
            with _interrupts_deferred():  # a caption of no words is left without one (it is listed again each run: only those)
                self.metadata.set_captions(embedded)
                done += sum(vectors[r.content_hash] is not None for r in records)
        if done:
            self.metadata.captions_changed()
        return done

    def _caption_page(self, pool: ThreadPoolExecutor, records, counts: CaptionCounts, progress) -> None:
        """Caption one page of uncaptioned records: per content, the first record whose file reads as indexed."""
        by_content: dict[str | None, list] = {}
        for r in records:
            by_content.setdefault(r.content_hash, []).append(r)
        tries = {digest: iter(recs) for digest, recs in by_content.items() if digest is not None}
        none = sum(len(recs) for digest, recs in by_content.items() if digest is None)
        counts.unreadable += none
        counts.done += none
        batch: list[tuple[int, int, ReadResult]] = []
        while tries:
            attempt = {digest: rec for digest, it in tries.items() if (rec := next(it, None)) is not None}
            for digest in set(tries) - set(attempt):  # every file of this content failed
                counts.unreadable += len(by_content[digest])
                counts.done += len(by_content[digest])
                del tries[digest]
            files = [FoundFile(rec.path, rec.size, rec.mtime_ns) for rec in attempt.values()]
            with closing(self._read_ahead(pool, files, (self.captioner.image_input,), ())) as results:
                for (digest, rec), result in zip(attempt.items(), results):
                    if result.error is None and result.content_hash == digest:
                        batch.append((rec.id, len(by_content[digest]), result))
                        del tries[digest]
                    if len(batch) >= self.batch_size:
                        self._put_captions(batch, counts, progress)
                        batch = []
        if batch:
            self._put_captions(batch, counts, progress)

    def _put_captions(self, batch: list[tuple[int, int, ReadResult]], counts: CaptionCounts, progress) -> None:
        """Caption a batch of `(record id, records of that content, decoded photo)` and commit it."""
        cap = self.captioner
        if not self.decode_during_forward:
            self._not_in_forward.clear()
        try:
            texts = cap.caption_pixels(cap.pixels_from_uint8(np.stack([r.pixels[cap.image_input] for _, _, r in batch]), device=cap.device))
            vectors = embed_captions(self.encoder, texts)
        finally:
            self._not_in_forward.set()
        n = sum(n for _, n, _ in batch)
        with _interrupts_deferred():
            self.metadata.set_captions([CaptionUpdate(i, text, cap.name, vec) for (i, _, _), text, vec in zip(batch, texts, vectors)])
            counts.captioned += n
            counts.done += n
        if time.monotonic() - counts.signalled >= CAPTIONS_SIGNAL_S:
            self.metadata.captions_changed()
            counts.signalled = time.monotonic()
        if progress:
            progress(Progress(counts.done, counts.total, counts.captioned, 0, counts.unreadable, stage="caption"))

    def _put_vit_tokens(self, results: list[ReadResult]) -> int:
        model_input = self.encoder.image_input
        x = self.encoder.pixels_from_uint8(np.stack([r.pixels[model_input] for r in results]), device=self.encoder.device)
        tokens = HostCopy(self.encoder.vit_tokens(x).half()).numpy()  # the token store keeps float16
        for r, t in zip(results, tokens):
            self.vit_store.put(r.content_hash, t)
        return len(results)

    # ------------------------------------------------------------------ stages
    def _process(self, plan: ChangePlan, known, gone_by_hash, moved, counts: _Counts, progress) -> None:
        self._known, self._gone_by_hash, self._moved = known, gone_by_hash, moved
        inputs = tuple(sorted({self.encoder.image_input} | ({self.captioner.image_input} if self.captioner else set())))
        known_hashes = self.metadata.embedded_hashes()  # a restored photo, or a copy, reuses its vectors
        self._queued, self._store_failed = None, False
        pending: list[ReadResult] = []  # decoded images waiting for the next model batch
        failures: list[FailedFile] = []
        reuse: list[ReadResult] = []
        # Copies of content this run embeds, decoded before it was committed (the read-ahead window and the batches
        # in flight): they wait for that commit, then reuse its vectors instead of being embedded (and captioned) again.
        waiting: dict[str, list[ReadResult]] = {}
        embedding: set[str] = set()  # content hashes sent to `pending` by this run
        total = len(plan.work)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool, \
                closing(self._read_ahead(pool, plan.work, inputs, known_hashes)) as results:
            try:
                for result in results:
                    counts.done += 1
                    if result.gone:
                        self._vanished.append(result.file.path)
                    elif result.error:
                        failures.append(FailedFile(result.file.path, result.error, result.size, result.mtime_ns, result.content_hash))
                    elif not result.pixels or result.content_hash in known_hashes:  # the latter committed since it was read
                        reuse.append(replace(result, pixels={}))
                    elif result.content_hash in embedding:  # only the first copy keeps its pixels (embedded if its original is not)
                        copies = waiting.setdefault(result.content_hash, [])
                        copies.append(replace(result, pixels={}) if copies else result)
                    else:
                        embedding.add(result.content_hash)
                        pending.append(result)
                    while len(pending) >= self.batch_size:
                        self._write_batch(pending[:self.batch_size], known_hashes, counts)
                        del pending[:self.batch_size]
                        self._release(waiting, pending, reuse, known_hashes)
                    if len(reuse) >= 256 or len(failures) >= 256:
                        self._write_reuse(reuse, counts)
                        self._write_failures(failures, counts)
                    if progress:
                        progress(Progress(counts.done, total, counts.indexed, counts.reused, counts.failed + len(failures)))
                    self.checkpoint()
                while pending or self._queued is not None:  # with nothing pending, this commits the last queued batch
                    self._write_batch(pending[:self.batch_size], known_hashes, counts)
                    del pending[:self.batch_size]
                    self._release(waiting, pending, reuse, known_hashes)
                self._write_reuse(reuse, counts)
                self._write_failures(failures, counts)
                if progress:  # the last batches were written after the last file's report
                    progress(Progress(counts.done, total, counts.indexed, counts.reused, counts.failed))
            except BaseException as exc:
                results.close()  # reads not started are cancelled
                queued, self._queued = self._queued, None
                self._commit_after(exc, queued, known_hashes, counts)  # the batch already embedded
                raise

    def _release(self, waiting: dict[str, list[ReadResult]], pending: list[ReadResult], reuse: list[ReadResult], known_hashes: set[str]) -> None:
        """Copies in `waiting` whose content is committed now go to `reuse` (their pixels dropped). Content neither
        committed nor in flight (in `pending` or the batch queued on the model: its batch was never committed) is
        embedded after all: its first copy joins `pending`, the others wait for it."""
        queued = self._queued[0] if self._queued is not None else []
        in_flight = {r.content_hash for r in pending} | {r.content_hash for r in queued}
        for digest in [d for d in waiting if d not in in_flight]:
            copies = waiting.pop(digest)
            if digest in known_hashes:
                reuse.extend(replace(r, pixels={}) for r in copies)
            else:
                pending.append(copies[0])
                if copies[1:]:
                    waiting[digest] = copies[1:]

    def checkpoint(self, *, now: bool = False) -> None:
        """Save the vector index as it stands (it matches every batch committed so far) when CHECKPOINT_S have
        passed since the run started or since the last checkpoint, spaced out to CHECKPOINT_COST times the
        last one's duration; `now`: whatever the time. Ctrl-C waits for it. A save that fails (a full disk)
        stops the checkpoints, not the run: the save at the end reports it."""
        if self._checkpoint is None or self._vectors is None or (not now and time.monotonic() < self._next_checkpoint):
            return
        started = time.monotonic()
        try:
            with _interrupts_deferred(), self._vectors_lock:
                self._checkpoint(self._vectors)
        except LibraryError:
            self._checkpoint = None
            return
        took = time.monotonic() - started
        self._next_checkpoint = time.monotonic() + max(CHECKPOINT_S, CHECKPOINT_COST * took)

    def _read_ahead(self, pool: ThreadPoolExecutor, files: Iterable[FoundFile], inputs: tuple[tuple[int, int], ...], known_hashes) -> Iterator[ReadResult]:
        """`read_and_decode` of `files` in `pool`, in order, at most a window of files ahead of the consumer
        (decoded images wait in memory only that far). Closing it cancels the reads not started."""
        todo = iter(files)
        queue: deque[Future] = deque(pool.submit(self._read, f, inputs, known_hashes)
                                     for f in islice(todo, self.workers * 2 + self.batch_size))
        try:
            while queue:
                result: ReadResult = queue.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    queue.append(pool.submit(self._read, nxt, inputs, known_hashes))
                yield result
        finally:
            for fut in queue:
                fut.cancel()

    def _read(self, file, inputs: tuple[tuple[int, int], ...], known_hashes: set[str]) -> ReadResult:
        """The read stage in a decode thread; it starts no new file while a CPU forward runs."""
        self._not_in_forward.wait()
        return read_and_decode(file, inputs, known_hashes, fast=self.fast_decode)

    def _write_batch(self, pending: list[ReadResult], known_hashes: set[str], counts: _Counts) -> None:
        """Embed the pending images and commit them, each batch in one transaction.

        With `queue_ahead` (on a GPU) one batch stays queued: this queues the pending images on the model,
        then collects and commits the batch queued before them, so the card runs while the database is
        written and the next batch is gathered. Called with nothing pending, it commits the queued one.
        If queueing fails (or Ctrl-C lands there), the batch before it is still committed, and that
        exception is the one raised.
        """
        previous, self._queued = self._queued, None
        try:
            if pending:
                results = list(pending)
                pending.clear()
                self._queued = (results, self._embed(results))
        except BaseException as exc:
            self._commit_after(exc, previous, known_hashes, counts)
            raise
        if not self.queue_ahead and self._queued is not None:
            previous, self._queued = self._queued, None  # on the CPU it has run already: commit it now
        if previous is not None:
            self._store_batch(*previous, known_hashes, counts)

    def _commit_after(self, exc: BaseException, queued, known_hashes: set[str], counts: _Counts) -> None:
        """Commit a batch already embedded while `exc` stops the run; a failure to do so is noted on `exc`
        (which stays the error raised), and nothing is tried after the database itself failed."""
        if queued is None or self._store_failed:
            return
        try:
            self._store_batch(*queued, known_hashes, counts)
        except Exception as store_exc:
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"the batch embedded before it was not committed either ({type(store_exc).__name__}: {store_exc})")

    def _embed(self, results: list[ReadResult]) -> QueuedBatch:
        pixels = {key: np.stack([r.pixels[key] for r in results]) for key in results[0].pixels}
        if self._shared_vit is None:  # decided once, when the first batch has loaded both models
            self._shared_vit = share_vit(self.encoder, self.captioner)
        if not self.decode_during_forward:
            self._not_in_forward.clear()
        try:
            return embed_batch(self.encoder, self.captioner, pixels, shared_vit=self._shared_vit, keep_vit=self.vit_store is not None)
        finally:
            self._not_in_forward.set()

    def _store_batch(self, results: list[ReadResult], queued: QueuedBatch, known_hashes: set[str], counts: _Counts) -> None:
        """Wait for a queued batch's results and commit them (with captions) in one transaction."""
        self._store_failed = True  # until this batch is committed
        batch = queued.collect()
        if self.vit_store is not None:
            for r, t in zip(results, batch.vit):
                self.vit_store.put(r.content_hash, t)
        items = []
        for i, r in enumerate(results):
            items.append(IndexedImage(
                path=r.file.path, size=r.size, mtime_ns=r.mtime_ns, content_hash=r.content_hash, **_details(r.info), vectors=batch.vectors[i],
                caption=batch.captions[i] if batch.captions else None,
                caption_model=self.captioner.name if self.captioner else None,
                caption_vector=batch.caption_vectors[i] if batch.caption_vectors is not None else None,
            ))
        renames = self._claim_records([(r.file.path, r.content_hash) for r in results])
        with _interrupts_deferred():  # a Ctrl-C after the commit would leave the index and the report behind it
            if renames:
                self.metadata.rename(renames)
            ids = self.metadata.upsert_indexed(items)
            with self._vectors_lock:
                self.vectors.add(np.asarray(ids, dtype=np.int64), batch.vectors)
            known_hashes.update(r.content_hash for r in results)
            counts.indexed += len(results)
            self._store_failed = False

    def _claim_records(self, files: list[tuple[str, str]]) -> list[tuple[int, str]]:
        """`(record id, new path)` for embedded files (path, content hash) that are an earlier record moved
        (`_claim`). Only records waiting to be embedded can match (after `--reembed`; content already
        embedded takes `_write_reuse`); the record keeps its id and caption instead of a new one beside it."""
        unknown = [(path, digest) for path, digest in files if path not in self._known]
        if not unknown:
            return []
        templates = self.metadata.images_by_hash({d for _, d in unknown}, statuses=(STATUS_INDEXED, STATUS_PENDING))
        claimed = [(self._claim(path, digest, templates), path) for path, digest in unknown]
        return [(image_id, path) for image_id, path in claimed if image_id is not None]

    def _claim(self, path: str, digest: str, templates: dict) -> int | None:
        """The id of the record that file `path` (new to the library, content `digest`) is a move of, now
        taken by it: a record found gone with that content in this run, else one of `templates` (records by
        content) that `_elsewhere` says is this file, else a deleted one whose file is still gone from a folder
        that is still there (a move seen by two runs: out of one folder, later into another); None for a new
        photo or a copy."""
        if path in self._known:
            return None
        same = [rec for rec in templates.get(digest, []) if rec.id not in self._moved]
        candidates = (self._gone_by_hash.get(digest)
                      or [rec.id for rec in same if rec.status != STATUS_DELETED and self._elsewhere(rec.path, path)]
                      # a photo found gone by an earlier run (moved out of its folder then), now found here; not
                      # when its folder is gone too (a drive unplugged: this file is a copy, the photo comes back)
                      or [rec.id for rec in same if rec.status == STATUS_DELETED and not os.path.lexists(rec.path)
                          and os.path.isdir(os.path.dirname(rec.path))])
        if not candidates:
            return None
        image_id = candidates.pop(0)
        self._moved.add(image_id)
        return image_id

    def _write_reuse(self, reuse: list[ReadResult], counts: _Counts) -> None:
        """Files whose bytes are already embedded: a move/rename keeps its record; others share vectors."""
        if not reuse:
            return
        items, renames = [], []
        # The records with these contents: what a photo's record says (size, date, camera) comes from them.
        # A failed one too: it keeps the details of the content it last held (a photo unreadable for a while).
        templates = self.metadata.images_by_hash({r.content_hash for r in reuse},
                                                 statuses=(STATUS_INDEXED, STATUS_PENDING, STATUS_DELETED, STATUS_FAILED))
        described = {d: [rec for rec in recs if rec.width is not None] for d, recs in templates.items()}
        # Content that no record describes (restored after its record failed or moved on to other bytes): its header
        # does, read here rather than while Ctrl-C waits.
        headers = {r.file.path: r.info or header_info(r.file.path, r.content_hash) for r in reuse if not described.get(r.content_hash)}
        for r in reuse:
            image_id = self._claim(r.file.path, r.content_hash, templates)
            if image_id is not None:
                renames.append((image_id, r.file.path, r))
            else:
                items.append(r)
        with _interrupts_deferred():
            if renames:
                self.metadata.rename([(i, p) for i, p, _ in renames])
            own = {r.file.path: i for i, _, r in renames}  # a moved photo keeps its own details, a copy takes the first's
            upserts = []
            for r in items + [r for _, _, r in renames]:
                same = described.get(r.content_hash)
                t = next((rec for rec in same if rec.id == own.get(r.file.path)), same[0]) if same else headers.get(r.file.path)
                upserts.append(IndexedImage(path=r.file.path, size=r.size, mtime_ns=r.mtime_ns, content_hash=r.content_hash, **_details(t)))
            ids = self.metadata.upsert_indexed(upserts)
            # A touched or moved photo whose record was searchable with this content has its vectors in the index
            # already: re-adding them would cost a compaction of the whole exact index per batch.
            new = [(i, u) for i, u in zip(ids, upserts) if self._live_ids.get(i, "") != u.content_hash]
            if new:
                stored = self.metadata.get_embeddings({u.content_hash for _, u in new})
                vecs = np.stack([stored[u.content_hash].image_vectors for _, u in new])
                with self._vectors_lock:
                    self.vectors.add(np.asarray([i for i, _ in new], dtype=np.int64), vecs)
            counts.reused += len(reuse)
            reuse.clear()

    def _elsewhere(self, recorded: str, found: str) -> bool:
        """Is the record at `recorded` (not found in this run) the file now `found`, so that `found` is its move?
        Yes when its file is gone (the top folder was renamed), or when it sits at the same relative path
        under another name of the folder being indexed (a symlinked alias of it). A symlink inside the
        folder to a photo elsewhere (an album of favourites) is a copy: the original keeps its record."""
        if recorded in self._found:
            return False
        if not os.path.lexists(recorded):
            return True
        return self._same_file_under_another_root_name(recorded, found)

    def _same_file_under_another_root_name(self, recorded: str, found: str) -> bool:
        """Is `recorded` the file `found` under another name of `found`'s root, or of a folder inside it (a
        symlink to it, or it behind a symlink)? Same relative path below the two names, which resolve to one
        folder. Below the root, `found`'s folders must be real: a link inside the root to a folder elsewhere
        (an album of favourites) is a copy, and the photo keeps its record where it is."""
        for root in self._roots:
            prefix = root.rstrip(os.sep) + os.sep
            if not found.startswith(prefix):
                continue
            parts = found[len(prefix):].split(os.sep)
            real_root = os.path.realpath(root)
            for depth in range(len(parts)):  # the folder of `found` named otherwise: the root, then its subfolders
                rel = os.sep.join(parts[depth:])
                if not recorded.endswith(os.sep + rel):
                    continue
                other = recorded[: -len(rel) - 1]
                inside = os.sep.join(parts[:depth])
                here = os.path.join(root, inside) if inside else root
                if not other or os.path.realpath(other) != os.path.realpath(here):  # "": '/' (realpath("") is the cwd)
                    continue
                if inside and os.path.realpath(here) != os.path.join(real_root, inside):  # through a link inside the root
                    continue
                self._aliases.add(other.rstrip(os.sep) + os.sep)  # its photos gone since are gone (`_gone_under_other_names`)
                return True
        return False

    def _write_failures(self, failures: list[FailedFile], counts: _Counts) -> None:
        if not failures:
            return
        with _interrupts_deferred():
            ids = self.metadata.mark_failed(failures)
            was_live = [i for i in ids if i in self._live_ids]  # a changed photo that no longer reads leaves search
            if was_live:
                with self._vectors_lock:
                    self.vectors.remove(np.asarray(was_live, dtype=np.int64))
            counts.failed += len(failures)
            failures.clear()
