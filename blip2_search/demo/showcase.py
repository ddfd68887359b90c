"""`blip2-search demo`: render synthetic photos, index them with the demo models, run a few searches."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from .scenes import Scene, write_folder

_RENDER_NAME = re.compile(r"scene_\d{5}\.(jpg|png)")

DEMO_QUERIES = (
    "a red circle on the left",
    "a blue triangle on the top",
    "a yellow square on the bottom",
    '"a green circle" - "on the right"',
)


@dataclass(frozen=True)
class DemoQuery:
    """One demo search: its hits as (path, caption, score, scene the file was rendered from)."""

    query: str
    hits: tuple[tuple[str, str | None, float, Scene | None], ...]


@dataclass(frozen=True)
class DemoReport:
    photos: Path
    library: Path
    indexed: int
    index_seconds: float
    queries: tuple[DemoQuery, ...]
    search_seconds: float


def run_demo(folder: Path, *, n_photos: int = 144, seed: int = 2026, k: int = 3) -> DemoReport:
    """Render `n_photos` scenes under `folder/photos`, index them into `folder/library`, search."""
    from ..library import Library
    from ..models.loading import resolve_model

    resolve_model("demo", role="embedder"), resolve_model("demo", role="captioner")  # fail before writing anything
    photos, library = folder / "photos", folder / "library"
    written = write_folder(photos, n_photos, seed)
    ours = {p for p, _ in written}
    for old in photos.iterdir():  # an earlier demo's extra renders (write_folder's names), nothing else
        if old not in ours and _RENDER_NAME.fullmatch(old.name) and old.is_file() and not old.is_symlink():
            old.unlink()
    scene_of = {str(p.absolute()): s for p, s in written}
    with Library.open(library, model="demo", captioner="demo", create=True) as lib:
        report = lib.index([photos])
        start = time.perf_counter()
        results = []
        for q in DEMO_QUERIES:
            res = lib.search(q, k)
            results.append(DemoQuery(q, tuple((h.path, h.caption, h.score, scene_of.get(h.path)) for h in res.hits)))
        search_seconds = time.perf_counter() - start
    searchable = report.indexed + report.reused + report.unchanged  # new, moved or copied, and kept from a run before
    return DemoReport(photos, library, searchable, report.seconds, tuple(results), round(search_seconds, 3))
