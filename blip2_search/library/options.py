"""Checks and names of `Library`'s arguments (models, sort, vector index, flags), the names of the library folder's parts, and the
notes' small helpers."""

from __future__ import annotations

import numbers
import os
import re
import reprlib
from pathlib import Path

import numpy as np

from .. import settings
from ..errors import OPEN_FOLDER, InvalidInputError, Spelled
from ..models.loading import DEMO
from ..store.index_choice import VECTOR_INDEX_MODES


NO_CAPTIONER = "none"  # captioner= value that stops a library captioning (a checkpoint folder named so: ./none)


THUMBS_DIRNAME = "thumbs"  # the server's thumbnail cache inside the library folder (server/photos.py)


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


def _check_vector_index(kind: str | None) -> str | None:
    if kind is not None and kind not in VECTOR_INDEX_MODES:
        raise InvalidInputError("vector index {given} is not one of {modes}; pass {argument:'exact'}, {argument:'compact'} or "
                                "{argument:'auto'} (or fix BLIP2_SEARCH_VECTOR_INDEX)", argument="vector_index", given=repr(kind),
                                modes=", ".join(VECTOR_INDEX_MODES))
    return kind


def _check_sort(sort: str) -> str:
    from ..errors import InvalidInputError

    if sort not in ("score", "date"):
        raise InvalidInputError("sort {given} is not 'score' or 'date'; pass {argument:'score'} or {argument:'date'}", argument="sort",
                                given=repr(sort))
    return sort


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
