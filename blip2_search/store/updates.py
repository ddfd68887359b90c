"""Write operations of the metadata store, each run inside the caller's write transaction.

Every function here takes an open write ``Connection`` (see ``engine.write_transaction``), so
a batch is all-or-nothing. Those that change which vectors are live call ``bump_generation`` with the
images they changed, which it records in the change journal (``vector_changes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, exists, insert, select, update

from blip2_search.errors import InvalidInputError
from blip2_search.store.codec import check_absolute, vectors_to_bytes
from blip2_search.store.records import (
    STATUS_DELETED,
    STATUS_FAILED,
    STATUS_INDEXED,
    STATUS_PENDING,
    CaptionUpdate,
    EmbedderInfo,
    FailedFile,
    IndexedImage,
    ModelRef,
)
from blip2_search.store.rows import chunks, read_embedder, require_embedder
from blip2_search.store.schema import (
    INFO_CAPTIONER_MODEL,
    INFO_CAPTIONER_REVISION,
    INFO_DIM,
    INFO_EMBEDDER_MODEL,
    INFO_EMBEDDER_REVISION,
    INFO_EMBEDDER_SINCE,
    INFO_NUM_QUERY_TOKENS,
    INFO_CAPTIONS_GENERATION,
    INFO_CHANGES_SINCE,
    INFO_VECTORS_GENERATION,
    caption_vectors,
    embeddings,
    images,
    library_info,
    vector_changes,
)

MAX_ERROR_CHARS = 500
"""Stored error messages are cut to this many characters."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def one_line(message: str) -> str:
    """``message`` on one line (whitespace runs collapsed), at most ``MAX_ERROR_CHARS`` long."""
    line = " ".join(message.split()) or "unknown error"
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def set_info(connection: Connection, values: dict[str, str | None]) -> None:
    """Insert, update or (for None) delete ``library_info`` keys."""
    _set_info(connection, values)


def _set_info(connection: Connection, values: dict[str, str | None]) -> None:
    """Insert, update or (for None) delete ``library_info`` keys."""
    existing = set(connection.scalars(select(library_info.c.key).where(library_info.c.key.in_(list(values)))))
    for key, value in values.items():
        if value is None:
            connection.execute(delete(library_info).where(library_info.c.key == key))
        elif key in existing:
            connection.execute(update(library_info).where(library_info.c.key == key).values(value=value))
        else:
            connection.execute(insert(library_info).values(key=key, value=value))


def bump_generation(connection: Connection, changed: Sequence[int] | None) -> int:
    """Increment ``vectors_generation`` and journal the images whose vectors this change may have added, replaced
    or dropped (``changed``; None, or none named: any image, so no vector index saved before is brought up to date
    from the journal); return the new generation."""
    generation = _bump(connection, INFO_VECTORS_GENERATION)
    ids = None if changed is None else list(dict.fromkeys(int(image_id) for image_id in changed))
    rows = [{"generation": generation, "image_id": i} for i in ids or [None]]  # each generation journals a row at least
    connection.execute(insert(vector_changes), rows)
    return generation


def forget_vector_changes(connection: Connection, through: int) -> None:
    """Drop the journal's rows up to generation ``through`` (a vector index saved at that generation is on disk):
    from then on it holds the changes from ``through + 1`` on, or from later if it held fewer already."""
    since = connection.scalar(select(library_info.c.value).where(library_info.c.key == INFO_CHANGES_SINCE).with_for_update())
    if since is not None and int(since) > through:
        return
    connection.execute(delete(vector_changes).where(vector_changes.c.generation <= through))
    _set_info(connection, {INFO_CHANGES_SINCE: str(through + 1)})


def bump_captions_generation(connection: Connection) -> int:
    """Increment ``captions_generation`` (captions written after indexing); return the new value."""
    return _bump(connection, INFO_CAPTIONS_GENERATION)


def _bump(connection: Connection, key: str) -> int:
    """Increment the ``library_info`` counter ``key`` (0 when missing), the row locked on PostgreSQL."""
    current = connection.scalar(select(library_info.c.value).where(library_info.c.key == key).with_for_update())
    new = int(current or 0) + 1
    _set_info(connection, {key: str(new)})
    return new


def write_embedder(connection: Connection, embedder: EmbedderInfo, *, since: int | None = None) -> None:
    """Record ``embedder`` in ``library_info``; ``since``: the vectors generation from which saved vector
    indexes hold its vectors (``INFO_EMBEDDER_SINCE``; left as it was when None)."""
    values = {
        INFO_EMBEDDER_MODEL: embedder.model.model_id,
        INFO_EMBEDDER_REVISION: embedder.model.revision,
        INFO_NUM_QUERY_TOKENS: str(embedder.num_query_tokens),
        INFO_DIM: str(embedder.dim),
    }
    if since is not None:
        values[INFO_EMBEDDER_SINCE] = str(since)
    _set_info(connection, values)


