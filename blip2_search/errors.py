"""Domain exceptions.

The library raises these; only the edges (CLI, HTTP) turn them into messages and exit codes.
Every message names the object, the reason and the fix, on one line.
"""

from __future__ import annotations

import unicodedata


_ESCAPED = {"Cc", "Zl", "Zp", "Cs"}  # control characters (newline, tab, a terminal's escape), line separators, a non-UTF-8 byte


def one_line(text: str) -> str:
    """`text` with each character that would break its line or the terminal (a newline in a file name, a byte of a
    non-UTF-8 name kept as a surrogate) written as its escape (`\\n`, `\\udcff`), so a message naming it stays on one
    line. Other text is kept as it is: an emoji's joiners and a right-to-left name's marks show as they should."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _ESCAPED else c for c in text)


class Blip2SearchError(Exception):
    """Base class: an error the user can fix, reported without a traceback (CLI exit code 2). Its message is one
    line whatever the paths or text it names (`one_line`).

    Raised with `argument` (the Python parameter at fault), `message` is a format string of `values` naming it as
    `{argument}`, or given a value as `{argument:VALUE}`; it reads as Python (`rerank_k=16`), and an edge whose
    users know the argument by another name renders it with `naming` (the CLI, by its option: `--rerank-k 16`)."""

    def __init__(self, message: str, *, argument: str | None = None, **values) -> None:
        self.argument, self._message, self._values = argument, message, values
        super().__init__(message if argument is None else self.naming(argument))

    def naming(self, name: str) -> str:
        """The message with the argument called `name`: a keyword (`k`) given a value as `k=10`, an option (`-k`) as `-k 10`."""
        if self.argument is None:
            return str(self)
        return one_line(self._message.format(argument=_Named(name), **self._values))

    def __str__(self) -> str:
        return one_line(super().__str__())


class _Named(str):
    """An argument's name in a message: `{argument}` is the name, `{argument:VALUE}` the name given VALUE."""

    def __format__(self, value: str) -> str:
        if not value:
            return str(self)
        if self.startswith("-"):  # an option's value as typed on a command line: `--sort date`, not `--sort 'date'`
            return f"{self} {value[1:-1] if len(value) > 1 and value[0] == value[-1] == chr(39) else value}"
        return f"{self}={value}"


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
