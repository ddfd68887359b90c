"""`blip2-search demo`: render synthetic photos, index them with the demo models, run a few searches."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .scenes import Scene, write_folder

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
    for old in set(photos.glob("scene_*.*")) - {p for p, _ in written}:  # an earlier demo's extra renders
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