def mark_embedder_since(connection: Connection) -> None:
    """Record the current vectors generation as the one from which saved indexes hold the recorded embedder's
    vectors, where nothing is recorded (a library from before the key, whose vectors come from that embedder
    now): a vector index saved earlier is never taken for one of it."""
    if connection.scalar(select(library_info.c.value).where(library_info.c.key == INFO_EMBEDDER_SINCE)) is None:
        current = connection.scalar(select(library_info.c.value).where(library_info.c.key == INFO_VECTORS_GENERATION))
        _set_info(connection, {INFO_EMBEDDER_SINCE: str(int(current or 0) + 1)})


def write_captioner(connection: Connection, captioner: ModelRef | None) -> None:
    """Record ``captioner`` in ``library_info`` (None deletes the record)."""
    _set_info(
        connection,
        {INFO_CAPTIONER_MODEL: captioner.model_id if captioner else None, INFO_CAPTIONER_REVISION: captioner.revision if captioner else None},
    )


def reset_embedder(connection: Connection, embedder: EmbedderInfo) -> int:
    """Delete every embedding, record ``embedder``, make indexed images pending; return that count."""
    connection.execute(delete(caption_vectors))
    connection.execute(delete(embeddings))
    changed = connection.execute(
        update(images)
        .where(images.c.status == STATUS_INDEXED)
        .values(status=STATUS_PENDING, updated_at=_now())
    ).rowcount
    write_embedder(connection, embedder, since=bump_generation(connection, None))  # an index saved before holds the old model's
    return int(changed)


