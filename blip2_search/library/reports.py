"""What a library's answers other than searches hold: status, prune, duplicates, failures (typed records)."""

from __future__ import annotations

from dataclasses import dataclass

from ..store import ImageRecord


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


NOT_COMPACTED = "the deleted photos were forgotten, but the metadata could not be compacted"
"""How a prune's note starts when its compaction failed (the CLI's summary then leaves out why it did not compact)."""
