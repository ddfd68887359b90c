"""Domain exceptions.

The library raises these; only the edges (CLI, HTTP) turn them into messages and exit codes.
Every message names the object, the reason and the fix, on one line.
"""

from __future__ import annotations


class Blip2SearchError(Exception):
    """Base class: an error the user can fix, reported without a traceback (CLI exit code 2)."""


class InvalidInputError(Blip2SearchError, ValueError):
    """An argument is out of range or malformed."""


class ModelNotFoundError(Blip2SearchError):
    """A model id or directory could not be resolved to local files."""


class ModelLoadError(Blip2SearchError):
    """Model files were found but are not a usable BLIP-2 checkpoint of the needed kind."""


class ImageDecodeError(Blip2SearchError):
    """One image could not be read or decoded; other images are unaffected."""


class LibraryError(Blip2SearchError):
    """A photo library on disk is missing, unreadable, locked or inconsistent."""


class ModelMismatchError(LibraryError):
    """A library was built with a different model than the one asked for."""


class DamagedDatabaseError(LibraryError):
    """The library's SQLite file is damaged: pages SQLite finds malformed, or values in it that this program never
    writes (an unreadable date, text that is not UTF-8). Nothing is written to it after this is raised."""


class CorruptIndexError(LibraryError):
    """The vector index file returned impossible scores (damaged on disk); it can be rebuilt from the database."""


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `Library.index` after it had committed what it had done: `report` says what
    (`interrupted` True). A KeyboardInterrupt, so a script stops as at any Ctrl-C; run again to resume."""

    def __init__(self, report) -> None:
        super().__init__("index run interrupted: what was committed is kept; run it again to resume")
        self.report = report
