"""An optional on-disk store of ViT tokens, so ITM reranking need not rerun the ViT.

One fp16 `.npy` file per content hash under `<library>/vit/ab/<hash>.npy`, `[T, W] float16`
(257 x 1408 for ViT-g at 224 px: 0.72 MB an image). The store is on when its folder exists
(`blip2-search index --store-vit` creates it); files are written atomically before the database
commit that makes their image searchable, so a crash leaves at most an unused file.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from blip2_search.errors import LibraryError

VIT_DIRNAME = "vit"


class VitTokenStore:
    """fp16 ViT tokens by content hash."""

    def __init__(self, library_folder: Path):
        self.folder = Path(library_folder) / VIT_DIRNAME

    @property
    def enabled(self) -> bool:
        return self.folder.is_dir()

    def enable(self) -> None:
        """Start storing tokens (the next `index` run also fills them in for images indexed before)."""
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, content_hash: str) -> Path:
        return self.folder / content_hash[:2] / f"{content_hash}.npy"

    def put(self, content_hash: str, tokens: np.ndarray) -> None:
        """Write `[T, W]` tokens as float16 (atomic: temp file + rename).

        Raises LibraryError naming the folder, the reason and the fix when the file cannot be written (a full disk)."""
        path = self._path(content_hash)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        data = io.BytesIO()  # written in one call: a full disk is then errno 28, not numpy's "N requested and M written"
        np.save(data, np.ascontiguousarray(tokens, dtype=np.float16))
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data.getbuffer())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LibraryError(f"cannot store ViT tokens in {self.folder} ({exc.strerror or exc}); free disk space (0.72 MB a "
                               "photo for ViT-g) or make the folder writable, then run the command again") from exc

    def stored_hashes(self) -> set[str]:
        """The content hashes whose tokens are stored (one listing of the store, no file opened)."""
        if not self.enabled:
            return set()
        return {p.stem for p in self.folder.glob("*/*.npy")}

    def intact_hashes(self) -> set[str]:
        """The content hashes whose stored tokens read whole: one stat a file; only a file of another size than
        most (cut short by a crash or a full disk, or of another model) is opened to check its header."""
        sizes = {}
        for p in self.folder.glob("*/*.npy") if self.enabled else ():
            try:
                sizes[p] = p.stat().st_size
            except OSError:
                continue
        usual = Counter(sizes.values()).most_common(1)[0][0] if sizes else None
        if usual is not None and not _reads_whole(next(p for p, size in sizes.items() if size == usual)):
            usual = None  # most files are damaged alike (e.g. empty after a power loss): each one is checked
        return {p.stem for p, size in sizes.items() if size == usual or _reads_whole(p)}

    def get(self, content_hash: str | None) -> np.ndarray | None:
        """`[T, W] float16`, or None when not stored."""
        if not content_hash:
            return None
        try:
            return np.load(self._path(content_hash))
        except (OSError, ValueError):
            return None

    def size_bytes(self) -> int:
        """Disk space used by stored tokens."""
        if not self.enabled:
            return 0
        return sum(p.stat().st_size for p in self.folder.glob("*/*.npy"))

    def prune(self, live_hashes: Iterable[str]) -> int:
        """Delete token files whose content no live image has; returns how many."""
        if not self.enabled:
            return 0
        live = set(live_hashes)
        removed = 0
        for p in self.folder.glob("*/*"):
            if p.stem not in live or p.suffix != ".npy":
                p.unlink(missing_ok=True)
                removed += 1
        return removed


def _reads_whole(path: Path) -> bool:
    """Whether the `.npy` file at `path` holds all the data its header promises (only the header is read)."""
    try:
        np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return True