def _rows_by_path(connection: Connection, paths: Sequence[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for part in chunks(paths):
        for row in connection.execute(select(images).where(images.c.path.in_(part))):
            found[row.path] = row
    return found


def _ids_by_path(connection: Connection, paths: Sequence[str]) -> list[int]:
    ids: dict[str, int] = {}
    for part in chunks(paths):
        statement = select(images.c.path, images.c.id).where(images.c.path.in_(part))
        ids.update(connection.execute(statement).all())
    return [ids[path] for path in paths]


def _checked_paths(paths: Sequence[str]) -> list[str]:
    checked = [check_absolute(path) for path in paths]
    if len(set(checked)) != len(checked):
        raise InvalidInputError("a batch lists the same path twice; pass each file once per batch")
    return checked


def _store_vectors(connection: Connection, items: Sequence[IndexedImage], embedder: EmbedderInfo) -> None:
    """Insert or replace embedding rows for items with vectors; check reused hashes exist."""
    shape = (embedder.num_query_tokens, embedder.dim)
    hashes = list(dict.fromkeys(item.content_hash for item in items))
    stored: set[str] = set()
    for part in chunks(hashes):
        stored.update(
            connection.scalars(select(embeddings.c.content_hash).where(embeddings.c.content_hash.in_(part)))
        )
    new_rows: dict[str, bytes] = {}
    replaced: dict[str, bytes] = {}
    captions: dict[str, bytes] = {}
    for item in items:
        digest = item.content_hash
        if item.vectors is not None:
            blob = vectors_to_bytes(item.vectors, shape, f"vectors of {item.path}")
            (replaced if digest in stored else new_rows)[digest] = blob
        elif digest not in stored and digest not in new_rows:
            raise InvalidInputError(
                f"image {item.path} reuses vectors of content hash {digest}, which has none; pass its vectors"
            )
        if item.caption_vector is not None:
            captions[digest] = vectors_to_bytes(
                item.caption_vector, (embedder.dim,), f"caption vector of {item.path}"
            )
    now = _now()
    if new_rows:
        connection.execute(
            insert(embeddings),
            [{"content_hash": h, "image_vectors": b, "created_at": now} for h, b in new_rows.items()],
        )
    if replaced:
        connection.execute(
            update(embeddings)
            .where(embeddings.c.content_hash == bindparam("h"))
            .values(image_vectors=bindparam("b")),
            [{"h": h, "b": b} for h, b in replaced.items()],
        )
    if captions:
        _put_caption_vectors(connection, captions)


def _put_caption_vectors(connection: Connection, blobs: dict[str, bytes]) -> None:
    """Insert or replace caption vectors by content hash (the embedding rows must exist)."""
    for part in chunks(list(blobs)):
        connection.execute(delete(caption_vectors).where(caption_vectors.c.content_hash.in_(part)))
    connection.execute(insert(caption_vectors), [{"content_hash": h, "vector": b} for h, b in blobs.items()])


def _captions_by_hash(connection: Connection, hashes: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    found: dict[str, tuple[str, str | None]] = {}
    for part in chunks(hashes):
        statement = (
            select(images.c.content_hash, images.c.caption, images.c.caption_model)
            .where(images.c.content_hash.in_(part), images.c.caption.is_not(None))
            .order_by(images.c.id)
        )
        for row in connection.execute(statement):
            found.setdefault(row.content_hash, (row.caption, row.caption_model))
    return found


def upsert_indexed(connection: Connection, items: Sequence[IndexedImage], location: str) -> list[int]:
    """Store ``items`` as indexed with their embeddings; bump the generation; return ids in order."""
    paths = _checked_paths([item.path for item in items])
    if not all(isinstance(item.content_hash, str) and item.content_hash for item in items):
        raise InvalidInputError("every indexed image needs a content hash; hash the file's bytes first")
    embedder = require_embedder(connection, location)
    _store_vectors(connection, items, embedder)
    existing = _rows_by_path(connection, paths)
    inherited = _captions_by_hash(connection, list(dict.fromkeys(item.content_hash for item in items)))
    now = _now()
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for path, item in zip(paths, items, strict=True):
        old = existing.get(path)
        if item.caption is not None:
            caption = (item.caption, item.caption_model)
        elif old is not None and old.content_hash == item.content_hash and old.caption is not None:
            caption = (old.caption, old.caption_model)
        else:
            caption = inherited.get(item.content_hash, (None, None))
        values = {
            "size": item.size,
            "mtime_ns": item.mtime_ns,
            "content_hash": item.content_hash,
            "width": item.width,
            "height": item.height,
            "taken_at": item.taken_at,
            "camera_make": item.camera_make,
            "camera_model": item.camera_model,
            "status": STATUS_INDEXED,
            "error": None,
            "caption": caption[0],
            "caption_model": caption[1],
            "indexed_at": now,
            "updated_at": now,
        }
        if old is None:
            inserts.append({"path": path, **values})
        else:
            updates.append({"row_id": old.id, **values})
    if inserts:
        connection.execute(insert(images), inserts)
    if updates:
        statement = update(images).where(images.c.id == bindparam("row_id"))
        connection.execute(statement, updates)
    ids = _ids_by_path(connection, paths)
    bump_generation(connection, ids)
    return ids


def rename(connection: Connection, moves: Sequence[tuple[int, str]]) -> None:
    """Set new paths for image ids; a different row already at a target path is removed."""
    ids = [int(image_id) for image_id, _ in moves]
    targets = _checked_paths([path for _, path in moves])
    if len(set(ids)) != len(ids):
        raise InvalidInputError("a rename batch moves the same image twice; pass each image once")
    known = set()
    for part in chunks(ids):
        known.update(connection.scalars(select(images.c.id).where(images.c.id.in_(part))))
    missing = [image_id for image_id in ids if image_id not in known]
    if missing:
        raise InvalidInputError(f"cannot rename images {missing[:5]}: no such image ids in the library")
    replaced = [row for row in _rows_by_path(connection, targets).values() if row.id not in known]
    if replaced:
        connection.execute(delete(images).where(images.c.id.in_([row.id for row in replaced])))
        if any(row.status == STATUS_INDEXED for row in replaced):
            bump_generation(connection, [row.id for row in replaced])
    # Two steps so that swapped paths never collide on the unique constraint; the placeholder
    # is relative, and stored paths are absolute, so it cannot clash with a real path.
    statement = update(images).where(images.c.id == bindparam("row_id")).values(path=bindparam("new_path"))
    connection.execute(statement, [{"row_id": i, "new_path": f"rename-pending/{i}"} for i in ids])
    now = _now()
    connection.execute(
        update(images)
        .where(images.c.id == bindparam("row_id"))
        .values(path=bindparam("new_path"), updated_at=now),
        [{"row_id": i, "new_path": path} for i, path in zip(ids, targets, strict=True)],
    )


def mark_failed(connection: Connection, failures: Sequence[FailedFile]) -> list[int]:
    """Store ``failures`` with status failed and a one-line error; return their ids in order.

    A row that already has a content hash keeps it: its date, size, camera and caption describe that
    content, and a photo whose file reads again (permissions fixed, a bad copy replaced by the original)
    takes them back from the row when its bytes are that content again. A new row records the failing
    bytes' hash, if any.
    """
    paths = _checked_paths([failure.path for failure in failures])
    existing = _rows_by_path(connection, paths)
    now = _now()
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for path, failure in zip(paths, failures, strict=True):
        old = existing.get(path)
        values = {
            "size": failure.size,
            "mtime_ns": failure.mtime_ns,
            "content_hash": old.content_hash if old is not None and old.content_hash else failure.content_hash,
            "status": STATUS_FAILED,
            "error": one_line(failure.error),
            "updated_at": now,
        }
        if old is None:
            inserts.append({"path": path, **values})
        else:
            updates.append({"row_id": old.id, **values})
    if inserts:
        connection.execute(insert(images), inserts)
    if updates:
        connection.execute(update(images).where(images.c.id == bindparam("row_id")), updates)
    was_live = [row.id for row in existing.values() if row.status == STATUS_INDEXED]
    if was_live:
        bump_generation(connection, was_live)
    return _ids_by_path(connection, paths)


def mark_deleted(connection: Connection, image_ids: Sequence[int]) -> int:
    """Set status deleted on the photos among ``image_ids``; return how many changed.

    Failure records of files never indexed are removed instead (``drop_failures``). One whose file was indexed
    before (its re-index failed) is a photo: it is marked deleted like the others, its vectors and caption kept
    until ``forget_deleted``, so that its bytes coming back reuse them.
    """
    changed = 0
    was_live: list[int] = []
    now = _now()
    drop_failures(connection, image_ids)
    for part in chunks(image_ids):
        was_live.extend(connection.scalars(select(images.c.id).where(images.c.id.in_(part), images.c.status == STATUS_INDEXED)))
        changed += connection.execute(
            update(images)
            .where(images.c.id.in_(part), images.c.status != STATUS_DELETED)
            .values(status=STATUS_DELETED, updated_at=now)
        ).rowcount
    if was_live:
        bump_generation(connection, was_live)
    return changed


def drop_failures(connection: Connection, image_ids: Sequence[int]) -> None:
    """Remove the failure records among ``image_ids`` of files never indexed: a file that could not be indexed (or
    a folder that could not be read) is no photo, neither in search nor among the deleted ones that ``status`` and
    ``prune`` count."""
    for part in chunks(image_ids):
        connection.execute(delete(images).where(images.c.id.in_(part), images.c.status == STATUS_FAILED, images.c.indexed_at.is_(None)))


def forget_deleted(connection: Connection, *, deleted_before: datetime | None = None) -> int:
    """Remove the rows of images marked deleted (before ``deleted_before`` when given); return how many.

    Their vectors stay until ``purge_unreferenced_embeddings``; ids are never reused.
    """
    condition = images.c.status == STATUS_DELETED
    if deleted_before is not None:
        condition = and_(condition, images.c.updated_at < deleted_before)
    return int(connection.execute(delete(images).where(condition)).rowcount)


def purge_unreferenced_embeddings(connection: Connection) -> int:
    """Delete embedding rows that no image row references (any status); return how many.

    A deleted image's row keeps its vectors, so restoring the photo reuses them.
    """
    used = exists().where(images.c.content_hash == embeddings.c.content_hash)
    caption_used = exists().where(images.c.content_hash == caption_vectors.c.content_hash)
    connection.execute(delete(caption_vectors).where(~caption_used))
    return int(connection.execute(delete(embeddings).where(~used)).rowcount)


def set_captions(connection: Connection, captions: Sequence[CaptionUpdate], location: str) -> None:
    """Store captions on each image and on every image with the same content hash."""
    embedder = read_embedder(connection)
    for caption in captions:
        row = connection.execute(
            select(images.c.id, images.c.content_hash).where(images.c.id == int(caption.image_id))
        ).first()
        if row is None:
            raise InvalidInputError(
                f"cannot caption image {caption.image_id}: no such image id in the library"
            )
        values = {"caption": caption.caption, "caption_model": caption.caption_model}
        target = (
            images.c.id == row.id if row.content_hash is None else images.c.content_hash == row.content_hash
        )
        # a deleted copy takes the caption too (a restore reuses it) but keeps its updated_at: the
        # time it was found deleted, which `forget_deleted(deleted_before=...)` goes by
        connection.execute(update(images).where(target, images.c.status != STATUS_DELETED).values(**values, updated_at=_now()))
        connection.execute(update(images).where(target, images.c.status == STATUS_DELETED).values(**values))
        if caption.caption_vector is not None and row.content_hash is not None:
            if embedder is None:
                embedder = require_embedder(connection, location)
            blob = vectors_to_bytes(
                caption.caption_vector, (embedder.dim,), f"caption vector of image {row.id}"
            )
            if connection.scalar(select(exists().where(embeddings.c.content_hash == row.content_hash))):
                _put_caption_vectors(connection, {row.content_hash: blob})
